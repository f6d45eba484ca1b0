// edgeai's CPU quantized matmul as an MLX primitive: y = x @ dequant(w).T
//
// MLX's affine packing (bits 4, 5, 6 or 8, group size 32/64/128): one little-endian bit
// stream per row, element j at bits [j*bits, (j+1)*bits) (so 5- and 6-bit elements straddle
// bytes and words: see qmm_unpack.h), w = scale * q + bias.
// Two modes. Accurate: float32 activations and accumulation. Fast: activations quantized to
// int8 per block of 32, integer dot products per block, float32 across blocks (normalized MSE
// ~5e-5 vs float32): few rows (decode, small batches) by the per-row int8 tile
// (int8_tile_rows), more by the int8 GEMM where the ISA has one (qmm_gemm_q8.cpp), else in
// float32. Scales and biases are float32 or float16 (converted to float32 in registers).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "mlx/utils.h"
#include "pool.h"
#include "qmm.h"
#include "qmm_isa.h"

namespace mx = mlx::core;

namespace edgeai {

namespace {

bool cpu_has(const char* feature) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (!std::strcmp(feature, "avx512f")) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  if (!std::strcmp(feature, "avx512vnni"))
    return cpu_has("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  if (!std::strcmp(feature, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  (void)feature;
  return false;
}

QmmIsa best_isa() {
#if defined(EDGEAI_HAVE_X86_KERNELS)
#if defined(EDGEAI_HAVE_VNNI)
  if (cpu_has("avx512vnni")) return isa_avx512_vnni();
#endif
  if (cpu_has("avx512f")) return isa_avx512();
  if (cpu_has("avx2")) return isa_avx2();
#endif
  return isa_generic();
}

QmmIsa& current_isa() {
  static QmmIsa isa = best_isa();
  return isa;
}

float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { e++; man <<= 1; } while (!(man & 1024));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 1023) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int exp = int((x >> 23) & 255) - 127 + 15;
  uint32_t man = x & 0x7fffff;
  if (((x >> 23) & 255) == 255) return uint16_t(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000;
    uint32_t shift = uint32_t(14 - exp);
    uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return uint16_t(sign | h);
  }
  uint32_t h = sign | uint32_t(exp) << 10 | man >> 13, rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  // round to nearest even
  return uint16_t(h);
}

float bf16_to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffff) > 0x7f800000) return uint16_t((x >> 16) | 64);
  return uint16_t((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

float load_elem(const mx::array& x, long off) {
  switch (x.dtype()) {
    case mx::float32: return x.data<float>()[off];
    case mx::float16: return half_to_float(reinterpret_cast<const uint16_t*>(x.data<void>())[off]);
    default: return bf16_to_float(reinterpret_cast<const uint16_t*>(x.data<void>())[off]);
  }
}

// Offset of x's row m (leading dims flattened) for any strides.
long row_offset(const mx::array& x, long m) {
  long off = 0;
  for (int d = int(x.ndim()) - 2; d >= 0; d--) {
    off += (m % x.shape(d)) * long(x.strides()[d]);
    m /= x.shape(d);
  }
  return off;
}

void group_sums(const float* x, int K, int gs, float* xs) {
  for (int g = 0; g < K / gs; g++) {
    float s = 0;
    for (int k = g * gs; k < (g + 1) * gs; k++) s += x[k];
    xs[g] = s;
  }
}

// Accurate mode: a row reordered for 4-bit kernels of width W (see QmmArgs::xp).
void prepare_row(const float* x, int K, int bits, int W, float* xp) {
  if (bits != 4 || W == 1) {
    std::memcpy(xp, x, sizeof(float) * K);
    return;
  }
  for (int k0 = 0; k0 < K; k0 += 2 * W)
    for (int i = 0; i < W; i++) {
      xp[k0 + i] = x[k0 + 2 * i];
      xp[k0 + W + i] = x[k0 + 2 * i + 1];
    }
}

// One block of 32 values as int8 with its scale (*xd): in natural order at `even` when
// `natural`, else (4-bit) the 16 even-indexed values at `even` and the 16 odd ones at `odd`.
// Returns the sum of the int8 values.
inline int quantize_block(const float* xk, bool natural, int8_t* even, int8_t* odd, float* xd) {
  float amax = 0;
  for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xk[i]));
  const float id = amax > 0 ? 127.f / amax : 0.f;
  *xd = amax / 127.f;
  // Round half away from zero (as llama.cpp's roundf) in plain arithmetic: the compiler
  // vectorizes it, where nearbyint is a libm call per element on baseline x86-64.
  auto q = [id](float v) { const float r = v * id; return int8_t(r + (r >= 0.f ? 0.5f : -0.5f)); };
  int sum = 0;
  if (natural) {
    for (int i = 0; i < 32; i++) sum += even[i] = q(xk[i]);
  } else {
    for (int i = 0; i < 16; i++) sum += (even[i] = q(xk[2 * i])) + (odd[i] = q(xk[2 * i + 1]));
  }
  return sum;
}

