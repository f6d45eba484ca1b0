// A llama decoder layer in three MLX nodes instead of ~28, for the CPU.
//
// At decode every graph node costs ~10 us of dispatch on a small CPU, as much as the
// arithmetic of a 135M model's whole layer. These primitives do the work of many nodes
// each, calling the same kernels (qmm_rows, attention, the RMSNorm / RoPE arithmetic):
//   norm_qkv:  rms_norm -> q, k, v projections -> RoPE -> [B, H, L, D]  (3 outputs)
//   attn_out:  x + o_proj(attention(q, k, v))
//   norm_mlp:  h + down(silu(gate(n)) * up(n)), n = rms_norm(h); or gemma3's
//              h + rms_norm'(down(gelu_tanh(gate(n)) * up(n)))
// The KV cache stays mlx-lm's: the cache update between norm_qkv and attn_out is ordinary
// MLX slicing. Everything is float32 with float32 (or float16) scales.
#include <algorithm>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "pool.h"
#include "qmm.h"
#include "qmm_isa.h"

namespace mx = mlx::core;

namespace edgeai {

QmmIsa active_isa();

namespace {

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

// A quantized layer given as 3 arrays (weight, scales, biases) from `at`, of input size K.
// Its format comes from the shapes (checked by add_layers): the projections of one decoder
// layer may differ in bits and group size (mlx-lm's per-layer quantization, GGUF K-quant mixes).
// With panels: `pan` points at its pack_q8 triple among the inputs (nullptr: none).
QLinear layer(const std::vector<mx::array>& in, int at, int K, const mx::array* pan = nullptr) {
  return with_panels(qlinear(in[at], in[at + 1], in[at + 2], K / in[at + 1].shape(1), in[at].shape(1) * 32 / K), pan);
}

// The panels of a primitive's layers: the last 3 * layers inputs, when it has them.
const mx::array* panels_of(const std::vector<mx::array>& in, bool has, int layers) {
  return has ? &in[in.size() - 3 * layers] : nullptr;
}

struct Rope {
  int dims;
  bool traditional;
  float base, scale;
};

// cos and sin of each rotated pair at the positions of a step, [rows][dims / 2]: one row per
// l = 0 .. L - 1 at offset + l, or with per-row left padding `pad` one per (b, l), at
// offset + l - pad[b] (a batch row's own position). Every layer of a step asks for the same
// table: the last one is kept.
const float* rope_table(const Rope& r, int B, int L, int offset, const int* pad, bool sine) {
  thread_local std::vector<float> cos_t, sin_t;
  thread_local std::vector<int> last_pos, pos;
  thread_local Rope last{0, false, 0.f, 0.f};
  const int rows = pad ? B * L : L;
  pos.resize(rows);
  for (int i = 0; i < rows; i++) pos[i] = offset + i % L - (pad ? pad[i / L] : 0);
  if (!(last.dims == r.dims && last.base == r.base && last.scale == r.scale && last_pos == pos)) {
    const int half = r.dims / 2;
    cos_t.resize(size_t(rows) * half);
    sin_t.resize(size_t(rows) * half);
    for (int i = 0; i < half; i++) {
      const float inv_freq = std::pow(r.base, -float(2 * i) / float(r.dims));
      for (int l = 0; l < rows; l++) {
        const float th = float(pos[l]) * r.scale * inv_freq;
        cos_t[size_t(l) * half + i] = std::cos(th);
        sin_t[size_t(l) * half + i] = std::sin(th);
      }
    }
    last = r, last_pos = pos;
  }
  return sine ? sin_t.data() : cos_t.data();
}

// y [M = B*L, H*D] rows -> out [B, H, cap, D] at positions pos0 + l, rotating the first
// dims of each head at position offset + l (- pad[b]: see rope_table), as mx.fast.rope.
void to_heads(const float* y, int B, int L, int H, int D, const Rope* rope, int offset, const int* pad, float* out,
              int cap, int pos0) {
  const float* ct = rope ? rope_table(*rope, B, L, offset, pad, false) : nullptr;
  const float* st = rope ? rope_table(*rope, B, L, offset, pad, true) : nullptr;
  for (int b = 0; b < B; b++)
    for (int l = 0; l < L; l++) {
      const float* src = y + (long(b) * L + l) * H * D;
      const size_t row = pad ? size_t(b) * L + l : size_t(l);
      for (int h = 0; h < H; h++) {
        const float* xr = src + long(h) * D;
        float* o = out + ((long(b) * H + h) * cap + pos0 + l) * D;
        if (!rope) {
          for (int d = 0; d < D; d++) o[d] = xr[d];
          continue;
        }
        const int half = rope->dims / 2;
        const float* c = ct + row * half;
        const float* sn = st + row * half;
        for (int i = 0; i < half; i++) {
          const int a = rope->traditional ? 2 * i : i, e = rope->traditional ? 2 * i + 1 : i + half;
          const float x1 = xr[a], x2 = xr[e];
          o[a] = x1 * c[i] - x2 * sn[i];
          o[e] = x1 * sn[i] + x2 * c[i];
        }
        for (int d = rope->dims; d < D; d++) o[d] = xr[d];
      }
    }
}

class NormQKV : public mx::Primitive {
 public:
  NormQKV(mx::Stream s, float eps, int hq, int hkv, Rope rope, int offset, bool fast, bool into, bool bias,
          bool padded, bool panels)
      : mx::Primitive(s), eps_(eps), hq_(hq), hkv_(hkv), rope_(rope), offset_(offset), fast_(fast), into_(into),
        bias_(bias), padded_(padded), panels_(panels) {}

