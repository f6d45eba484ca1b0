// The int8-activation (fast mode) tile, written once for AVX2 and for AVX-512 VNNI.
//
// Included inside an anonymous namespace by qmm_avx2.cpp (AVX2: maddubs + madd) and by
// qmm_vnni.cpp with EDGEAI_Q8_VNNI defined (vpdpbusd on 256-bit registers, AVX512-VNNI +
// AVX512VL): the same loop, the same activation layout, only the u8 x s8 dot products differ.
// Needs qmm_unpack.h first.

// Fast mode: one weight row against one int8 activation row, integer dot products per block
// of 32 as llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 do. Eight blocks' int32 dot products are
// reduced into one vector, then scaled by scale[group] * xd[block] in one FMA, and the
// bias term sum_g bias[g] * xs[g] joins the same accumulator: no per-row tables, one
// horizontal sum per row. (Per-row set-up was 75% of the time at K = 576 when each block
// was scaled on its own from a per-row table: 25 ns of overhead against 9 ns of dot products.)

// The helpers below are called with vector registers in a hot loop: a call would pass them
// through memory (GCC did not inline q8_dots8 on its own).
#define EDGEAI_INLINE inline __attribute__((always_inline))

// The first t of 8 (or 4) lanes set: sliding windows over these tables.
alignas(32) constexpr int32_t kLanes32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
alignas(32) constexpr int16_t kLanes16[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// 8 scales or biases (float32 or float16 storage) as float32; past the first t, zeros.
EDGEAI_INLINE __m256 load8(const void* p, bool half, long i, int t) {
  const bool full = t == 8;
  if (half) {
    const auto* h = static_cast<const uint16_t*>(p) + i;
    if (full) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    const __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(h),
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(kLanes32 + 8 - (t + 1) / 2)));
    return _mm256_cvtph_ps(_mm_and_si128(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(kLanes16 + 8 - t))));
  }
  const float* f = static_cast<const float*>(p) + i;
  if (full) return _mm256_loadu_ps(f);
  return _mm256_maskload_ps(f, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes32 + 8 - t)));
}

#if defined(EDGEAI_Q8_VNNI)
// VNNI: vpdpbusd multiplies u8 x s8 and adds groups of 4 straight into int32 lanes: no int16
// stage (so no saturation to avoid) and one instruction where AVX2 needs maddubs + madd.
EDGEAI_INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#endif

// 4-bit blocks k, k+1 against their activations ([A even | B even | A odd | B odd], see
// q4_even_at): one 32-byte load of packed weights, low nibbles x the first 32 values, high
// nibbles x the next 32, pairs summed in int16: [A's 8 partial sums | B's 8], each within
// +-2*2*15*128 = 7680.
EDGEAI_INLINE __m256i q4_pair16(const uint8_t* w, const int8_t* x) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
}

// The same as int32: [A's 4 partial sums | B's 4].
EDGEAI_INLINE __m256i q4_pair32(const uint8_t* w, const int8_t* x) {
#if defined(EDGEAI_Q8_VNNI)
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  const __m256i d = dot_u8s8(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return dot_u8s8(d, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)));
#else
  return _mm256_madd_epi16(q4_pair16(w, x), _mm256_set1_epi16(1));
#endif
}

// Dot products of 4-bit blocks j..j+7, in block order.
EDGEAI_INLINE __m256i q4_dots8(const uint8_t* w, const int8_t* xq, int j) {
#if defined(EDGEAI_Q8_VNNI)
  __m256i p[4];
  for (int i = 0; i < 4; i++) p[i] = q4_pair32(w + 16 * (j + 2 * i), xq + 32 * (j + 2 * i));
  // Per 128-bit lane: [A C E G | B D F H] after two pairwise int32 sums.
  const __m256i d = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  return _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#else
  __m256i p[4];
  for (int i = 0; i < 4; i++) p[i] = q4_pair16(w + 16 * (j + 2 * i), xq + 32 * (j + 2 * i));
  // Two int16 pairwise sums (4 x 7680 still fits), then int32: [b0 b2 b4 b6 | b1 b3 b5 b7].
  const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
  const __m256i d = _mm256_madd_epi16(h, _mm256_set1_epi16(1));
  return _mm256_permutevar8x32_epi32(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#endif
}

// 8-bit: what the bias term adds back for the offset the dot products take off q.
#if defined(EDGEAI_Q8_VNNI)
constexpr float kQ8Offset = 0.f;  // vpdpbusd takes q as it is (u8), summing in int32

EDGEAI_INLINE __m256i q8_block(const uint8_t* w, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return dot_u8s8(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), xv);
}
#else
constexpr float kQ8Offset = 128.f;

