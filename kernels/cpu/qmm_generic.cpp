// Portable C++ kernels (any CPU). Built with -O3, so on aarch64 the compiler
// auto-vectorizes the loops to NEON; there is no hand-written NEON variant yet.
#include <math.h>

#include "qmm_isa.h"

#include <cstring>

namespace edgeai {
namespace {

struct V1 {
  using reg = float;
  static constexpr int W = 1;
  static reg zero() { return 0.f; }
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg v) { *p = v; }
  static reg set1(float v) { return v; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg add(reg a, reg b) { return a + b; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static float sum(reg v) { return v; }
  static void transpose(reg*) {}  // 1 x 1
  static void h2f_n(const uint16_t* p, float* out, int n) {
    for (int i = 0; i < n; i++) out[i] = h2f(p[i]);
  }
  static float h2f(uint16_t h) {  // IEEE half -> float, subnormals included
    uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0 && man == 0) {
      bits = sign;
    } else if (exp == 0) {
      int e = -1;
      do { e++; man <<= 1; } while (!(man & 1024));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 1023) << 13;
    } else {
      bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  // One byte = elements 2i (low nibble) and 2i+1 (high nibble): natural order.
  static void q4(const uint8_t* p, reg& lo, reg& hi) {
    lo = float(*p & 15);
    hi = float(*p >> 4);
  }
  static void q8(const uint8_t* p, reg& a, reg& b) {
    a = float(p[0]);
    b = float(p[1]);
  }
  // Element e of a row in MLX's bit stream (bits [e*BITS, (e+1)*BITS)); reads no byte past it.
  template <int BITS>
  static int elem(const uint8_t* row, int e) {
    const int bit = e * BITS, i = bit / 8, s = bit % 8;
    unsigned v = unsigned(row[i]) >> s;
    if (s + BITS > 8) v |= unsigned(row[i + 1]) << (8 - s);
    return int(v & ((1u << BITS) - 1));
  }
  template <int BITS>
  static void qb(const uint8_t* row, int e, reg& a, reg& b) {
    a = float(elem<BITS>(row, e));
    b = float(elem<BITS>(row, e + 1));
  }
};

#include "qmm_impl.h"
#include "attn_impl.h"

void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) { Kernel<V1>::tile(a, m0, m1, n0, n1); }
void attn(const AttnArgs& a, int t) { Attention<V1>::task(a, t); }

// Fast mode: integer dot products per block of 32 (see QmmArgs::xq).
// Written so the compiler can vectorize the inner loop (NEON sdot-style on aarch64).
void tile_q8(const QmmArgs& a, int m0, int m1, int n0, int n1) {
  const int K = a.K, G = K / a.gs, nb = K / 32, bpg = a.gs / 32, rb = K * a.bits / 8;
  auto scale = [&](const void* p, long i) {
    return a.half_scales ? V1::h2f(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
  };
  for (int m = m0; m < m1; m++) {
    const int8_t* xq = a.xq + (long)m * K;
    const float* xd = a.xd + (long)m * nb;
    const float* xs = a.xs + (long)m * G;
    for (int n = n0; n < n1; n++) {
      const uint8_t* w = a.w + (long)n * rb;
      float acc = 0;
      for (int g = 0; g < G; g++) {
        const float sg = scale(a.s, (long)n * G + g);
        for (int k = g * bpg; k < (g + 1) * bpg; k++) {
          int32_t dot = 0;
          if (a.bits == 4) {
            const uint8_t* p = w + k * 16;
            const int8_t* even = xq + q4_even_at(k, nb);
            const int8_t* odd = even + q4_odd_gap(k, nb);
            for (int i = 0; i < 16; i++) dot += int32_t(p[i] & 15) * even[i] + int32_t(p[i] >> 4) * odd[i];
          } else if (a.bits == 8) {
            const uint8_t* p = w + k * 32;
            const int8_t* q = xq + k * 32;
            for (int i = 0; i < 32; i++) dot += int32_t(p[i]) * q[i];
          } else {  // 5 or 6 bits, activations in natural order
            const int8_t* q = xq + k * 32;
            for (int i = 0; i < 32; i++)
              dot += (a.bits == 5 ? V1::elem<5>(w, 32 * k + i) : V1::elem<6>(w, 32 * k + i)) * q[i];
          }
          acc += sg * xd[k] * float(dot);
        }
      }
      for (int g = 0; g < G; g++) acc += scale(a.b, (long)n * G + g) * xs[g];
      a.y[(long)m * a.N + n] = acc;
    }
  }
}

}  // namespace

QmmIsa isa_generic() { return {"generic", 1, tile, attn, tile_q8}; }

}  // namespace edgeai
