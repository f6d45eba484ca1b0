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
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static float sum(reg v) { return v; }
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
};

#include "qmm_impl.h"
#include "attn_impl.h"

void tile(const QmmArgs& a, int m0, int m1, int n0, int n1) { Kernel<V1>::tile(a, m0, m1, n0, n1); }
void attn(const AttnArgs& a, int t) { Attention<V1>::task(a, t); }

}  // namespace

QmmIsa isa_generic() { return {"generic", 1, tile, attn}; }

}  // namespace edgeai
