// Batched decoding's int8 GEMM with AVX2 (maddubs), and the panels both int8 GEMMs read.
//
// Compiled with -mavx2 -mfma -mf16c; called only where the CPU has them (every AVX-512 CPU
// too). The panel layout is qmm_gemm_q8.cpp's (made for vpdpbusd): per panel of NR = 32 weight
// rows, per block of 32 k, per 4 consecutive k (a "step"), 32 rows x 4 values; 4-bit: 64 bytes
// a step, row r's values in the low nibbles and row 16 + r's in the high ones; 5, 6 and 8-bit:
// 128 bytes, one per value. pack_panels_q8 below makes them for either ISA.
//
// AVX2 has no u8 x s8 -> int32 dot product: vpmaddubsw sums pairs into int16, which must not
// saturate, so each width accumulates in int16 only as far as that is exact (activations are
// int8 in [-127, 127]): 4-bit values (<= 15) a whole block (8 steps x 2 x 15 x 127 = 30480);
// 8-bit values as their two nibbles, each like 4-bit, the high one weighted 16 when widened;
// 5 and 6-bit (<= 63) two steps at a time (2 x 2 x 63 x 127 = 32004). Every block's dot
// product is then the exact int32 that vpdpbusd gives, and the float32 epilogue runs in the
// same order as the VNNI kernel's: both ISAs give the same bits.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qmm_isa.h"

namespace edgeai {
namespace {

#include "qmm_unpack.h"

constexpr int NR = 32;                      // weight rows per panel
constexpr int kStep4 = 64, kStep8 = 128;  // bytes per step of 4 k, 4-bit and wider

#define EDGEAI_INLINE inline __attribute__((always_inline))

long step_bytes(int bits) { return bits == 4 ? kStep4 : kStep8; }

// Weight row `row` as K uint8 in the block order of the int8 GEMMs: natural for 5, 6 and 8-bit;
// for 4-bit each block's 16 even-indexed elements, then its 16 odd ones.
template <int BITS>
void unpack_row(const uint8_t* row, int K, uint8_t* dst) {
  for (int k = 0; k < K; k += 32, dst += 32) {
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

// Weight rows [n, n + nr) (nr <= NR; the rest of the panel zero) as one panel; `rows` is
// scratch of NR * K bytes.
template <int BITS>
void pack_weights(const uint8_t* w, int n, int nr, int K, uint8_t* rows, uint8_t* out) {
  const long rb = (long)K * BITS / 8;
  for (int r = 0; r < NR; r++) {
    if (r < nr) unpack_row<BITS>(w + (n + r) * rb, K, rows + (size_t)r * K);
    else std::memset(rows + (size_t)r * K, 0, K);
  }
  for (int q = 0; q < K / 4; q++) {
    if constexpr (BITS == 4) {
      uint8_t* o = out + (size_t)q * kStep4;
      for (int r = 0; r < 16; r++)
        for (int j = 0; j < 4; j++)
          o[4 * r + j] = uint8_t(rows[(size_t)r * K + 4 * q + j] | rows[(size_t)(r + 16) * K + 4 * q + j] << 4);
    } else {
      uint8_t* o = out + (size_t)q * kStep8;
      for (int r = 0; r < NR; r++) std::memcpy(o + 4 * r, rows + (size_t)r * K + 4 * q, 4);
    }
  }
}

// The panel's scales or biases: per group, NR values (es bytes each), zero past nr.
void pack_factors(const void* s, int n, int nr, int G, int es, void* out) {
  auto* o = static_cast<uint8_t*>(out);
  std::memset(o, 0, (size_t)G * NR * es);
  for (int g = 0; g < G; g++)
    for (int r = 0; r < nr; r++)
      std::memcpy(o + ((size_t)g * NR + r) * es, static_cast<const uint8_t*>(s) + ((size_t)(n + r) * G + g) * es, es);
}

template <int BITS>
void pack(const uint8_t* w, const void* s, const void* b, bool half, int N, int K, int G, uint8_t* wp, void* sp,
          void* bp) {
  const int es = half ? 2 : 4;
  std::vector<uint8_t> rows((size_t)NR * K);
  for (int n = 0, p = 0; n < N; n += NR, p++) {
    const int nr = std::min(NR, N - n);
    pack_weights<BITS>(w, n, nr, K, rows.data(), wp + (size_t)p * (K / 4) * step_bytes(BITS));
    pack_factors(s, n, nr, G, es, static_cast<uint8_t*>(sp) + (size_t)p * G * NR * es);
    pack_factors(b, n, nr, G, es, static_cast<uint8_t*>(bp) + (size_t)p * G * NR * es);
  }
}

// 8 scales or biases (float16 or float32 storage) as float32.
EDGEAI_INLINE __m256 load8(const void* p, bool half, size_t at) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + at)));
  return _mm256_loadu_ps(static_cast<const float*>(p) + at);
}