// 8-bit: weights as signed q - 128 (the 128 * scale goes into the bias term), so u8 x s8
// maddubs cannot saturate: |q - 128| x (x * sign(q - 128)), pairs at most 2*128*127.
EDGEAI_INLINE __m256i q8_block(const uint8_t* w, const int8_t* x) {
  const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), _mm256_set1_epi8(char(0x80)));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xv, q)), _mm256_set1_epi16(1));
}
#endif

// 5- or 6-bit: unsigned values below 64 against int8 in natural order; u8 x s8 maddubs
// cannot saturate (pairs at most 2*63*127).
template <int BITS>
EDGEAI_INLINE __m256i qb_block(const uint8_t* w, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
#if defined(EDGEAI_Q8_VNNI)
  return dot_u8s8(_mm256_setzero_si256(), unpack32<BITS>(w), xv);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(unpack32<BITS>(w), xv), _mm256_set1_epi16(1));
#endif
}

// One block of 32 (5, 6 or 8-bit weights; 4 * BITS bytes): 8 int32 partial sums.
template <int BITS>
EDGEAI_INLINE __m256i block_dot(const uint8_t* w, const int8_t* x) {
  if constexpr (BITS == 8) return q8_block(w, x);
  else return qb_block<BITS>(w, x);
}

// Dot products of 5, 6 or 8-bit blocks j..j+7, in block order.
template <int BITS>
EDGEAI_INLINE __m256i q8_dots8(const uint8_t* w, const int8_t* xq, int j) {
  __m256i d[8];
#if defined(EDGEAI_Q8_VNNI)
  // Two blocks per 512-bit vpdpbusd (and per unpack): [A's 8 partial sums | B's 8].
  for (int b = 0; b < 8; b += 2) {
    const uint8_t* wb = w + 4 * BITS * (j + b);
    __m512i u;
    if constexpr (BITS == 8) u = _mm512_loadu_si512(wb);
    else u = unpack64<BITS>(wb);
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(xq + 32 * (j + b)));
    d[b] = _mm512_castsi512_si256(p);
    d[b + 1] = _mm512_extracti64x4_epi64(p, 1);
  }
#else
  for (int b = 0; b < 8; b++) d[b] = block_dot<BITS>(w + 4 * BITS * (j + b), xq + 32 * (j + b));
#endif
  // Per 128-bit lane, [b0 b1 b2 b3] and [b4 b5 b6 b7] partial sums; then the lanes added.
  const __m256i lo = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
  const __m256i hi = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// Scales or biases as float32, from float16 (HALF) or float32 storage.