// Fast mode: a row as int8 blocks of 32 (QmmArgs::xq order for `bits`), block scales, and
// group sums of the *quantized* row. With the exact sums the bias term would not carry the
// rounding error that the scale term does; as w = s*q + b with |b| >> |w|, the two errors
// cancel only when both see the same x (normalized MSE 5e-5 instead of 3e-4).
void prepare_row_q8(const float* x, int K, int gs, int bits, int8_t* xq, float* xd, float* xs) {
  const int nb = K / 32;
  for (int g = 0; g < K / gs; g++) xs[g] = 0.f;
  for (int k = 0; k < nb; k++) {
    int8_t* even = bits != 4 ? xq + 32 * k : xq + q4_even_at(k, nb);
    const int sum = quantize_block(x + 32 * k, bits != 4, even, even + q4_odd_gap(k, nb), xd + k);
    xs[32 * k / gs] += xd[k] * float(sum);
  }
}

// Fast mode's GEMM (many rows, QmmIsa::gemm_q8): a row as int8 blocks of 32 in the GEMM's
// order (4-bit: each block's 16 even-indexed elements, then its 16 odd ones; otherwise
// natural), block scales xd, and per-block sums xd * sum(q) of the quantized row (see
// prepare_row_q8 for why of the quantized one).
void prepare_row_q8_gemm(const float* x, int K, int bits, int8_t* xq, float* xd, float* xs) {
  for (int k = 0; k < K / 32; k++) {
    int8_t* qk = xq + 32 * k;
    const int sum = quantize_block(x + 32 * k, bits != 4, qk, qk + 16, xd + k);
    xs[k] = xd[k] * float(sum);
  }
}

void store_out(mx::array& out, const float* y, long n) {
  switch (out.dtype()) {
    case mx::float32: return;  // computed in place
    case mx::float16: {
      auto* o = reinterpret_cast<uint16_t*>(out.data<void>());
      for (long i = 0; i < n; i++) o[i] = float_to_half(y[i]);
      return;
    }
    default: {
      auto* o = reinterpret_cast<uint16_t*>(out.data<void>());
      for (long i = 0; i < n; i++) o[i] = float_to_bf16(y[i]);
    }
  }
}

// Decode tasks per thread: few enough for sequential streams, enough to even out a thread
// that loses its core for a while.
constexpr int kDecodeTasksPerThread = 4;

// Activations prepared once for every layer of one layout (4-bit or not, group size) in a call.
struct Prepared {
  int bits = 0, gs = 0;
  std::vector<float> xp, xs, xd;
  std::vector<int8_t> xq;
};

void run_qmm(const mx::array& x, const mx::array& w, const mx::array& s, const mx::array& b, mx::array& out,
             int gs, int bits, bool fast, const mx::array* panels) {
  thread_local std::vector<float> x_buf, y_buf;
  const int K = x.shape(-1), N = w.shape(0);
  const long M = x.size() / K;
  const float* xr = float_rows(x, x_buf);
  float* y = out.dtype() == mx::float32 ? out.data<float>() : (y_buf.resize(M * N), y_buf.data());
  const QLinear l = with_panels(qlinear(w, s, b, gs, bits), panels);
  qmm_rows(xr, M, K, &l, 1, &y, fast, is_decode_step(x));
  store_out(out, y, M * N);
}

}  // namespace

// x (any float dtype, any strides) as contiguous float32 rows: x's own buffer when it
// already is one, else a converted copy in `tmp`.
const float* float_rows(const mx::array& x, std::vector<float>& tmp) {
  const int K = x.shape(-1);
  const long M = x.size() / K;
  if (x.dtype() == mx::float32 && x.flags().row_contiguous) return x.data<float>();
  tmp.resize(M * K);
  const long ks = long(x.strides().back());
  for (long m = 0; m < M; m++) {
    const long base = row_offset(x, m);
    float* dst = tmp.data() + m * K;
    if (x.dtype() == mx::float32) {
      const float* src = x.data<float>() + base;
      for (int k = 0; k < K; k++) dst[k] = src[k * ks];
    } else {
      for (int k = 0; k < K; k++) dst[k] = load_elem(x, base + k * ks);
    }
  }
  return tmp.data();
}

