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
#if defined(EDGEAI_Q8_VNNI)
// AVX-512 VBMI: vpermb gives each qword the `bits` bytes of its 8 elements, vpmultishiftqb
// pulls each element's byte from its bit offset, one AND drops the bits above it. A masked
// load reads exactly the block (no fault past a row's end).
template <int BITS>
inline __attribute__((always_inline)) __m256i unpack32(const uint8_t* blk) {
  auto at = [](int i) { return char(BITS * (i / 8) + (i % 8 < BITS ? i % 8 : BITS - 1)); };
  auto off = [](int i) { return char(BITS * (i % 8)); };
  const __m256i idx = _mm256_setr_epi8(at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(8), at(9),
                                       at(10), at(11), at(12), at(13), at(14), at(15), at(16), at(17), at(18),
                                       at(19), at(20), at(21), at(22), at(23), at(24), at(25), at(26), at(27),
                                       at(28), at(29), at(30), at(31));
  const __m256i sh = _mm256_setr_epi8(off(0), off(1), off(2), off(3), off(4), off(5), off(6), off(7), off(0),
                                      off(1), off(2), off(3), off(4), off(5), off(6), off(7), off(0), off(1),
                                      off(2), off(3), off(4), off(5), off(6), off(7), off(0), off(1), off(2),
                                      off(3), off(4), off(5), off(6), off(7));
  const __m256i v = _mm256_maskz_loadu_epi8((1u << (4 * BITS)) - 1, blk);
  const __m256i q = _mm256_multishift_epi64_epi8(sh, _mm256_permutexvar_epi8(idx, v));
  return _mm256_and_si256(q, _mm256_set1_epi8(char((1 << BITS) - 1)));
}

// Two consecutive blocks (64 elements, 8 * BITS bytes) as 64 uint8 in element order: the same
// three instructions on 512-bit registers, half the work per block.
template <int BITS>
inline __attribute__((always_inline)) __m512i unpack64(const uint8_t* pair) {
  alignas(64) static constexpr auto tables = [] {
    struct { char idx[64], sh[64]; } t{};
    for (int i = 0; i < 64; i++) {
      t.idx[i] = char(BITS * (i / 8) + (i % 8 < BITS ? i % 8 : BITS - 1));
      t.sh[i] = char(BITS * (i % 8));
    }
    return t;
  }();
  const __m512i idx = _mm512_load_si512(tables.idx), sh = _mm512_load_si512(tables.sh);
  const __m512i v = _mm512_maskz_loadu_epi8((1ull << (8 * BITS)) - 1, pair);
  const __m512i q = _mm512_multishift_epi64_epi8(sh, _mm512_permutexvar_epi8(idx, v));
  return _mm512_and_si512(q, _mm512_set1_epi8(char((1 << BITS) - 1)));
}
#else
template <int BITS>
inline __attribute__((always_inline)) __m256i unpack32(const uint8_t* blk) {
  // packus interleaves 128-bit lanes: [0..7, 16..23, 8..15, 24..31]; the permute restores
  // element order.
  const __m256i packed = _mm256_packus_epi16(unpack16<BITS, 0>(blk), unpack16<BITS, 1>(blk));
  return _mm256_permute4x64_epi64(packed, 0xD8);
}
#endif