  // inputs: x [B, L, D], norm weight [D], (w, scales, biases) for q, k, v, and in `into`
  // mode the KV cache's key and value buffers [B, Hkv, cap, hd], then with `bias` the q, k, v
  // projections' float32 biases (qwen2), then with `padded` each batch row's left padding
  // (int32 [B]: row b's tokens are at positions offset + l - pad[b]), then with `panels` the q, k,
  // v projections' pack_q8 triples. Outputs q, k, v; in `into`
  // mode k and v are the cache buffers themselves with this step's rows written at
  // [offset, offset + L): positions below offset are untouched, so no earlier reader of the
  // buffer sees a change, and nothing else reads positions at or above offset.
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    outs[0].set_data(mx::allocator::malloc(outs[0].nbytes()));
    for (int i = 1; i < 3; i++) {
      if (!into_) {
        outs[i].set_data(mx::allocator::malloc(outs[i].nbytes()));
        continue;
      }
      const mx::array& buf = in[10 + i];
      if (buf.flags().row_contiguous && buf.data_size() == buf.size()) {
        outs[i].copy_shared_buffer(buf);
      } else {  // a broadcast or strided buffer: give the cache a dense one
        outs[i].set_data(mx::allocator::malloc(outs[i].nbytes()));
        copy_dense(buf, outs[i].data<float>());
      }
    }
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& o : outs) enc.set_output_array(o);
    enc.dispatch([in, outs, eps = eps_, hq = hq_, hkv = hkv_, rope = rope_, offset = offset_, fast = fast_,
                  into = into_, bias = bias_, padded = padded_, panels = panels_]() mutable {
      run(in, outs, eps, hq, hkv, rope, offset, fast, into, bias, padded, panels);
    });
  }

  static void copy_dense(const mx::array& a, float* dst) {
    std::vector<float> tmp;
    const float* src = float_rows(a, tmp);  // follows any strides, broadcasts included
    std::copy(src, src + a.size(), dst);
  }

