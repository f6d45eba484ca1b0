// Prompts in fast mode: a blocked int8 GEMM with AVX-512 VNNI dot products.
//
// Compiled with the VNNI unit's flags (-mavx512vnni -mavx512vbmi ...), called only where the
// CPU has them. Activations come quantized to int8 per block of 32 (QmmArgs::xq, xd; xs holds
// xd * sum(xq) per *block* here, not per group); the weights of a task are unpacked to uint8
// once per chunk of K and transposed into panels of NR = 32 weight rows laid out as vpdpbusd
// reads them: for each 4 consecutive k, 32 rows x 4 bytes. The micro-kernel keeps MR x 32
// outputs in registers; per block of 32 it does 8 x 2 x MR vpdpbusd (64 u8 x s8 products each)
// into int32, then one float32 FMA per output with scale[n, block] * xd[m, block] and one with
// bias[n, group] * xs[m, block]. That is ~2.5x fewer instructions per multiply-add than the
// float32 GEMM (Kernel::gemm) on the same panels.
//
// Element order inside a block: natural for 5, 6 and 8-bit weights; for 4-bit the 16 even
// elements, then the 16 odd ones (MLX puts element 2i in the low nibble of byte i, 2i+1 in the
// high nibble, so one AND and one shift unpack a block). The driver quantizes x in that order.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qmm_isa.h"

namespace edgeai {
namespace {

#define EDGEAI_Q8_VNNI 1
#include "qmm_unpack.h"

constexpr int NR = 32;   // weight rows per panel (two registers of 16 int32 lanes)
constexpr int MR = 6;    // activation rows per micro-kernel call
constexpr int KC = 512;  // k per chunk: 256 rows of int8 x stay in L2, a panel in L1

#define EDGEAI_INLINE inline __attribute__((always_inline))

// Row r's elements [k0, k0 + kc) of weight row n as uint8 in the block order above.
template <int BITS>
void unpack_row(const uint8_t* row, int k0, int kc, uint8_t* dst) {
  for (int k = k0; k < k0 + kc; k += 32, dst += 32) {
    if constexpr (BITS == 4) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
      const __m128i low4 = _mm_set1_epi8(0x0f);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_and_si128(v, low4));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
    } else if constexpr (BITS == 8) {
      std::memcpy(dst, row + k, 32);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), unpack32<BITS>(row + k / 32 * 4 * BITS));
    }
  }
}

// 16 x 16 transpose of 32-bit elements: r[i] lane j <- r[j] lane i.
EDGEAI_INLINE void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int h = 0; h < 2; h++)
    for (int i = 0; i < 4; i++) {
      t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
    }
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
  }
}

// Panel of NR rows: rows [NR][kcp] uint8 (kcp a multiple of 64) -> panel[kcp / 4][NR][4].
void transpose_panel(const uint8_t* rows, int kcp, uint8_t* panel) {
  for (int k = 0; k < kcp; k += 64)
    for (int h = 0; h < NR; h += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(rows + (size_t)(h + i) * kcp + k);
      transpose16(r);  // r[i]: dword i (k + 4i .. k + 4i + 3) of the 16 rows
      for (int i = 0; i < 16; i++) _mm512_storeu_si512(panel + (size_t)(k / 4 + i) * NR * 4 + h * 4, r[i]);
    }
}

// One 4-byte step of a block for M rows: acc[i] += w0/w1 (two 16-column halves of a panel,
// uint8) . row i's 4 int8 values at x (stride ldx).
template <int M>
EDGEAI_INLINE void dot_rows(__m512i (&acc)[M][2], __m512i w0, __m512i w1, const int8_t* x, long ldx) {
  for (int i = 0; i < M; i++) {
    int32_t q4;
    std::memcpy(&q4, x + i * ldx, 4);
    const __m512i xv = _mm512_set1_epi32(q4);
    acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, xv);
    acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, xv);
  }
}

// A finished block into the M rows' sums: c += dot * scale * xd + bias * xs, with row i's
// block factors at xd[i * ldb], xs[i * ldb].
template <int M>
EDGEAI_INLINE void scale_rows(__m512 (&c)[M][2], const __m512i (&acc)[M][2], __m512 s0, __m512 s1, __m512 b0,
                              __m512 b1, const float* xd, const float* xs, long ldb) {
  for (int i = 0; i < M; i++) {
    const __m512 d = _mm512_set1_ps(xd[i * ldb]), e = _mm512_set1_ps(xs[i * ldb]);
    c[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, d), c[i][0]);
    c[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, d), c[i][1]);
    c[i][0] = _mm512_fmadd_ps(b0, e, c[i][0]);
    c[i][1] = _mm512_fmadd_ps(b1, e, c[i][1]);
  }
}

