// Unpacking MLX's 5- and 6-bit affine weights with AVX2 (shared by the AVX2 and AVX-512 units).
//
// MLX packs any bit width as one little-endian bit stream per row: element i occupies bits
// [i*bits, (i+1)*bits) of the row's bytes (uint32 words are just that stream, 4 bytes at a
// time). So a block of 32 elements is 4*bits bytes: 20 bytes (5-bit), 24 bytes (6-bit), and
// 8 elements repeat the same bit offsets every `bits` bytes.
//
// Included inside each unit's anonymous namespace (see qmm_impl.h).

// Byte shuffles: 16-bit lane i of a 128-bit lane gets the two bytes holding element i
// (0x80: zero, where the element ends inside its first byte), for 8 elements starting `base`
// bytes into the loaded 16; `mul` shifts each element's bits to the top of its lane.
template <int BITS>
struct Unpack16 {
  // Bit offset of element i (of 8) inside its first byte, and that byte.
  static constexpr int shift(int i) { return (i * BITS) % 8; }
  static constexpr int byte(int i) { return (i * BITS) / 8; }
  static constexpr char lo(int base, int i) { return char(base + byte(i)); }
  static constexpr char hi(int base, int i) {
    return shift(i) + BITS > 8 ? char(base + byte(i) + 1) : char(0x80);
  }
  // Elements 0..15 of a block come from a load at the block's start (lanes at bytes 0 and
  // BITS); elements 16..31 from a load ending at the block's end (4*BITS - 16 bytes in),
  // so no load reads past the block.
  static constexpr int kSecond = 4 * BITS - 16;
  static __m256i index(int half) {
    const int b0 = half ? 2 * BITS - kSecond : 0, b1 = b0 + BITS;
    // Lane i: [lo(i), hi(i)] for the 8 elements at b0, then the 8 at b1.
    return _mm256_setr_epi8(lo(b0, 0), hi(b0, 0), lo(b0, 1), hi(b0, 1), lo(b0, 2), hi(b0, 2),
                            lo(b0, 3), hi(b0, 3), lo(b0, 4), hi(b0, 4), lo(b0, 5), hi(b0, 5),
                            lo(b0, 6), hi(b0, 6), lo(b0, 7), hi(b0, 7), lo(b1, 0), hi(b1, 0),
                            lo(b1, 1), hi(b1, 1), lo(b1, 2), hi(b1, 2), lo(b1, 3), hi(b1, 3),
                            lo(b1, 4), hi(b1, 4), lo(b1, 5), hi(b1, 5), lo(b1, 6), hi(b1, 6),
                            lo(b1, 7), hi(b1, 7));
  }
  // x * 2^(16 - BITS - shift) drops the bits above the element; >> (16 - BITS) those below.
  static __m256i mul() {
    auto m = [](int i) { return short(1 << (16 - BITS - shift(i))); };
    return _mm256_setr_epi16(m(0), m(1), m(2), m(3), m(4), m(5), m(6), m(7),
                             m(0), m(1), m(2), m(3), m(4), m(5), m(6), m(7));
  }
};

// Elements 16*HALF .. 16*HALF + 15 of the 32-element block at `blk`, as 16 uint16 in order.
template <int BITS, int HALF>
inline __attribute__((always_inline)) __m256i unpack16(const uint8_t* blk) {
  using U = Unpack16<BITS>;
  const auto* p = reinterpret_cast<const __m128i*>(blk + (HALF ? U::kSecond : 0));
  const __m128i v = _mm_loadu_si128(p);
  const __m256i t = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), U::index(HALF));
  return _mm256_srli_epi16(_mm256_mullo_epi16(t, U::mul()), 16 - BITS);
}

// The whole block as 32 uint8 in element order.
template <int BITS>
inline __attribute__((always_inline)) __m256i unpack32(const uint8_t* blk) {
  // packus interleaves 128-bit lanes: [0..7, 16..23, 8..15, 24..31]; the permute restores
  // element order.
  const __m256i packed = _mm256_packus_epi16(unpack16<BITS, 0>(blk), unpack16<BITS, 1>(blk));
  return _mm256_permute4x64_epi64(packed, 0xD8);
}