  static void run(const std::vector<mx::array>& in, std::vector<mx::array>& outs, float eps_, int hq_, int hkv_,
                  Rope rope_, int offset_, bool fast_, bool into_, bool bias_, bool padded_, bool panels_) {
    thread_local std::vector<float> xt, wt, n, y;
    const int B = in[0].shape(0), L = in[0].shape(1), D = in[0].shape(2);
    const long M = long(B) * L;
    const mx::array* pan = panels_of(in, panels_, 3);
    const QLinear ls[3] = {layer(in, 2, D, pan), layer(in, 5, D, pan ? pan + 3 : nullptr),
                           layer(in, 8, D, pan ? pan + 6 : nullptr)};
    n.resize(M * D);
    rms_norm_rows(float_rows(in[0], xt), M, D, float_rows(in[1], wt), eps_, n.data());
    y.resize(M * (ls[0].N + ls[1].N + ls[2].N));
    float* ys[3] = {y.data(), y.data() + M * ls[0].N, y.data() + M * (ls[0].N + ls[1].N)};
    qmm_rows(n.data(), M, D, ls, 3, ys, fast_, L == 1);
    const size_t at_bias = into_ ? 13 : 11, at_pad = at_bias + (bias_ ? 3 : 0);
    for (int i = 0; bias_ && i < 3; i++) {
      const float* b = in[at_bias + i].data<float>();
      for (long m = 0; m < M; m++)
        for (int j = 0; j < ls[i].N; j++) ys[i][m * ls[i].N + j] += b[j];
    }
    const int hd = ls[0].N / hq_;
    const int* pad = padded_ ? in[at_pad].data<int>() : nullptr;
    to_heads(ys[0], B, L, hq_, hd, &rope_, offset_, pad, outs[0].data<float>(), L, 0);
    const int cap = into_ ? outs[1].shape(2) : L, pos0 = into_ ? offset_ : 0;
    to_heads(ys[1], B, L, hkv_, hd, &rope_, offset_, pad, outs[1].data<float>(), cap, pos0);
    to_heads(ys[2], B, L, hkv_, hd, nullptr, 0, nullptr, outs[2].data<float>(), cap, pos0);
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("edgeai norm_qkv runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiNormQKV"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const NormQKV&>(other);
    return eps_ == o.eps_ && hq_ == o.hq_ && hkv_ == o.hkv_ && rope_.dims == o.rope_.dims &&
           rope_.traditional == o.rope_.traditional && rope_.base == o.rope_.base && rope_.scale == o.rope_.scale &&
           offset_ == o.offset_ && fast_ == o.fast_ && into_ == o.into_ && bias_ == o.bias_ && padded_ == o.padded_ &&
           panels_ == o.panels_;
  }

 private:
  float eps_;
  int hq_, hkv_;
  Rope rope_;
  int offset_;
  bool fast_, into_, bias_, padded_, panels_;
};

class AttnOut : public mx::UnaryPrimitive {
 public:
  AttnOut(mx::Stream s, float scale, bool causal, bool fast, int length, bool padded, bool panels)
      : mx::UnaryPrimitive(s), scale_(scale), causal_(causal), fast_(fast), length_(length), padded_(padded),
        panels_(panels) {}

  // inputs: q [B, Hq, L, hd], k, v [B, Hkv, S, hd] (strided cache views), x [B, L, D], o_proj (w, s, b),
  // then with `padded` each row's left padding (int32 [B]): row b attends to keys from pad[b] on,
  // then with `panels` o_proj's pack_q8 triple.
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([in, out, scale = scale_, causal = causal_, fast = fast_, length = length_, padded = padded_,
                  panels = panels_]() mutable { run(in, out, scale, causal, fast, length, padded, panels); });
  }