template <bool HALF>
inline float scalar_at(const void* p, long i) {
  return HALF ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// y[m0:m1, n0:n1] in fast mode. G32: one block per group (gs = 32, as GGUF's Q4_1/Q8_0), where
// a row's scales, biases and blocks line up 8 to 8. Everything but the dot products is
// hoisted out of the row loop: at K = 576 a row has only 18 blocks.
template <int BITS, bool HALF, bool G32>
void q8_tile(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  const int K = a.K, nb = K / 32, G = K / a.gs, bpg = a.gs / 32;
  const long rb = (long)K * BITS / 8;
  const __m256i gidx = _mm256_setr_epi32(0, 1 / bpg, 2 / bpg, 3 / bpg, 4 / bpg, 5 / bpg, 6 / bpg, 7 / bpg);
  for (int n = n0; n < n1; n++) {  // weight rows outer: a row is read once for every m
    const uint8_t* w = a.w + n * rb;
    const long soff = (long)n * G;
    for (int m = m0; m < m1; m++) {
      const int8_t* xq = a.xq + (long)m * K;
      const float* xd = a.xd + (long)m * nb;
      const float* xs = a.xs + (long)m * G;
      // scale[group of block k] * xd[k]
      auto sd = [&](int k) { return scalar_at<HALF>(a.s, soff + (G32 ? k : k / bpg)) * xd[k]; };
      // Bias term of group g; 8-bit weights may be taken as q - kQ8Offset: + kQ8Offset * scale.
      auto bias = [&](int g) {
        return scalar_at<HALF>(a.b, soff + g) + (BITS == 8 ? kQ8Offset * scalar_at<HALF>(a.s, soff + g) : 0.f);
      };
      __m256 acc = _mm256_setzero_ps();
      int j = 0;
      for (; j + 8 <= nb; j += 8) {
        // Software prefetch 8 rows ahead: the hardware prefetcher alone left this loop
        // waiting on memory (measured 20 -> 16 ms per SmolLM2 token).
        if (m == m0)
          for (int c = 0; c < 32 * BITS; c += 64) _mm_prefetch(reinterpret_cast<const char*>(w + 8 * rb + j * 4 * BITS + c), _MM_HINT_T0);
        __m256i d;
        if constexpr (BITS == 4) d = q4_dots8(w, xq, j);
        else d = q8_dots8<BITS>(w, xq, j);
        const __m256 s = G32 ? load8(a.s, HALF, soff + j, 8)
                             : _mm256_permutevar8x32_ps(load8(a.s, HALF, soff + j / bpg, 8 / bpg), gidx);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_loadu_ps(xd + j)), acc);
        if (G32) {  // this block's group's bias term too
          __m256 b = load8(a.b, HALF, soff + j, 8);
          if (BITS == 8 && kQ8Offset != 0.f) b = _mm256_fmadd_ps(s, _mm256_set1_ps(kQ8Offset), b);
          acc = _mm256_fmadd_ps(b, _mm256_loadu_ps(xs + j), acc);
        }
      }
      // Fewer than 8 blocks left: pairs ([A's 4 sums | B's 4] x [sd_A x4 | sd_B x4]), then a
      // lone 4-bit block ([even | odd], 16 bytes), or single 5/6/8-bit blocks.
      const int tail = j;
      if constexpr (BITS == 4) {
        const __m128i low4 = _mm_set1_epi8(0x0f);
        for (; j + 2 <= nb; j += 2) {
          const __m256i d = q4_pair32(w + 16 * j, xq + 32 * j);
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set_m128(_mm_set1_ps(sd(j + 1)), _mm_set1_ps(sd(j))), acc);
        }
        if (j < nb) {
          const int8_t* x = xq + q4_even_at(j, nb);
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * j));
          const __m128i p = _mm_add_epi16(
              _mm_maddubs_epi16(_mm_and_si128(v, low4), _mm_loadu_si128(reinterpret_cast<const __m128i*>(x))),
              _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16))));
          const __m128 d = _mm_cvtepi32_ps(_mm_madd_epi16(p, _mm_set1_epi16(1)));
          acc = _mm256_add_ps(acc, _mm256_zextps128_ps256(_mm_mul_ps(d, _mm_set1_ps(sd(j)))));
        }
      } else {
        for (; j < nb; j++)
          acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot<BITS>(w + 4 * BITS * j, xq + 32 * j)),
                                _mm256_set1_ps(sd(j)), acc);
      }
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
      s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      float out = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
      for (int g = G32 ? tail : 0; g < G; g++) out += bias(g) * xs[g];
      a.y[(long)m * a.N + n] = out;
    }
  }
}

template <int BITS>
void q8_tile_for(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  const bool g32 = a.gs == 32;
  if (a.half_scales) (g32 ? q8_tile<BITS, true, true> : q8_tile<BITS, true, false>)(a, m0, m1, n0, n1);
  else (g32 ? q8_tile<BITS, false, true> : q8_tile<BITS, false, false>)(a, m0, m1, n0, n1);
}

// y[m0:m1, n0:n1] in fast mode for any of the bit widths.
void q8_tile_bits(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  switch (a.bits) {
    case 4: return q8_tile_for<4>(a, m0, m1, n0, n1);
    case 5: return q8_tile_for<5>(a, m0, m1, n0, n1);
    case 6: return q8_tile_for<6>(a, m0, m1, n0, n1);
    default: return q8_tile_for<8>(a, m0, m1, n0, n1);
  }
}
