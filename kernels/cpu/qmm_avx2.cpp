// AVX2 + FMA kernels; compiled with -mavx2 -mfma, called only when the CPU has them.
#include <immintrin.h>

#include <math.h>

#include <algorithm>
#include <vector>

#include "qmm_isa.h"

namespace edgeai {
namespace {

struct V256 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  static void h2f_n(const uint16_t* p, float* out, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(p[i]);
  }
  static float sum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 8 bytes = 16 nibbles: low nibbles are the even elements, high the odd ones.
  static void q4(const uint8_t* p, reg& lo, reg& hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
  static void q8(const uint8_t* p, reg& a, reg& b) {
    a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
  }
};

#include "qmm_impl.h"
#include "attn_impl.h"

void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) { Kernel<V256>::tile(a, m0, m1, n0, n1); }
void attn(const AttnArgs& a, int t) { Attention<V256>::task(a, t); }

// Fast mode: R weight rows against one int8 activation row, as llama.cpp's Q4_1 x Q8_1 dot
// product does it. 4-bit, per block of 32: unpack 16 bytes to 32 nibbles (u8), maddubs
// with the int8 activations (pairs summed in int16: at most 2*15*127, no saturation),
// madd to int32, then one float FMA with scale[group] * xd[block].
// 8 scales or biases from float32 or float16 storage, as float32.
inline __m256 load8(const void* p, bool half, long i) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)))
              : _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

inline float load1(const void* p, bool half, long i) {
  return half ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Per-row constants: sd[blk] = scale[group of blk] * xd[blk] and the bias term
// sum_g bias[g] * xs[g], eight groups at a time (a scalar loop here costs as much as the
// row's dot products when K is small).
inline float row_constants(const QmmArgs& a, int n, const float* xd, const float* xs, float* sd) {
  const int G = a.K / a.gs, bpg = a.gs / 32;
  const long off = (long)n * G;
  __m256 bv = _mm256_setzero_ps();
  int g = 0;
  if (bpg == 1)
    for (; g + 8 <= G; g += 8) {
      _mm256_storeu_ps(sd + g, _mm256_mul_ps(load8(a.s, a.half_scales, off + g), _mm256_loadu_ps(xd + g)));
      bv = _mm256_fmadd_ps(load8(a.b, a.half_scales, off + g), _mm256_loadu_ps(xs + g), bv);
    }
  else
    for (; g + 8 <= G; g += 8) bv = _mm256_fmadd_ps(load8(a.b, a.half_scales, off + g), _mm256_loadu_ps(xs + g), bv);
  float bsum = V256::sum(bv);
  for (int t = g; t < G; t++) bsum += load1(a.b, a.half_scales, off + t) * xs[t];
  for (int t = bpg == 1 ? g : 0; t < G; t++) {
    const float sc = load1(a.s, a.half_scales, off + t);
    for (int j = t * bpg; j < (t + 1) * bpg; j++) sd[j] = sc * xd[j];
  }
  return bsum;
}

template <int R, int BITS>
void q8_rows(const QmmArgs& a, int m, int n, float* out) {
  const int K = a.K, nb = K / 32, rb = K * BITS / 8, G = K / a.gs;
  const int8_t* xq = a.xq + (long)m * K;
  float sd[R * (kMaxQ8K / 32)];  // R rows x nb blocks
  float bsum[R];
  const uint8_t* wr[R];
  for (int r = 0; r < R; r++) {
    bsum[r] = row_constants(a, n + r, a.xd + (long)m * nb, a.xs + (long)m * G, sd + r * nb);
    wr[r] = a.w + (long)(n + r) * rb;
  }
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int k = 0; k < nb; k++) {
    // Software prefetch of the rows 8 ahead, once per cache line: the hardware prefetcher
    // alone left this loop waiting on memory (measured 20 -> 16 ms per SmolLM2 token).
    if ((k * 4 * BITS) % 64 == 0)
      for (int r = 0; r < R; r++) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k * 4 * BITS + 8L * rb), _MM_HINT_T0);
    if (BITS == 4) {
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k * 32));
      for (int r = 0; r < R; r++) {
        const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr[r] + k * 16));
        const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), low4);
        const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xa), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(sd + r * nb + k), acc[r]);
      }
    } else {  // 8-bit: u8 x s8 products overflow maddubs' int16 pairs, so widen both to int16
      const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + k * 32)));
      const __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq + k * 32 + 16)));
      for (int r = 0; r < R; r++) {
        const uint8_t* p = wr[r] + k * 32;
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(sd + r * nb + k), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) out[r] = V256::sum(acc[r]) + bsum[r];
}

}  // namespace

void tile_q8_avx2(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  for (int m = m0; m < m1; m++) {
    float* y = a.y + (long)m * a.N;
    int n = n0;
    if (a.bits == 4) {
      for (; n + 4 <= n1; n += 4) q8_rows<4, 4>(a, m, n, y + n);
      for (; n < n1; n++) q8_rows<1, 4>(a, m, n, y + n);
    } else {
      for (; n + 4 <= n1; n += 4) q8_rows<4, 8>(a, m, n, y + n);
      for (; n < n1; n++) q8_rows<1, 8>(a, m, n, y + n);
    }
  }
}

QmmIsa isa_avx2() { return {"avx2", 8, tile, attn, tile_q8_avx2}; }

}  // namespace edgeai
