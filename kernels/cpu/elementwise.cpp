// RMSNorm and RoPE as single MLX primitives for the CPU.
//
// On the CPU, mx.fast.rms_norm / mx.fast.rope run as their composed fallbacks: about a
// dozen graph nodes each (square, sum, rsqrt, broadcasts; arange, cos, sin, concatenate),
// i.e. ~2,000 of the ~3,800 nodes of one SmolLM2 decode step. Per-node dispatch cost, not
// arithmetic, is what they cost at decode; one node each removes it. Scalar loops: the
// compiler vectorizes them and they are a negligible share of the FLOPs.
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

namespace mx = mlx::core;

namespace edgeai {

namespace {

// Element offset of row `r` (all dims but the last, flattened) for any strides.
long row_start(const mx::array& a, long r, int last_dims = 1) {
  long off = 0;
  for (int d = int(a.ndim()) - 1 - last_dims; d >= 0; d--) {
    off += (r % a.shape(d)) * long(a.strides()[d]);
    r /= a.shape(d);
  }
  return off;
}

void run_rms_norm(const mx::array& x, const mx::array& w, mx::array& out, float eps) {
  thread_local std::vector<float> xt, wt;
  const int D = x.shape(-1);
  rms_norm_rows(float_rows(x, xt), long(x.size() / D), D, float_rows(w, wt), eps, out.data<float>());
}

// x [..., L, D]: rows are positions along axis -2 (offset + index), as mx.fast.rope.
void run_rope(const mx::array& x, mx::array& out, int dims, bool traditional, float base, float scale, int offset) {
  const int D = x.shape(-1), L = x.shape(-2), half = dims / 2;
  const long rows = x.size() / D, xs = long(x.strides().back());
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; i++) inv_freq[i] = std::pow(base, -float(2 * i) / float(dims));
  const float* xp = x.data<float>();
  float* o = out.data<float>();
  for (long r = 0; r < rows; r++) {
    const float* xr = xp + row_start(x, r);
    float* orow = o + r * D;
    const float pos = float(offset + int(r % L)) * scale;
    for (int i = 0; i < half; i++) {
      const float th = pos * inv_freq[i], c = std::cos(th), s = std::sin(th);
      const int a = traditional ? 2 * i : i, b = traditional ? 2 * i + 1 : i + half;
      const float x1 = xr[a * xs], x2 = xr[b * xs];
      orow[a] = x1 * c - x2 * s;
      orow[b] = x1 * s + x2 * c;
    }
    for (int d = dims; d < D; d++) orow[d] = xr[d * xs];
  }
}

class RMSNorm : public mx::UnaryPrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_input_array(in[1]);
    enc.set_output_array(out);
    enc.dispatch([x = in[0], w = in[1], out = out, eps = eps_]() mutable { run_rms_norm(x, w, out, eps); });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai rms_norm runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiRMSNorm"; }
  bool is_equivalent(const mx::Primitive& o) const override { return eps_ == static_cast<const RMSNorm&>(o).eps_; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float eps_;
};

class Rope : public mx::UnaryPrimitive {
 public:
  Rope(mx::Stream s, int dims, bool traditional, float base, float scale, int offset)
      : mx::UnaryPrimitive(s), dims_(dims), traditional_(traditional), base_(base), scale_(scale), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    enc.set_output_array(out);
    enc.dispatch([x = in[0], out = out, d = dims_, t = traditional_, b = base_, s = scale_, off = offset_]() mutable {
      run_rope(x, out, d, t, b, s, off);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai rope runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiRope"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rope&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ && scale_ == o.scale_ &&
           offset_ == o.offset_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  int offset_;
};

// log_softmax over the last axis plus each row's entropy, in one read of the logits for
// the exponentials: with S = sum e^(l-m) and T = sum e^(l-m) l (m the row max),
// logsumexp = m + log S and entropy = -sum p log p = logsumexp - T / S. At decode this is
// the vocabulary-wide work of every step (49k entries for SmolLM2), which MLX runs as
// several single-threaded passes.
void run_log_softmax(const mx::array& x, mx::array& lp, mx::array& ent) {
  const int V = x.shape(-1);
  const long rows = x.size() / V;
  const float* xp = x.data<float>();
  float* out = lp.data<float>();
  float* h = ent.data<float>();
  auto& pool = Pool::get();
  const int chunks = std::max(1, std::min(pool.threads() * 2, V / 4096));
  const int per = (V + chunks - 1) / chunks;
  std::vector<float> cm(chunks);
  std::vector<double> cs(chunks), ct(chunks);
  for (long r = 0; r < rows; r++) {
    const float* l = xp + row_start(x, r);
    pool.run(chunks, [&](int c) {
      const int a = c * per, b = std::min(V, a + per);
      float m = -INFINITY;
      for (int i = a; i < b; i++) m = std::max(m, l[i]);
      double S = 0, T = 0;
      if (m > -INFINITY)
        for (int i = a; i < b; i++) {
          const float e = std::exp(l[i] - m);
          if (e > 0.f) S += e, T += double(e) * l[i];
        }
      cm[c] = m, cs[c] = S, ct[c] = T;
    });
    float m = -INFINITY;
    for (int c = 0; c < chunks; c++) m = std::max(m, cm[c]);
    double S = 0, T = 0;
    for (int c = 0; c < chunks; c++)
      if (cs[c] > 0) {
        const double f = std::exp(double(cm[c]) - m);
        S += cs[c] * f, T += ct[c] * f;
      }
    const float lse = float(m + std::log(S));
    h[r] = float(double(lse) - T / S);
    float* o = out + r * V;
    pool.run(chunks, [&](int c) {
      for (int i = c * per; i < std::min(V, (c + 1) * per); i++) o[i] = l[i] - lse;
    });
  }
}

class LogSoftmax : public mx::Primitive {
 public:
  explicit LogSoftmax(mx::Stream s) : mx::Primitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    for (auto& o : outs) enc.set_output_array(o);
    enc.dispatch([x = in[0], lp = outs[0], h = outs[1]]() mutable { run_log_softmax(x, lp, h); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeai log_softmax runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiLogSoftmax"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// The k largest entries of each row with their indices, largest first (ties: the lower
// index first; NaNs never chosen while other entries remain), in one multi-threaded read.
// A request's alternatives (the gate's top 2, top_logprobs <= 20) are a few of 49k-152k
// logits: MLX's argpartition partitions a copy of the row's indices on one thread (0.84 ms a
// call on 49k logits, this 0.24 with the same dispatch cost).
void run_top_k(const mx::array& x, int k, mx::array& idx, mx::array& val) {
  const int V = x.shape(-1);
  const long rows = x.size() / V;
  auto& pool = Pool::get();
  const int chunks = std::max(1, std::min(pool.threads() * 2, V / 4096));
  const int per = (V + chunks - 1) / chunks;
  std::vector<float> cv(long(chunks) * k);
  std::vector<int> ci(long(chunks) * k), cn(chunks);
  for (long r = 0; r < rows; r++) {
    const float* l = x.data<float>() + row_start(x, r);
    pool.run(chunks, [&](int c) {
      float* bv = cv.data() + long(c) * k;
      int* bi = ci.data() + long(c) * k;
      int n = 0;
      float thr = -INFINITY;
      for (int i = c * per; i < std::min(V, (c + 1) * per); i++) {
        const float v = l[i];
        if (!(v > thr) && (n == k || v != v)) continue;  // most entries: one compare
        int j = n < k ? n++ : k - 1;
        for (; j > 0 && bv[j - 1] < v; j--) bv[j] = bv[j - 1], bi[j] = bi[j - 1];
        bv[j] = v, bi[j] = i;
        if (n == k) thr = bv[k - 1];
      }
      cn[c] = n;
    });
    std::vector<std::pair<float, int>> all;
    for (int c = 0; c < chunks; c++)
      for (int j = 0; j < cn[c]; j++) all.emplace_back(cv[long(c) * k + j], ci[long(c) * k + j]);
    // Rows of NaNs only (a broken model) still name k entries: the lowest indices.
    for (int i = 0; int(all.size()) < k; i++)
      if (std::none_of(all.begin(), all.end(), [i](auto& p) { return p.second == i; }))
        all.emplace_back(l[i], i);
    std::partial_sort(all.begin(), all.begin() + k, all.end(), [](auto& a, auto& b) {
      const bool an = a.first != a.first, bn = b.first != b.first;
      if (an != bn) return bn;  // numbers before NaNs
      if (!an && a.first != b.first) return a.first > b.first;
      return a.second < b.second;
    });
    for (int j = 0; j < k; j++) {
      idx.data<int32_t>()[r * k + j] = all[j].second;
      val.data<float>()[r * k + j] = all[j].first;
    }
  }
}

class TopK : public mx::Primitive {
 public:
  TopK(mx::Stream s, int k) : mx::Primitive(s), k_(k) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(in[0]);
    for (auto& o : outs) enc.set_output_array(o);
    enc.dispatch([x = in[0], i = outs[0], v = outs[1], k = k_]() mutable { run_top_k(x, k, i, v); });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeai top_k runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiTopK"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return k_ == static_cast<const TopK&>(other).k_;
  }

 private:
  int k_;
};

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

}  // namespace

void rms_norm_rows(const float* x, long M, int D, const float* w, float eps, float* out) {
  for (long m = 0; m < M; m++) {
    const float* xr = x + m * D;
    float ss = 0.f;
    for (int d = 0; d < D; d++) ss += xr[d] * xr[d];
    const float inv = 1.f / std::sqrt(ss / float(D) + eps);
    for (int d = 0; d < D; d++) out[m * D + d] = xr[d] * inv * w[d];
  }
}

std::vector<mx::array> log_softmax(const mx::array& x) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("edgeai log_softmax: float32 only");
  if (x.ndim() < 1 || x.shape(-1) == 0) throw std::invalid_argument("edgeai log_softmax: need x[..., V] with V > 0");
  if (x.strides().back() != 1) throw std::invalid_argument("edgeai log_softmax: the last axis must be contiguous");
  auto rows = x.shape();
  rows.pop_back();
  return mx::array::make_arrays({x.shape(), rows}, {mx::float32, mx::float32}, std::make_shared<LogSoftmax>(cpu_stream()),
                                {x});
}

std::vector<mx::array> top_k(const mx::array& x, int k) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("edgeai top_k: float32 only");
  if (x.ndim() < 1 || k < 1 || k > x.shape(-1))
    throw std::invalid_argument("edgeai top_k: need x[..., V] and 1 <= k <= V");
  if (x.strides().back() != 1) throw std::invalid_argument("edgeai top_k: the last axis must be contiguous");
  auto shape = x.shape();
  shape.back() = k;
  return mx::array::make_arrays({shape, shape}, {mx::int32, mx::float32},
                                std::make_shared<TopK>(cpu_stream(), k), {x});
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  if (x.dtype() != mx::float32 || weight.dtype() != mx::float32) throw std::invalid_argument("edgeai rms_norm: float32 only");
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("edgeai rms_norm: weight must be [D] for x[..., D]");
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(cpu_stream(), eps), {x, weight});
}

mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset) {
  if (x.dtype() != mx::float32) throw std::invalid_argument("edgeai rope: float32 only");
  if (x.ndim() < 2 || dims % 2 || dims > x.shape(-1) || dims <= 0)
    throw std::invalid_argument("edgeai rope: need x[..., L, D] and an even dims <= D");
  return mx::array(x.shape(), mx::float32, std::make_shared<Rope>(cpu_stream(), dims, traditional, base, scale, offset), {x});
}

}  // namespace edgeai