// Row i's 4 int8 values at x as a broadcast dword.
EDGEAI_INLINE __m256i x4(const int8_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return _mm256_set1_epi32(v);
}

// One block's exact int32 dot products for M rows against one quarter (8 weight rows) of a
// panel: `p` is the quarter's first step in the block (steps `SB` bytes apart), `high` takes
// the high nibbles of a 4-bit panel.
template <int M, int BITS>
EDGEAI_INLINE void block_dots(__m256i (&acc)[M], const uint8_t* p, bool high, const int8_t* xb, long ldx) {
  constexpr int SB = BITS == 4 ? kStep4 : kStep8;
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 4) {
    __m256i a[M];
    for (int i = 0; i < M; i++) a[i] = _mm256_setzero_si256();
    for (int s = 0; s < 8; s++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * SB));
      const __m256i w = _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, low4);
      for (int i = 0; i < M; i++) a[i] = _mm256_add_epi16(a[i], _mm256_maddubs_epi16(w, x4(xb + i * ldx + 4 * s)));
    }
    for (int i = 0; i < M; i++) acc[i] = _mm256_madd_epi16(a[i], ones);
  } else if constexpr (BITS == 8) {
    __m256i lo[M], hi[M];
    for (int i = 0; i < M; i++) lo[i] = hi[i] = _mm256_setzero_si256();
    for (int s = 0; s < 8; s++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * SB));
      const __m256i wl = _mm256_and_si256(v, low4), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      for (int i = 0; i < M; i++) {
        const __m256i xv = x4(xb + i * ldx + 4 * s);
        lo[i] = _mm256_add_epi16(lo[i], _mm256_maddubs_epi16(wl, xv));
        hi[i] = _mm256_add_epi16(hi[i], _mm256_maddubs_epi16(wh, xv));
      }
    }
    for (int i = 0; i < M; i++)
      acc[i] = _mm256_add_epi32(_mm256_madd_epi16(lo[i], ones), _mm256_madd_epi16(hi[i], _mm256_set1_epi16(16)));
  } else {
    for (int i = 0; i < M; i++) acc[i] = _mm256_setzero_si256();
    for (int s = 0; s < 8; s += 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + s * SB));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (s + 1) * SB));
      for (int i = 0; i < M; i++) {
        const int8_t* x = xb + i * ldx + 4 * s;
        const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x4(x)), _mm256_maddubs_epi16(w1, x4(x + 4)));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(t, ones));
      }
    }
  }
}

// y[M rows][cols <= 8 columns] = one quarter of a panel times M int8 rows over all nblk blocks.
template <int M, int BITS>
void micro(const int8_t* x, long ldx, const float* xd, const float* xs, long ldb, const uint8_t* panel, int quarter,
           const void* sp, const void* bp, bool half, int nblk, int bpg, float* y, long ldy, int cols) {
  constexpr int SB = BITS == 4 ? kStep4 : kStep8;
  // A 4-bit step's bytes 0..31 hold rows 0-7 (low nibbles) and 16-23 (high), 32..63 rows 8-15
  // and 24-31; a wider step's rows 8q .. 8q + 7 are its bytes 32q .. 32q + 31.
  const int off = BITS == 4 ? 32 * (quarter & 1) : 32 * quarter;
  const bool high = BITS == 4 && quarter >= 2;
  __m256 c[M];
  for (int i = 0; i < M; i++) c[i] = _mm256_setzero_ps();
  __m256 s = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (int blk = 0; blk < nblk; blk++) {
    if (blk % bpg == 0) {  // a new group: its scales and biases
      s = load8(sp, half, (size_t)(blk / bpg) * NR + 8 * quarter);
      b = load8(bp, half, (size_t)(blk / bpg) * NR + 8 * quarter);
    }
    __m256i acc[M];
    block_dots<M, BITS>(acc, panel + (size_t)blk * 8 * SB + off, high, x + 32 * blk, ldx);
    for (int i = 0; i < M; i++) {  // the VNNI kernel's epilogue, in its order
      const __m256 d = _mm256_set1_ps(xd[i * ldb + blk]), e = _mm256_set1_ps(xs[i * ldb + blk]);
      c[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), _mm256_mul_ps(s, d), c[i]);
      c[i] = _mm256_fmadd_ps(b, e, c[i]);
    }
  }
  for (int i = 0; i < M; i++) {
    if (cols == 8) {
      _mm256_storeu_ps(y + i * ldy, c[i]);
    } else {
      alignas(32) float t[8];
      _mm256_store_ps(t, c[i]);
      std::memcpy(y + i * ldy, t, sizeof(float) * cols);
    }
  }
}