  // length: how many key/value positions to attend to (the cache's fill), or -1 for all.
  static void run(const std::vector<mx::array>& in, mx::array& out, float scale_, bool causal_, bool fast_,
                  int length, bool padded, bool panels) {
    thread_local std::vector<float> att, xt;
    const mx::array &q = in[0], &k = in[1], &v = in[2];
    const int B = q.shape(0), Hq = q.shape(1), L = q.shape(2), hd = q.shape(3);
    const long M = long(B) * L;
    att.resize(M * Hq * hd);
    AttnArgs a{};
    a.q = q.data<float>(), a.k = k.data<float>(), a.v = v.data<float>(), a.out = att.data();
    for (int d = 0; d < 3; d++) a.qs[d] = q.strides()[d], a.ks[d] = k.strides()[d], a.vs[d] = v.strides()[d];
    a.B = B, a.Hq = Hq, a.L = L, a.D = hd, a.Hkv = k.shape(1), a.S = length < 0 ? k.shape(2) : length;
    a.scale = scale_, a.causal = causal_;
    a.start = padded ? in[7].data<int>() : nullptr;
    run_attention_tasks(active_isa(), a);
    const QLinear o = layer(in, 4, Hq * hd, panels_of(in, panels, 1));
    float* y = out.data<float>();
    qmm_rows(att.data(), M, Hq * hd, &o, 1, &y, fast_, L == 1);
    const float* x = float_rows(in[3], xt);
    for (long i = 0; i < M * o.N; i++) y[i] += x[i];
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai attn_out runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiAttnOut"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const AttnOut&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_ && fast_ == o.fast_ && length_ == o.length_ &&
           padded_ == o.padded_ && panels_ == o.panels_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[3].shape()}; }

 private:
  float scale_;
  bool causal_;
  bool fast_;
  int length_;
  bool padded_, panels_;
};

class NormMLP : public mx::UnaryPrimitive {
 public:
  NormMLP(mx::Stream s, float eps, bool fast, bool panels, bool gelu = false, bool post = false, float post_eps = 0)
      : mx::UnaryPrimitive(s), eps_(eps), post_eps_(post_eps), fast_(fast), panels_(panels), gelu_(gelu), post_(post) {}

  // inputs: h [..., D], norm weight [D], then (w, scales, biases) for gate, up, down, then with
  // `post` the output norm's weight [D], then with `panels` their pack_q8 triples.
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([in, out, eps = eps_, fast = fast_, panels = panels_, gelu = gelu_, post = post_,
                  post_eps = post_eps_]() mutable { run(in, out, eps, fast, panels, gelu, post, post_eps); });
  }

  static void run(const std::vector<mx::array>& in, mx::array& out, float eps_, bool fast_, bool panels, bool gelu,
                  bool post, float post_eps) {
    thread_local std::vector<float> ht, wt, n, gu, pw, rt;
    const int D = in[0].shape(-1);
    const long M = in[0].size() / D;
    const float* h = float_rows(in[0], ht);
    const mx::array* pan = panels_of(in, panels, 3);
    const QLinear gate_up[2] = {layer(in, 2, D, pan), layer(in, 5, D, pan ? pan + 3 : nullptr)};
    const int F = gate_up[0].N;
    const QLinear down = layer(in, 8, F, pan ? pan + 6 : nullptr);
    n.resize(M * D);
    rms_norm_rows(h, M, D, float_rows(in[1], wt), eps_, n.data());
    gu.resize(2 * M * F);
    float* ys[2] = {gu.data(), gu.data() + M * F};
    qmm_rows(n.data(), M, D, gate_up, 2, ys, fast_, is_decode_step(in[0]));
    // silu(gate) * up (or gemma3's tanh-approximated GELU), in place: a libm exp or tanh per
    // value, so a batch's rows go on every thread (16 rows of SmolLM2-135M: 24.6k exps a
    // layer, ~3 ms a step on one thread).
    auto activate = [&](long i0, long i1) {
      if (gelu) {
        const float c = 0.7978845608028654f;  // sqrt(2 / pi), as mlx.nn.gelu_approx
        for (long i = i0; i < i1; i++) {
          const float g = ys[0][i];
          ys[0][i] = 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * (g * g * g)))) * ys[1][i];
        }
        return;
      }
      for (long i = i0; i < i1; i++) {
        const float g = ys[0][i];
        ys[0][i] = g / (1.f + std::exp(-g)) * ys[1][i];
      }
    };
    const long total = M * F, chunk = 4096;
    if (total <= chunk) {
      activate(0, total);
    } else {
      Pool::get().run(int((total + chunk - 1) / chunk),
                      [&](int t) { activate(long(t) * chunk, std::min(total, long(t + 1) * chunk)); });
    }
    float* y = out.data<float>();
    qmm_rows(ys[0], M, F, &down, 1, &y, fast_, is_decode_step(in[0]));
    if (post) {  // the MLP's output normalized before the residual (gemma3)
      rt.resize(M * D);
      float* r = rt.data();
      rms_norm_rows(y, M, D, float_rows(in[11], pw), post_eps, r);
      for (long i = 0; i < M * D; i++) y[i] = h[i] + r[i];
    } else {
      for (long i = 0; i < M * D; i++) y[i] += h[i];
    }
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("edgeai norm_mlp runs on the CPU only");
  }
  const char* name() const override { return "EdgeaiNormMLP"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const NormMLP&>(other);
    return eps_ == o.eps_ && fast_ == o.fast_ && panels_ == o.panels_ && gelu_ == o.gelu_ && post_ == o.post_ &&
           post_eps_ == o.post_eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override { return {in[0].shape()}; }

 private:
  float eps_, post_eps_;
  bool fast_, panels_, gelu_, post_;
};

