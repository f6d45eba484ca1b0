#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"

namespace edgeai {

// x (any float dtype, any strides, broadcasts included) as contiguous float32 rows over its
// last axis: x's own buffer when it already is one, else a converted copy in `tmp`.
const float* float_rows(const mlx::core::array& x, std::vector<float>& tmp);

// out[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w for M contiguous rows of D (elementwise.cpp).
void rms_norm_rows(const float* x, long M, int D, const float* w, float eps, float* out);

// One quantized linear layer's operands, from evaluated, row-contiguous MLX arrays.
struct QLinear {
  const uint8_t* w;
  const void* s;
  const void* b;
  int N, K, gs, bits;
  bool half;  // float16 scales and biases
  // The same weights repacked into panels (pack_q8), or nullptr.
  const uint8_t* wp = nullptr;
  const void* sp = nullptr;
  const void* bp = nullptr;
};

QLinear qlinear(const mlx::core::array& w, const mlx::core::array& s, const mlx::core::array& b, int gs, int bits);
// `l` with the panels [wp, sp, bp] that pack_q8 made of its weights (checked by check_panels).
QLinear with_panels(QLinear l, const mlx::core::array* panels);
// Throws unless `panels` are pack_q8's output for weights w of `bits` and group size `gs`.
void check_panels(const char* op, const mlx::core::array& w, const mlx::core::array& s, int gs, int bits,
                  const std::vector<mlx::core::array>& panels);
// The weights (w, scales, biases) repacked once for the int8 GEMM of batched decoding (needs
// has_int8_gemm()): [weight panels (uint8), scales, biases (the scales' dtype)].
std::vector<mlx::core::array> pack_q8(const mlx::core::array& w, const mlx::core::array& scales,
                                      const mlx::core::array& biases, int group_size, int bits);

// ys[i][M, N_i] = x[M, K] @ dequant(ls[i]).T for contiguous float32 rows x: layers that read
// the same input share its preparation and one run of the thread pool. decode: the rows are
// one token each of as many sequences (see int8_tile_rows).
void qmm_rows(const float* x, long M, int K, const QLinear* ls, int n, float* const* ys, bool fast,
              bool decode = false);

mlx::core::array quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                  const mlx::core::array& scales, const mlx::core::array& biases,
                                  int group_size, int bits, bool fast = false,
                                  const std::vector<mlx::core::array>& panels = {});
mlx::core::array attention(const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
                           float scale, bool causal);
mlx::core::array rms_norm(const mlx::core::array& x, const mlx::core::array& weight, float eps);
mlx::core::array rope(const mlx::core::array& x, int dims, bool traditional, float base, float scale, int offset);
std::vector<mlx::core::array> log_softmax(const mlx::core::array& x);
std::vector<mlx::core::array> top_k(const mlx::core::array& x, int k);
// Fused llama-layer pieces (fused.cpp); layers are flat (weight, scales, biases) triples.
// group_size / bits: what every layer must have, or 0 to take each layer's from its shapes.
std::vector<mlx::core::array> norm_qkv(const mlx::core::array& x, const mlx::core::array& norm_w, float eps,
                                       const std::vector<mlx::core::array>& qkv, int n_heads, int n_kv_heads,
                                       int rope_dims, bool traditional, float base, float scale, int offset,
                                       int group_size, int bits, bool fast,
                                       const std::vector<mlx::core::array>& cache = {},
                                       const std::vector<mlx::core::array>& qkv_bias = {},
                                       const std::optional<mlx::core::array>& pad = std::nullopt,
                                       const std::vector<mlx::core::array>& panels = {});
// panels: the layers' pack_q8 triples (batched decoding), or none.
// pad: each batch row's left padding (a BatchKVCache's rows): positions, and the keys a row
// attends to, start there.
mlx::core::array attn_out(const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
                          const mlx::core::array& x, const std::vector<mlx::core::array>& o_proj, float scale,
                          bool causal, int group_size, int bits, bool fast, int length = -1,
                          const std::optional<mlx::core::array>& pad = std::nullopt,
                          const std::vector<mlx::core::array>& panels = {});
mlx::core::array norm_mlp(const mlx::core::array& h, const mlx::core::array& norm_w, float eps,
                          const std::vector<mlx::core::array>& gate_up_down, int group_size, int bits, bool fast,
                          const std::vector<mlx::core::array>& panels = {}, bool gelu = false,
                          const std::optional<mlx::core::array>& post_norm = std::nullopt, float post_eps = 0.f);
// One llama (or qwen2: q/k/v biases) decoder layer's weights, checked once, for the three fused calls of each step
// (saves converting nine arrays per call from Python at every layer of every token).
class FusedLlamaLayer {
 public:
  FusedLlamaLayer(mlx::core::array norm1, std::vector<mlx::core::array> qkv, std::vector<mlx::core::array> o_proj,
                  mlx::core::array norm2, std::vector<mlx::core::array> mlp, float eps1, float eps2, int n_heads,
                  int n_kv_heads, int rope_dims, bool traditional, float base, float scale, int group_size, int bits,
                  bool fast, std::vector<mlx::core::array> qkv_bias = {},
                  std::vector<mlx::core::array> panels = {});
  // panels: pack_q8's triples of q, k, v, o, gate, up, down (21 arrays), or none.
  // cache: optional [keys, values] buffers to write this step's k, v into at `offset`.
  // pad: optional left padding per batch row (see norm_qkv).
  std::vector<mlx::core::array> qkv(const mlx::core::array& x, int offset,
                                    const std::vector<mlx::core::array>& cache = {},
                                    const std::optional<mlx::core::array>& pad = std::nullopt) const;
  mlx::core::array attend(const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
                          const mlx::core::array& x, float scale, bool causal, int length = -1,
                          const std::optional<mlx::core::array>& pad = std::nullopt) const;
  mlx::core::array mlp(const mlx::core::array& h) const;

 private:
  mlx::core::array norm1_, norm2_;
  std::vector<mlx::core::array> qkv_, o_, mlp_;
  float eps1_, eps2_;
  int hq_, hkv_, rope_dims_;
  bool traditional_;
  float base_, scale_;
  int gs_, bits_;
  bool fast_;
  std::vector<mlx::core::array> qkv_bias_;  // empty, or float32 q, k, v biases (qwen2)
  std::vector<mlx::core::array> pqkv_, po_, pmlp_;  // the projections' panels, or empty
};

// Backs the arrays' buffers with transparent huge pages where Linux allows (hugepages.cpp);
// returns the bytes moved into huge pages.
long hugepages(const std::vector<mlx::core::array>& arrays);

std::string isa_name();
bool has_int8_gemm();  // the current ISA runs fast-mode matmuls of many rows in int8
bool has_int8_panels();  // ... and batches' decode steps over packed panels (pack_q8)
// Most rows a fast-mode matmul runs by the per-row int8 tile (0: none): kMaxQ8Rows, or for a
// decode step (rows of one token each) on layers without panels the ISA's q8_decode_rows.
int int8_tile_rows(bool decode);
// Whether x (..., L, K) holds one token per sequence (L = 1, at least 3 axes): a decode step.
inline bool is_decode_step(const mlx::core::array& x) { return x.ndim() >= 3 && x.shape(-2) == 1; }
std::vector<std::string> available_isas();
void set_isa(const std::string& name);
int threads();
void set_threads(int n);

}  // namespace edgeai