QLinear qlinear(const mx::array& w, const mx::array& s, const mx::array& b, int gs, int bits) {
  return {w.data<uint8_t>(), s.data<void>(), b.data<void>(), int(w.shape(0)), int(w.shape(1) * 32 / bits), gs, bits,
          s.dtype() == mx::float16};
}

QLinear with_panels(QLinear l, const mx::array* panels) {
  if (panels != nullptr) l.wp = panels[0].data<uint8_t>(), l.sp = panels[1].data<void>(), l.bp = panels[2].data<void>();
  return l;
}

void check_panels(const char* op, const mx::array& w, const mx::array& s, int gs, int bits,
                  const std::vector<mx::array>& panels) {
  auto fail = [op](const std::string& m) { throw std::invalid_argument(std::string("edgeai ") + op + ": " + m); };
  if (panels.size() != 3) fail("give a layer's panels as pack_q8 returns them: [weights, scales, biases]");
  const int N = w.shape(0), K = int(long(w.shape(1)) * 32 / bits);
  const long scales = long(panels_q8_scales(N, K, gs));
  if (panels[0].dtype() != mx::uint8 || panels[0].ndim() != 1 || panels[0].size() != panels_q8_bytes(N, K, bits) ||
      panels[1].dtype() != s.dtype() || panels[2].dtype() != s.dtype() || panels[1].ndim() != 1 ||
      panels[2].ndim() != 1 || long(panels[1].size()) != scales || long(panels[2].size()) != scales)
    fail("panels do not belong to these weights (made by pack_q8 for another layer or format?)");
}

std::vector<mx::array> pack_q8(const mx::array& w, const mx::array& scales, const mx::array& biases, int group_size,
                               int bits) {
  if (!has_int8_panels()) throw std::invalid_argument("edgeai pack_q8: this CPU has no int8 GEMM on panels (int8_panels())");
  // Same checks as the matmul itself (shapes, dtypes, formats).
  auto x = mx::zeros({1, int(long(w.shape(1)) * 32 / bits)}, mx::float32);
  quantized_matmul(x, w, scales, biases, group_size, bits, true);
  auto wc = mx::contiguous(w), sc = mx::contiguous(scales), bc = mx::contiguous(biases);
  mx::eval({wc, sc, bc});
  const int N = w.shape(0), K = int(long(w.shape(1)) * 32 / bits);
  const size_t nw = panels_q8_bytes(N, K, bits), ns = panels_q8_scales(N, K, group_size);
  const size_t es = mx::size_of(scales.dtype());
  mx::array wp(mx::allocator::malloc(nw), {int(nw)}, mx::uint8);
  mx::array sp(mx::allocator::malloc(ns * es), {int(ns)}, scales.dtype());
  mx::array bp(mx::allocator::malloc(ns * es), {int(ns)}, scales.dtype());
  pack_panels_q8(wc.data<uint8_t>(), sc.data<void>(), bc.data<void>(), scales.dtype() == mx::float16, N, K, group_size,
                 bits, wp.data<uint8_t>(), sp.data<void>(), bp.data<void>());
  return {wp, sp, bp};
}