[[noreturn]] void fail(const char* op, const std::string& m) {
  throw std::invalid_argument(std::string("edgeai ") + op + ": " + m);
}

// Checks (w, scales, biases) triples of input size K and makes them row-contiguous inputs.
// Each layer's bits and group size follow from its shapes; group_size / bits, when not 0,
// are what every layer must have.
void add_layers(const char* op, std::vector<mx::array>& in, const std::vector<mx::array>& ws, int K, int gs,
                int bits) {
  if (ws.size() % 3) fail(op, "layers are given as (weight, scales, biases) triples");
  if (bits != 0 && bits != 4 && bits != 5 && bits != 6 && bits != 8)
    fail(op, "bits must be 4, 5, 6 or 8 (or 0: per layer)");
  if (gs != 0 && gs != 32 && gs != 64 && gs != 128) fail(op, "group_size must be 32, 64 or 128 (or 0: per layer)");
  for (size_t i = 0; i < ws.size(); i += 3) {
    const mx::array &w = ws[i], &s = ws[i + 1], &b = ws[i + 2];
    if (w.dtype() != mx::uint32 || w.ndim() != 2) fail(op, "weights must be 2-D uint32 (MLX packing)");
    if ((s.dtype() != mx::float32 && s.dtype() != mx::float16) || b.dtype() != s.dtype())
      fail(op, "scales and biases must both be float32 or both float16");
    const long packed = long(w.shape(1)) * 32;  // = K * the layer's bits
    const int lb = K > 0 && packed % K == 0 ? int(packed / K) : 0;
    if (!(lb == 4 || lb == 5 || lb == 6 || lb == 8) || (bits && lb != bits))
      fail(op, "a layer's input size does not match (or its bits are not " +
                   (bits ? std::to_string(bits) : std::string("4, 5, 6 or 8")) + ")");
    const int G = s.ndim() == 2 ? s.shape(1) : 0, lgs = G > 0 && K % G == 0 ? K / G : 0;
    if (s.ndim() != 2 || s.shape(0) != w.shape(0) || b.shape() != s.shape() ||
        !(lgs == 32 || lgs == 64 || lgs == 128) || (gs && lgs != gs))
      fail(op, "scales/biases must be [N, K/group_size]");
    for (const mx::array* a : {&w, &s, &b})
      in.push_back(a->is_available() && a->flags().row_contiguous ? *a : mx::contiguous(*a, false, cpu_stream()));
  }
}

// Each batch row's left padding as an int32 [B] input (the BatchKVCache keeps it as an array:
// no wait for its values while the graph is built).
void add_padding(const char* op, std::vector<mx::array>& in, const std::optional<mx::array>& pad, int B) {
  if (!pad) return;
  if (pad->ndim() != 1 || pad->shape(0) != B || !mx::issubdtype(pad->dtype(), mx::integer))
    fail(op, "left padding must be integers [B], one per batch row");
  const mx::array p = pad->dtype() == mx::int32 ? *pad : mx::astype(*pad, mx::int32, cpu_stream());
  in.push_back(p.is_available() && p.flags().row_contiguous ? p : mx::contiguous(p, false, cpu_stream()));
}

