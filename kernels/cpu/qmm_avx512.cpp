// AVX-512 (F) kernels; compiled with -mavx512f -mfma, called only when the CPU has them.
#include <immintrin.h>

#include <math.h>

#include "qmm_isa.h"

namespace edgeai {
namespace {

#include "qmm_unpack.h"

struct V512 {
  using reg = __m512;
  static constexpr int W = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg set1(float v) { return _mm512_set1_ps(v); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float h2f(uint16_t h) { return _cvtsh_ss(h); }
  static void h2f_n(const uint16_t* p, float* out, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + i))));
    for (; i < n; i++) out[i] = _cvtsh_ss(p[i]);
  }
  static float sum(reg v) { return _mm512_reduce_add_ps(v); }
  // r[i][j] <- r[j][i] for 16 registers (the gemm's weight panels).
  static void transpose(reg* r) {
    reg t[16];
    for (int i = 0; i < 8; i++) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
      r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int h = 0; h < 2; h++)
      for (int i = 0; i < 4; i++) {
        t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
        t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
      }
    for (int i = 0; i < 8; i++) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
      r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    }
  }
  // 16 bytes = 32 nibbles: low nibbles are the even elements, high the odd ones.
  static void q4(const uint8_t* p, reg& lo, reg& hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
  // 32 bytes = 32 elements in natural order: first 16, next 16.
  static void q8(const uint8_t* p, reg& a, reg& b) {
    a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
    b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  }
  // 5- or 6-bit block of 32 elements (e a multiple of 32) in order: first 16, next 16.
  template <int BITS>
  static void qb(const uint8_t* row, int e, reg& a, reg& b) {
    const uint8_t* blk = row + (e / 32) * 4 * BITS;
    a = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(unpack16<BITS, 0>(blk)));
    b = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(unpack16<BITS, 1>(blk)));
  }
};

#include "qmm_impl.h"
#include "attn_impl.h"

void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) { Kernel<V512>::tile(a, m0, m1, n0, n1); }
void attn(const AttnArgs& a, int t) { Attention<V512>::task(a, t); }

}  // namespace

QmmIsa isa_avx512() { return {"avx512", 16, tile, attn, tile_q8_avx2, nullptr, gemm_q8_panels_avx2}; }

#if defined(EDGEAI_HAVE_VNNI)
QmmIsa isa_avx512_vnni() {
  return {"avx512vnni", 16, tile, attn, tile_q8_vnni, gemm_q8_vnni, gemm_q8_panels_vnni, kMaxQ8Rows};
}
#endif

}  // namespace edgeai