// y[M rows][32 columns] (+)= the panel's product with M int8 rows over nblk blocks.
// x: the rows' int8 at this chunk (stride ldx); xd, xs: their per-block factors (stride ldb).
template <int M>
void micro(const int8_t* x, long ldx, const float* xd, const float* xs, long ldb, const uint8_t* panel,
           const float* sp, const float* bp, int nblk, float* y, long ldy, bool add, __mmask16 k0, __mmask16 k1) {
  __m512 c[M][2];
  for (int i = 0; i < M; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int b = 0; b < nblk; b++) {
    __m512i acc[M][2];
    for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const uint8_t* p = panel + (size_t)b * 8 * NR * 4;
    const int8_t* xb = x + 32 * b;
    for (int s = 0; s < 8; s++) {
      const __m512i w0 = _mm512_loadu_si512(p + s * NR * 4), w1 = _mm512_loadu_si512(p + s * NR * 4 + 64);
      dot_rows<M>(acc, w0, w1, xb + 4 * s, ldx);
    }
    const __m512 s0 = _mm512_loadu_ps(sp + NR * b), s1 = _mm512_loadu_ps(sp + NR * b + 16);
    const __m512 b0 = _mm512_loadu_ps(bp + NR * b), b1 = _mm512_loadu_ps(bp + NR * b + 16);
    scale_rows<M>(c, acc, s0, s1, b0, b1, xd + b, xs + b, ldb);
  }
  for (int i = 0; i < M; i++) {
    float* o = y + i * ldy;
    if (add) {
      c[i][0] = _mm512_add_ps(c[i][0], _mm512_maskz_loadu_ps(k0, o));
      c[i][1] = _mm512_add_ps(c[i][1], _mm512_maskz_loadu_ps(k1, o + 16));
    }
    _mm512_mask_storeu_ps(o, k0, c[i][0]);
    _mm512_mask_storeu_ps(o + 16, k1, c[i][1]);
  }
}

float scale_at(const void* p, bool half, long i) {
  return half ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

template <int BITS>
void gemm(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  thread_local std::vector<uint8_t> rows, panel;
  thread_local std::vector<float> sp, bp;
  const int K = a.K, nbk = K / 32, G = K / a.gs, bpg = a.gs / 32;
  const long rb = (long)K * BITS / 8;
  rows.resize((size_t)NR * KC);
  panel.resize((size_t)NR * KC);
  sp.resize((size_t)NR * KC / 32);
  bp.resize((size_t)NR * KC / 32);
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = std::min(KC, K - k0), kcp = (kc + 63) / 64 * 64, nblk = kc / 32, kb0 = k0 / 32;
    for (int n = n0; n < n1; n += NR) {
      const int nr = std::min(NR, n1 - n);
      for (int r = 0; r < NR; r++) {
        uint8_t* dst = rows.data() + (size_t)r * kcp;
        if (r < nr) unpack_row<BITS>(a.w + (n + r) * rb, k0, kc, dst);
        std::memset(dst + (r < nr ? kc : 0), 0, kcp - (r < nr ? kc : 0));
      }
      transpose_panel(rows.data(), kcp, panel.data());
      for (int b = 0; b < nblk; b++)
        for (int r = 0; r < NR; r++) {
          const long g = (long)(n + r) * G + (kb0 + b) / bpg;
          sp[NR * b + r] = r < nr ? scale_at(a.s, a.half_scales, g) : 0.f;
          bp[NR * b + r] = r < nr ? scale_at(a.b, a.half_scales, g) : 0.f;
        }
      const __mmask16 km0 = nr >= 16 ? 0xffff : __mmask16((1u << nr) - 1);
      const __mmask16 km1 = nr >= 32 ? 0xffff : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : 0;
      const bool add = k0 > 0;
      int m = m0;
      auto call = [&](auto mr) {
        constexpr int R = decltype(mr)::value;
        micro<R>(a.xq + (long)m * K + k0, K, a.xd + (long)m * nbk + kb0, a.xs + (long)m * nbk + kb0, nbk,
                 panel.data(), sp.data(), bp.data(), nblk, a.y + (long)m * a.N + n, a.N, add, km0, km1);
      };
      for (; m + MR <= m1; m += MR) call(std::integral_constant<int, MR>());
      switch (m1 - m) {
        case 5: call(std::integral_constant<int, 5>()); break;
        case 4: call(std::integral_constant<int, 4>()); break;
        case 3: call(std::integral_constant<int, 3>()); break;
        case 2: call(std::integral_constant<int, 2>()); break;
        case 1: call(std::integral_constant<int, 1>()); break;
      }
    }
  }
}

// -- weights repacked once: panels read straight by the micro-kernel -----------------------
//
// For batched decoding (4 to a few dozen rows) the unpack + transpose above costs as much as
// the dot products: it is redone for every step and amortized over only the batch's rows.
// pack_panels_q8 (qmm_gemm_q8_avx2.cpp, shared with the AVX2 GEMM) does it once: per panel
// of NR rows, per block of 32 k (in the block order above), per 4 consecutive k (a "step"), the 16 + 16 rows x 4 values that the two
// vpdpbusd of a step read. 4-bit: 64 bytes a step, row r's values in the low nibbles and row
// 16 + r's in the high ones (the same bytes as the MLX matrix: one AND and one shift unpack a
// step); 5, 6 and 8-bit: 128 bytes, one per value. Scales and biases go per panel and group
// as NR values in their own dtype. Rows past N are zero.