// The layers' pack_q8 triples (`panels`, 3 per layer of `ws`, or none) as the last inputs.
bool add_panels(const char* op, std::vector<mx::array>& in, const std::vector<mx::array>& ws,
                const std::vector<mx::array>& panels, int K) {
  if (panels.empty()) return false;
  if (panels.size() != ws.size()) fail(op, "give pack_q8's three panels for every layer, or none");
  for (size_t i = 0; i < ws.size(); i += 3) {
    const int bits = int(long(ws[i].shape(1)) * 32 / K), gs = K / ws[i + 1].shape(1);
    check_panels(op, ws[i], ws[i + 1], gs, bits, {panels.begin() + i, panels.begin() + i + 3});
  }
  for (const mx::array& p : panels)
    in.push_back(p.is_available() && p.flags().row_contiguous ? p : mx::contiguous(p, false, cpu_stream()));
  return true;
}

}  // namespace

std::vector<mx::array> norm_qkv(const mx::array& x, const mx::array& norm_w, float eps, const std::vector<mx::array>& qkv,
                                int n_heads, int n_kv_heads, int rope_dims, bool traditional, float base, float scale,
                                int offset, int group_size, int bits, bool fast, const std::vector<mx::array>& cache,
                                const std::vector<mx::array>& qkv_bias, const std::optional<mx::array>& pad,
                                const std::vector<mx::array>& panels) {
  const char* op = "norm_qkv";
  if (x.ndim() != 3 || x.dtype() != mx::float32) fail(op, "x must be float32 [B, L, D]");
  const int D = x.shape(2);
  if (norm_w.dtype() != mx::float32 || norm_w.ndim() != 1 || norm_w.shape(0) != D) fail(op, "norm weight must be float32 [D]");
  if (qkv.size() != 9) fail(op, "give q, k, v as three (weight, scales, biases) triples");
  std::vector<mx::array> in = {x, norm_w};
  add_layers(op, in, qkv, D, group_size, bits);
  const int nq = qkv[0].shape(0), nk = qkv[3].shape(0);
  if (n_heads <= 0 || n_kv_heads <= 0 || nq % n_heads || nk % n_kv_heads || qkv[6].shape(0) != nk)
    fail(op, "projection sizes do not split into the given heads");
  const int hd = nq / n_heads;
  if (nk / n_kv_heads != hd) fail(op, "q and k head sizes differ");
  if (rope_dims <= 0 || rope_dims % 2 || rope_dims > hd) fail(op, "rope dims must be even and at most the head size");
  const int B = x.shape(0), L = x.shape(1);
  const bool into = !cache.empty();
  if (into) {
    if (cache.size() != 2) fail(op, "give the cache as [keys, values]");
    for (const mx::array& c : cache)
      if (c.dtype() != mx::float32 || c.ndim() != 4 || c.shape(0) != B || c.shape(1) != n_kv_heads || c.shape(3) != hd)
        fail(op, "cache buffers must be float32 [B, n_kv_heads, capacity, head_dim]");
    if (cache[0].shape() != cache[1].shape()) fail(op, "key and value buffers differ in shape");
    if (offset < 0 || offset + L > cache[0].shape(2)) fail(op, "the cache has no room for these positions");
    in.push_back(cache[0]);
    in.push_back(cache[1]);
  }
  const bool bias = !qkv_bias.empty();
  if (bias) {
    if (qkv_bias.size() != 3) fail(op, "give the q, k, v biases as three arrays (or none)");
    for (int i = 0; i < 3; i++) {
      const mx::array& b = qkv_bias[i];
      if (b.dtype() != mx::float32 || b.ndim() != 1 || b.shape(0) != qkv[3 * i].shape(0))
        fail(op, "the q, k, v biases must be float32 [N] of their projections");
      in.push_back(b.is_available() && b.flags().row_contiguous ? b : mx::contiguous(b, false, cpu_stream()));
    }
  }
  add_padding(op, in, pad, B);
  const bool packed = add_panels(op, in, qkv, panels, D);
  const mx::Shape kv = into ? cache[0].shape() : mx::Shape{B, n_kv_heads, L, hd};
  return mx::array::make_arrays(
      {{B, n_heads, L, hd}, kv, kv}, {mx::float32, mx::float32, mx::float32},
      std::make_shared<NormQKV>(cpu_stream(), eps, n_heads, n_kv_heads, Rope{rope_dims, traditional, base, scale}, offset,
                                fast, into, bias, pad.has_value(), packed),
      in);
}