void qmm_rows(const float* x, long M, int K, const QLinear* ls, int n, float* const* ys, bool fast, bool decode) {
  const QmmIsa isa = current_isa();
  bool panels = isa.gemm_q8_panels != nullptr;
  for (int i = 0; i < n; i++) panels = panels && ls[i].wp != nullptr;
  // AVX2 has panels only for batches' decode steps: its prompts keep float32 (see isa_avx2).
  const bool q8p = fast && panels && M >= kQ8PanelRows && (decode || isa.gemm_q8 != nullptr);
  const bool q8 = fast && !q8p && M <= int8_tile_rows(decode);
  // The int8 GEMM: over the layers' panels (q8p), or unpacking the weights as it goes.
  const bool q8g = fast && !q8 && (q8p || (M >= kQ8GemmRows && isa.gemm_q8 != nullptr));
  thread_local std::vector<Prepared> preps(4);
  std::vector<int> prep_of(n);
  int np = 0;
  for (int i = 0; i < n; i++) {
    int j = 0;
    // 5, 6 and 8-bit layers read the same natural-order activations; 4-bit its own order.
    while (j < np && !((preps[j].bits == 4) == (ls[i].bits == 4) && preps[j].gs == ls[i].gs)) j++;
    if (j == np) {
      if (np == int(preps.size())) preps.resize(np + 1);
      Prepared& p = preps[np++];
      p.bits = ls[i].bits, p.gs = ls[i].gs;
      const int G = K / p.gs;
      p.xs.resize(M * G);
      if (q8g) {
        p.xq.resize(M * K);
        p.xd.resize(M * K / 32);
        p.xs.resize(M * K / 32);
        // Many rows: quantize them on every thread (a 512-token prompt's MLP input is 4.6M values).
        const int chunk = 16, tasks = int((M + chunk - 1) / chunk);
        auto rows = [&](int t) {
          for (long m = long(t) * chunk; m < std::min<long>(M, long(t + 1) * chunk); m++)
            prepare_row_q8_gemm(x + m * K, K, p.bits, p.xq.data() + m * K, p.xd.data() + m * K / 32,
                                p.xs.data() + m * K / 32);
        };
        if (tasks > 1) Pool::get().run(tasks, rows);
        else rows(0);
      } else if (q8) {
        p.xq.resize(M * K);
        p.xd.resize(M * K / 32);
        for (long m = 0; m < M; m++)
          prepare_row_q8(x + m * K, K, p.gs, p.bits, p.xq.data() + m * K, p.xd.data() + m * K / 32, p.xs.data() + m * G);
      } else {
        p.xp.resize(M * K);
        for (long m = 0; m < M; m++) {
          group_sums(x + m * K, K, p.gs, p.xs.data() + m * G);
          prepare_row(x + m * K, K, p.bits, isa.width, p.xp.data() + m * K);
        }
      }
    }
    prep_of[i] = j;
  }
  std::vector<QmmArgs> args(n);
  std::vector<int> first(n + 1, 0);  // first task of each layer
  // Decode (row by row): split N only, into few long runs of rows per thread, so each
  // thread streams its weights sequentially (short tasks interleave the threads' rows and
  // defeat the hardware prefetcher). Prefill: 16 weight rows x 64 activation rows per task.
  const bool by_row = q8 || (M < 4 && !q8g);
  int total_n = 0;
  for (int i = 0; i < n; i++) total_n += ls[i].N;
  // Prompts (Kernel::gemm): wider tasks, weight panels of 2W rows, up to 256 x rows.
  // The int8 GEMMs' tiles start on their 32-row panels.
  const int threads = Pool::get().threads(), nr = q8g ? std::max(32, 2 * isa.width) : 2 * isa.width;
  const bool gemm = q8g || (!by_row && isa.width > 1 && M >= kGemmRows);
  const int nb = by_row ? std::max(32, (total_n / (threads * kDecodeTasksPerThread)) / 4 * 4)
                 : gemm ? std::max(nr, (total_n / (threads * 4)) / nr * nr) : 16;
  const int mb = by_row ? int(M) : gemm ? 256 : 64;
  const int tm = int((M + mb - 1) / mb);
  double work = 0;
  for (int i = 0; i < n; i++) {
    Prepared& p = preps[prep_of[i]];
    const QLinear& l = ls[i];
    const bool i8 = q8 || q8g;
    args[i] = QmmArgs{i8 ? nullptr : p.xp.data(), p.xs.data(), l.w, l.s, l.b, ys[i], int(M), l.N, K, l.gs, l.bits,
                      l.half, i8 ? p.xq.data() : nullptr, i8 ? p.xd.data() : nullptr, l.wp, l.sp, l.bp};
    first[i + 1] = first[i] + tm * ((l.N + nb - 1) / nb);
    work += double(M) * l.N * K;
  }
  const QmmTileFn tile = q8p ? isa.gemm_q8_panels : q8g ? isa.gemm_q8 : q8 ? isa.tile_q8 : isa.tile;
  auto task = [&](int t) {
    int i = 0;
    while (t >= first[i + 1]) i++;
    const QmmArgs& a = args[i];
    const int local = t - first[i], tn = (a.N + nb - 1) / nb;
    const int n0 = (local % tn) * nb, m0 = (local / tn) * mb;
    tile(a, m0, int(std::min<long>(M, m0 + mb)), n0, std::min(a.N, n0 + nb));
  };
  if (work < 150000) {  // too small to be worth waking the workers
    for (int t = 0; t < first[n]; t++) task(t);
  } else {
    Pool::get().run(first[n], task);
  }
}