// Rows per micro-kernel call: what fits the 16 registers (8-bit keeps two int16 sums a row).
template <int BITS>
constexpr int kMR = BITS == 8 ? 4 : 6;

// y[m0:m1, n:n+nr] from one panel (weights `panel`, factors sp/bp).
template <int BITS>
void run_panel(const QmmArgs& a, int m0, int m1, int n, int nr, const uint8_t* panel, const void* sp, const void* bp) {
  constexpr int MR = kMR<BITS>;
  const int K = a.K, nbk = K / 32, bpg = a.gs / 32;
  for (int q = 0; q < 4 && 8 * q < nr; q++) {  // a quarter's weights stay in L1 across the rows
    const int cols = std::min(8, nr - 8 * q);
    int m = m0;
    auto call = [&](auto mr) {
      constexpr int R = decltype(mr)::value;
      micro<R, BITS>(a.xq + (long)m * K, K, a.xd + (long)m * nbk, a.xs + (long)m * nbk, nbk, panel, q, sp, bp,
                     a.half_scales, nbk, bpg, a.y + (long)m * a.N + n + 8 * q, a.N, cols);
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

// Over weights packed once (QmmArgs::wp, sp, bp); n0 is a multiple of NR (the driver's tiles are).
template <int BITS>
void gemm_packed(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  const int G = a.K / a.gs, es = a.half_scales ? 2 : 4;
  const size_t panel_bytes = (size_t)(a.K / 4) * step_bytes(BITS);
  for (int n = n0; n < n1; n += NR) {
    const size_t p = n / NR;
    run_panel<BITS>(a, m0, m1, n, std::min(NR, n1 - n), a.wp + p * panel_bytes,
                    static_cast<const uint8_t*>(a.sp) + p * G * NR * es,
                    static_cast<const uint8_t*>(a.bp) + p * G * NR * es);
  }
}

}  // namespace

size_t panels_q8_bytes(int N, int K, int bits) { return (size_t)((N + NR - 1) / NR) * (K / 4) * step_bytes(bits); }

size_t panels_q8_scales(int N, int K, int gs) { return (size_t)((N + NR - 1) / NR) * (K / gs) * NR; }

void pack_panels_q8(const uint8_t* w, const void* s, const void* b, bool half, int N, int K, int gs, int bits,
                    uint8_t* wp, void* sp, void* bp) {
  switch (bits) {
    case 4: return pack<4>(w, s, b, half, N, K, K / gs, wp, sp, bp);
    case 5: return pack<5>(w, s, b, half, N, K, K / gs, wp, sp, bp);
    case 6: return pack<6>(w, s, b, half, N, K, K / gs, wp, sp, bp);
    default: return pack<8>(w, s, b, half, N, K, K / gs, wp, sp, bp);
  }
}

void gemm_q8_panels_avx2(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  switch (a.bits) {
    case 4: return gemm_packed<4>(a, m0, m1, n0, n1);
    case 5: return gemm_packed<5>(a, m0, m1, n0, n1);
    case 6: return gemm_packed<6>(a, m0, m1, n0, n1);
    default: return gemm_packed<8>(a, m0, m1, n0, n1);
  }
}

}  // namespace edgeai