mx::array attn_out(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& x,
                   const std::vector<mx::array>& o_proj, float scale, bool causal, int group_size, int bits, bool fast,
                   int length, const std::optional<mx::array>& pad, const std::vector<mx::array>& panels) {
  const char* op = "attn_out";
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) fail(op, "expected q, k, v of shape [B, H, L, D]");
  for (const mx::array* a : {&q, &k, &v, &x})
    if (a->dtype() != mx::float32) fail(op, "q, k, v and x must be float32");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3)) fail(op, "q, k, v shapes disagree");
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1)) fail(op, "query heads must be a multiple of key/value heads");
  if (q.shape(3) % 16) fail(op, "head dim must be a multiple of 16");
  if (length > k.shape(2)) fail(op, "length exceeds the key/value buffers");
  const int S = length < 0 ? k.shape(2) : length;
  if (S < 1) fail(op, "nothing to attend to");
  if (causal && q.shape(2) > S) fail(op, "causal attention needs at least as many keys as queries");
  if (q.strides().back() != 1 || k.strides().back() != 1 || v.strides().back() != 1) fail(op, "q, k, v need a contiguous last axis");
  if (x.ndim() != 3 || x.shape(0) != q.shape(0) || x.shape(1) != q.shape(2)) fail(op, "x must be [B, L, D]");
  std::vector<mx::array> in = {q, k, v, x};
  add_layers(op, in, o_proj, q.shape(1) * q.shape(3), group_size, bits);
  if (o_proj.size() != 3 || o_proj[0].shape(0) != x.shape(2)) fail(op, "o_proj must map to x's size");
  add_padding(op, in, pad, q.shape(0));
  const bool packed = add_panels(op, in, o_proj, panels, q.shape(1) * q.shape(3));
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<AttnOut>(cpu_stream(), scale, causal, fast, length, pad.has_value(), packed), in);
}

mx::array norm_mlp(const mx::array& h, const mx::array& norm_w, float eps, const std::vector<mx::array>& gate_up_down,
                   int group_size, int bits, bool fast, const std::vector<mx::array>& panels, bool gelu,
                   const std::optional<mx::array>& post_norm, float post_eps) {
  const char* op = "norm_mlp";
  if (h.ndim() < 1 || h.dtype() != mx::float32) fail(op, "h must be float32");
  const int D = h.shape(-1);
  if (norm_w.dtype() != mx::float32 || norm_w.ndim() != 1 || norm_w.shape(0) != D) fail(op, "norm weight must be float32 [D]");
  if (gate_up_down.size() != 9) fail(op, "give gate, up, down as three (weight, scales, biases) triples");
  std::vector<mx::array> in = {h, norm_w};
  add_layers(op, in, {gate_up_down.begin(), gate_up_down.begin() + 6}, D, group_size, bits);
  const int F = gate_up_down[0].shape(0);
  if (gate_up_down[3].shape(0) != F) fail(op, "gate and up sizes differ");
  add_layers(op, in, {gate_up_down.begin() + 6, gate_up_down.end()}, F, group_size, bits);
  if (gate_up_down[6].shape(0) != D) fail(op, "down must map back to h's size");
  if (post_norm) {
    if (post_norm->dtype() != mx::float32 || post_norm->ndim() != 1 || post_norm->shape(0) != D)
      fail(op, "post norm weight must be float32 [D]");
    in.push_back(*post_norm);
  }
  bool packed = false;
  if (!panels.empty()) {
    if (panels.size() != 9) fail(op, "give pack_q8's three panels for gate, up and down, or none");
    add_panels(op, in, {gate_up_down.begin(), gate_up_down.begin() + 6}, {panels.begin(), panels.begin() + 6}, D);
    packed = add_panels(op, in, {gate_up_down.begin() + 6, gate_up_down.end()}, {panels.begin() + 6, panels.end()}, F);
  }
  return mx::array(h.shape(), mx::float32,
                   std::make_shared<NormMLP>(cpu_stream(), eps, fast, packed, gelu, post_norm.has_value(), post_eps), in);
}

