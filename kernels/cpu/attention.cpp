// edgeai's CPU attention as an MLX primitive: softmax(q k^T * scale [+ causal]) v, float32.
//
// MLX's CPU scaled_dot_product_attention goes through generic matmuls (a reference BLAS
// in the Linux wheel); this one is SIMD, multi-threaded, and reads the KV cache in place
// through its strides (the cache hands out strided slices of a larger buffer).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "pool.h"
#include "qmm.h"
#include "qmm_isa.h"

namespace mx = mlx::core;

namespace edgeai {

QmmIsa active_isa();

namespace {

// A row-contiguous copy when the last dim is strided (rare: the model's tensors never are).
const float* unit_stride(const mx::array& a, std::vector<float>& tmp, long* strides) {
  for (int d = 0; d < 3; d++) strides[d] = long(a.strides()[d]);
  if (a.strides()[3] == 1) return a.data<float>();
  const int D = a.shape(3);
  tmp.resize(size_t(a.shape(0)) * a.shape(1) * a.shape(2) * D);
  long i = 0;
  for (int b = 0; b < a.shape(0); b++)
    for (int h = 0; h < a.shape(1); h++)
      for (int s = 0; s < a.shape(2); s++)
        for (int d = 0; d < D; d++)
          tmp[i++] = a.data<float>()[b * a.strides()[0] + h * a.strides()[1] + s * a.strides()[2] + d * a.strides()[3]];
  strides[0] = long(a.shape(1)) * a.shape(2) * D;
  strides[1] = long(a.shape(2)) * D;
  strides[2] = D;
  return tmp.data();
}

// Merges the decode tasks' partial softmaxes: out = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) s_c,
// chunks in order (a row's chunks past its keys add exact zeros).
void merge_chunks(const AttnArgs& a) {
  const int G = a.Hq / a.Hkv, D = a.D;
  for (int bi = 0; bi < a.B; bi++)
    for (int h = 0; h < a.Hq; h++) {
      const float* first = a.part + (long(bi * a.Hkv + h / G) * a.chunks * G + h % G) * (D + 2);
      const long step = long(G) * (D + 2);  // to the same query head in the next chunk
      float m = -INFINITY;
      for (int c = 0; c < a.chunks; c++) m = std::max(m, first[c * step]);
      float* out = a.out + (long(bi) * a.Hq + h) * D;
      std::fill(out, out + D, 0.f);
      if (m == -INFINITY) continue;  // a padding row sees no key: zeros
      float total = 0.f;
      for (int c = 0; c < a.chunks; c++) {
        const float* p = first + c * step;
        const float f = p[0] == -INFINITY ? 0.f : std::exp(p[0] - m);
        total += f * p[1];
        for (int d = 0; d < D; d++) out[d] += f * p[2 + d];
      }
      const float inv = 1.f / total;
      for (int d = 0; d < D; d++) out[d] *= inv;
    }
}

}  // namespace

void run_attention_tasks(const QmmIsa& isa, AttnArgs& a) {
  thread_local std::vector<float> part;
  a.block = a.L > 64 ? 16 : (a.L > 8 ? 4 : 1);
  a.part = nullptr;
  int tasks = a.B * a.Hq * ((a.L + a.block - 1) / a.block);
  if (a.L == 1) {
    int longest = 0;
    for (int bi = 0; bi < a.B; bi++) longest = std::max(longest, a.S - (a.start ? a.start[bi] : 0));
    a.chunks = std::max(1, (longest + kDecodeKeys - 1) / kDecodeKeys);
    tasks = a.B * a.Hkv * a.chunks;
    part.resize(size_t(tasks) * (a.Hq / a.Hkv) * (a.D + 2));
    a.part = part.data();
  }
  const double work = double(a.B) * a.Hq * a.L * a.S * a.D;
  if (work < 100000) {
    for (int t = 0; t < tasks; t++) isa.attention(a, t);
  } else {
    Pool::get().run(tasks, [&](int t) { isa.attention(a, t); });
  }
  if (a.part) merge_chunks(a);
}

namespace {

void run_attention(const mx::array& q, const mx::array& k, const mx::array& v, mx::array& out, float scale,
                   bool causal) {
  const QmmIsa isa = active_isa();
  std::vector<float> tq, tk, tv;
  AttnArgs a{};
  a.q = unit_stride(q, tq, a.qs);
  a.k = unit_stride(k, tk, a.ks);
  a.v = unit_stride(v, tv, a.vs);
  a.out = out.data<float>();
  a.B = q.shape(0), a.Hq = q.shape(1), a.L = q.shape(2), a.D = q.shape(3);
  a.Hkv = k.shape(1), a.S = k.shape(2);
  a.scale = scale, a.causal = causal;
  run_attention_tasks(isa, a);
}

class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream stream, float scale, bool causal) : mx::UnaryPrimitive(stream), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) enc.set_input_array(in);
    enc.set_output_array(out);
    enc.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], out = out, scale = scale_, causal = causal_]() mutable {
      run_attention(q, k, v, out, scale, causal);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai attention runs on the CPU only");
  }

  const char* name() const override { return "EdgeaiAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Attention&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto& q = inputs[0];
    return {{q.shape(0), q.shape(2), q.shape(1), q.shape(3)}};
  }

 private:
  float scale_;
  bool causal_;
};

}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("edgeai attention: " + m); };
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) fail("expected q, k, v of shape [B, H, L, D]");
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32) fail("q, k, v must be float32");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3)) fail("q, k, v shapes disagree");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1)) fail("query heads must be a multiple of key/value heads");
  if (q.shape(3) % 16) fail("head dim must be a multiple of 16");
  if (causal && q.shape(2) > k.shape(2)) fail("causal attention needs at least as many keys as queries");
  auto stream = mx::default_stream(mx::Device(mx::Device::cpu));
  // Output [B, L, Hq, D]: what the output projection reads after a free reshape.
  return mx::array({q.shape(0), q.shape(2), q.shape(1), q.shape(3)}, mx::float32,
                   std::make_shared<Attention>(stream, scale, causal), {q, k, v});
}

}  // namespace edgeai
