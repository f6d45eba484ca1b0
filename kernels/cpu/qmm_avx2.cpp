// AVX2 + FMA kernels; compiled with -mavx2 -mfma, called only when the CPU has them.
#include <immintrin.h>

#include <math.h>

#include <algorithm>
#include <vector>

#include "qmm_isa.h"

namespace edgeai {
namespace {

#include "qmm_unpack.h"

struct V256 {
  using reg = __m256;
  static constexpr int W = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float v) { return _mm256_set1_ps(v); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
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
  // r[i][j] <- r[j][i] for 8 registers (the gemm's weight panels).
  static void transpose(reg* r) {
    reg t[8], s[8];
    for (int i = 0; i < 4; i++) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
      s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
      r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
      r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
    }
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
  // 5- or 6-bit elements e .. e + 15 (e a multiple of 16) in order: 8, then the next 8.
  template <int BITS>
  static void qb(const uint8_t* row, int e, reg& a, reg& b) {
    const uint8_t* blk = row + (e / 32) * 4 * BITS;
    const __m256i v = (e & 16) ? unpack16<BITS, 1>(blk) : unpack16<BITS, 0>(blk);
    a = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)));
    b = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
  }
};

#include "qmm_impl.h"
#include "attn_impl.h"

void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) { Kernel<V256>::tile(a, m0, m1, n0, n1); }
void attn(const AttnArgs& a, int t) { Attention<V256>::task(a, t); }

#include "qmm_q8.h"

}  // namespace

void tile_q8_avx2(const QmmArgs& a, int m0, int m1, int n0, int n1) { q8_tile_bits(a, m0, m1, n0, n1); }

// No int8 GEMM for prompts: filling SmolLM2's cache in int8 here flips its near-tie first answer
// to "What is the capital of France?" ("L'Etoile", 0.09 nats from "The"); the float32 GEMM
// keeps it. Batches' decode steps read packed panels (qmm_gemm_q8_avx2.cpp).
QmmIsa isa_avx2() { return {"avx2", 8, tile, attn, tile_q8_avx2, nullptr, gemm_q8_panels_avx2}; }

}  // namespace edgeai