FusedLlamaLayer::FusedLlamaLayer(mx::array norm1, std::vector<mx::array> qkv, std::vector<mx::array> o_proj,
                                 mx::array norm2, std::vector<mx::array> mlp, float eps1, float eps2, int n_heads,
                                 int n_kv_heads, int rope_dims, bool traditional, float base, float scale,
                                 int group_size, int bits, bool fast, std::vector<mx::array> qkv_bias,
                                 std::vector<mx::array> panels)
    : norm1_(std::move(norm1)), norm2_(std::move(norm2)), qkv_(std::move(qkv)), o_(std::move(o_proj)),
      mlp_(std::move(mlp)), eps1_(eps1), eps2_(eps2), hq_(n_heads), hkv_(n_kv_heads), rope_dims_(rope_dims),
      traditional_(traditional), base_(base), scale_(scale), gs_(group_size), bits_(bits), fast_(fast),
      qkv_bias_(std::move(qkv_bias)) {
  if (!panels.empty() && panels.size() != 21)
    fail("FusedLlamaLayer", "give pack_q8's panels for all seven projections (q, k, v, o, gate, up, down), or none");
  if (!panels.empty()) {
    pqkv_.assign(panels.begin(), panels.begin() + 9);
    po_.assign(panels.begin() + 9, panels.begin() + 12);
    pmlp_.assign(panels.begin() + 12, panels.end());
  }
  // Check everything once, on a one-token input, so later calls fail only on bad activations.
  const int D = norm1_.shape(0);
  auto x = mx::zeros({1, 1, D}, mx::float32, cpu_stream());
  auto q = norm_qkv(x, norm1_, eps1_, qkv_, hq_, hkv_, rope_dims_, traditional_, base_, scale_, 0, gs_, bits_, fast_, {},
                    qkv_bias_, std::nullopt, pqkv_);
  attn_out(q[0], q[1], q[2], x, o_, 1.f, false, gs_, bits_, fast_, -1, std::nullopt, po_);
  norm_mlp(x, norm2_, eps2_, mlp_, gs_, bits_, fast_, pmlp_, false, std::nullopt, 0.f);
}

std::vector<mx::array> FusedLlamaLayer::qkv(const mx::array& x, int offset, const std::vector<mx::array>& cache,
                                            const std::optional<mx::array>& pad) const {
  return norm_qkv(x, norm1_, eps1_, qkv_, hq_, hkv_, rope_dims_, traditional_, base_, scale_, offset, gs_, bits_, fast_,
                  cache, qkv_bias_, pad, pqkv_);
}

mx::array FusedLlamaLayer::attend(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array& x,
                                  float scale, bool causal, int length, const std::optional<mx::array>& pad) const {
  return attn_out(q, k, v, x, o_, scale, causal, gs_, bits_, fast_, length, pad, po_);
}

mx::array FusedLlamaLayer::mlp(const mx::array& h) const {
  return norm_mlp(h, norm2_, eps2_, mlp_, gs_, bits_, fast_, pmlp_, false, std::nullopt, 0.f);
}

}  // namespace edgeai