namespace {

class QuantMatmul : public mx::UnaryPrimitive {
 public:
  QuantMatmul(mx::Stream stream, int group_size, int bits, bool fast)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits), fast_(fast) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) enc.set_input_array(in);
    enc.set_output_array(out);
    // inputs: x, w, scales, biases, then optionally the layer's panels (pack_q8).
    enc.dispatch([in = inputs, out = out, gs = group_size_, bits = bits_, fast = fast_]() mutable {
      run_qmm(in[0], in[1], in[2], in[3], out, gs, bits, fast, in.size() == 7 ? &in[4] : nullptr);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai quantized_matmul runs on the CPU only");
  }

  const char* name() const override { return "EdgeaiQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantMatmul&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && fast_ == o.fast_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int group_size_, bits_;
  bool fast_;
};

}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales,
                           const mx::array& biases, int group_size, int bits, bool fast,
                           const std::vector<mx::array>& panels) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("edgeai quantized_matmul: " + m); };
  if (bits != 4 && bits != 5 && bits != 6 && bits != 8)
    fail("bits must be 4, 5, 6 or 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    fail("group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  if (x.ndim() < 1 || w.ndim() != 2 || scales.ndim() != 2 || biases.ndim() != 2) fail("expected x[..., K], 2-D w, scales, biases");
  if (x.dtype() != mx::float32 && x.dtype() != mx::float16 && x.dtype() != mx::bfloat16)
    fail("x must be float32, float16 or bfloat16");
  if (w.dtype() != mx::uint32) fail("w must be uint32 (MLX packing)");
  if ((scales.dtype() != mx::float32 && scales.dtype() != mx::float16) || biases.dtype() != scales.dtype())
    fail("scales and biases must both be float32 or both float16");
  const int K = x.shape(-1), N = w.shape(0);
  if (K % group_size) fail("K=" + std::to_string(K) + " is not a multiple of the group size");
  if (long(w.shape(1)) * 32 != long(K) * bits)
    fail("w has " + std::to_string(w.shape(1)) + " words per row; K=" + std::to_string(K) + " needs " +
         std::to_string(K * bits / 32));
  if (scales.shape(0) != N || scales.shape(1) != K / group_size || biases.shape() != scales.shape())
    fail("scales/biases must be [N, K/group_size]");
  auto shape = x.shape();
  shape.back() = N;
  auto stream = mx::default_stream(mx::Device(mx::Device::cpu));
  // Weights and scales are evaluated, contiguous parameters: no extra graph node for them
  // (each node costs dispatch time at decode); anything else gets a contiguous copy.
  auto contig = [&](const mx::array& a) {
    return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, stream);
  };
  auto wc = contig(w), sc = contig(scales), bc = contig(biases);
  std::vector<mx::array> in = {x, wc, sc, bc};
  if (!panels.empty()) {
    check_panels("quantized_matmul", w, scales, group_size, bits, panels);
    for (const auto& p : panels) in.push_back(contig(p));
  }
  return mx::array(shape, x.dtype(), std::make_shared<QuantMatmul>(stream, group_size, bits, fast), in);
}

std::string isa_name() { return current_isa().name; }

bool has_int8_gemm() { return current_isa().gemm_q8 != nullptr; }
bool has_int8_panels() { return current_isa().gemm_q8_panels != nullptr; }

int int8_tile_rows(bool decode) {
  const QmmIsa isa = current_isa();
  return isa.tile_q8 == nullptr ? 0 : decode ? isa.q8_decode_rows : kMaxQ8Rows;
}

QmmIsa active_isa() { return current_isa(); }

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
#if defined(EDGEAI_HAVE_X86_KERNELS)
#if defined(EDGEAI_HAVE_VNNI)
  if (cpu_has("avx512vnni")) out.push_back("avx512vnni");
#endif
  if (cpu_has("avx512f")) out.push_back("avx512");
  if (cpu_has("avx2")) out.push_back("avx2");
#endif
  out.push_back("generic");
  return out;
}

void set_isa(const std::string& name) {
#if defined(EDGEAI_HAVE_X86_KERNELS)
#if defined(EDGEAI_HAVE_VNNI)
  if (name == "avx512vnni" && cpu_has("avx512vnni")) { current_isa() = isa_avx512_vnni(); return; }
#endif
  if (name == "avx512" && cpu_has("avx512f")) { current_isa() = isa_avx512(); return; }
  if (name == "avx2" && cpu_has("avx2")) { current_isa() = isa_avx2(); return; }
#endif
  if (name == "generic") { current_isa() = isa_generic(); return; }
  if (name == "auto") { current_isa() = best_isa(); return; }
  throw std::invalid_argument("edgeai: instruction set '" + name + "' is not available on this CPU");
}

int threads() { return Pool::get().threads(); }
void set_threads(int n) { Pool::get().resize(n); }

}  // namespace edgeai