constexpr int kStep4 = 64, kStep8 = 128;  // bytes per step of 4 k, 4-bit and wider

// NR scales or biases of one panel and group as float32 (two registers).
EDGEAI_INLINE void load_nr(const void* p, bool half, size_t at, __m512& lo, __m512& hi) {
  if (half) {
    const auto* h = static_cast<const uint16_t*>(p) + at;
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  } else {
    const float* f = static_cast<const float*>(p) + at;
    lo = _mm512_loadu_ps(f);
    hi = _mm512_loadu_ps(f + 16);
  }
}

// y[M rows][NR columns] = one packed panel's product with M int8 rows over all nblk blocks of K.
template <int M, bool NIB>
void micro_packed(const int8_t* x, long ldx, const float* xd, const float* xs, long ldb, const uint8_t* panel,
                  const void* sp, const void* bp, bool half, int nblk, int bpg, float* y, long ldy, __mmask16 k0,
                  __mmask16 k1) {
  constexpr int SB = NIB ? kStep4 : kStep8;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  __m512 c[M][2];
  for (int i = 0; i < M; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
  __m512 s0, s1, b0, b1;
  for (int blk = 0; blk < nblk; blk++) {
    __m512i acc[M][2];
    for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const uint8_t* p = panel + (size_t)blk * 8 * SB;
    const int8_t* xb = x + 32 * blk;
    for (int s = 0; s < 8; s++) {
      __m512i w0, w1;
      if constexpr (NIB) {
        const __m512i v = _mm512_loadu_si512(p + s * SB);
        w0 = _mm512_and_si512(v, low4);
        w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      } else {
        w0 = _mm512_loadu_si512(p + s * SB);
        w1 = _mm512_loadu_si512(p + s * SB + 64);
      }
      dot_rows<M>(acc, w0, w1, xb + 4 * s, ldx);
    }
    if (blk % bpg == 0) {  // a new group: its scales and biases
      load_nr(sp, half, (size_t)(blk / bpg) * NR, s0, s1);
      load_nr(bp, half, (size_t)(blk / bpg) * NR, b0, b1);
    }
    scale_rows<M>(c, acc, s0, s1, b0, b1, xd + blk, xs + blk, ldb);
  }
  for (int i = 0; i < M; i++) {
    _mm512_mask_storeu_ps(y + i * ldy, k0, c[i][0]);
    _mm512_mask_storeu_ps(y + i * ldy + 16, k1, c[i][1]);
  }
}

template <bool NIB>
void gemm_packed(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  const int K = a.K, nbk = K / 32, G = K / a.gs, bpg = a.gs / 32, es = a.half_scales ? 2 : 4;
  const long panel_bytes = (long)(K / 4) * (NIB ? kStep4 : kStep8);
  for (int n = n0; n < n1; n += NR) {  // n0 is a multiple of NR (the driver's tiles are)
    const int nr = std::min(NR, n1 - n), p = n / NR;
    const uint8_t* panel = a.wp + (size_t)p * panel_bytes;
    const void* sp = static_cast<const uint8_t*>(a.sp) + (size_t)p * G * NR * es;
    const void* bp = static_cast<const uint8_t*>(a.bp) + (size_t)p * G * NR * es;
    const __mmask16 km0 = nr >= 16 ? 0xffff : __mmask16((1u << nr) - 1);
    const __mmask16 km1 = nr >= 32 ? 0xffff : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : 0;
    int m = m0;
    auto call = [&](auto mr) {
      constexpr int R = decltype(mr)::value;
      micro_packed<R, NIB>(a.xq + (long)m * K, K, a.xd + (long)m * nbk, a.xs + (long)m * nbk, nbk, panel, sp, bp,
                           a.half_scales, nbk, bpg, a.y + (long)m * a.N + n, a.N, km0, km1);
    };
    for (; m + MR <= m1; m += MR) call(std::integral_constant<int, MR>());
    switch (m1 - m) {
      case 5: call(std::integral_constant<int, 5>()); break;
      case 4: call(std::integral_constant<int, 4>()); break;
      case 3: call(std::integral_constant<int, 3>()); break;
      case 2: call(std::integral_constant<int, 2>()); break;
      case 1: call(std::integral_constant<int, 1>()); break;
    }
  }
}

}  // namespace

void gemm_q8_panels_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  if (a.bits == 4) gemm_packed<true>(a, m0, m1, n0, n1);
  else gemm_packed<false>(a, m0, m1, n0, n1);
}

void gemm_q8_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  switch (a.bits) {
    case 4: return gemm<4>(a, m0, m1, n0, n1);
    case 5: return gemm<5>(a, m0, m1, n0, n1);
    case 6: return gemm<6>(a, m0, m1, n0, n1);
    default: return gemm<8>(a, m0, m1, n0, n1);
  }
}

}  // namespace edgeai
