// Python bindings (nanobind, domain "mlx" so mx.array crosses over).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "pool.h"
#include "qmm.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_edgeai_kernels, m) {
  m.doc() = "edgeai CPU kernels: affine-quantized matmul for MLX";
  m.def("quantized_matmul", &edgeai::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "fast"_a = false, "panels"_a = std::vector<mlx::core::array>{},
        "y = x @ dequantize(w, scales, biases).T (CPU). fast: int8 activations per block of 32 "
        "(up to int8_rows() rows: the per-row tile; more: the int8 GEMM where int8_gemm(), else float32); "
        "otherwise float32 activations and accumulation. panels: pack_q8(w, scales, biases, ...), "
        "which fast mode reads from 4 rows on (no unpacking per call).");
  m.def("pack_q8", &edgeai::pack_q8, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        "The weights repacked once into the int8 GEMM's panels (needs int8_panels()): [weights, scales, "
        "biases], to pass as panels= (batched decoding: costs the weights' size again, 8 bits a value "
        "for 5 and 6-bit weights).");
  m.def("attention", &edgeai::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a,
        "softmax(q @ k.T * scale, causal mask aligned to the end) @ v for q [B, Hq, L, D], k/v [B, Hkv, S, D]; "
        "returns [B, L, Hq, D]. float32, grouped-query heads.");
  m.def("rms_norm", &edgeai::rms_norm, "x"_a, "weight"_a, "eps"_a, "x * rsqrt(mean(x^2) + eps) * weight; float32.");
  m.def("rope", &edgeai::rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "Rotary embedding over axis -2 positions (offset + index), as mx.fast.rope; float32.");
  m.def("norm_qkv", &edgeai::norm_qkv, "x"_a, "norm_weight"_a, "eps"_a, "qkv"_a, "n_heads"_a, "n_kv_heads"_a,
        "rope_dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a, "group_size"_a, "bits"_a, "fast"_a,
        "cache"_a = std::vector<mlx::core::array>{}, "qkv_bias"_a = std::vector<mlx::core::array>{},
        "pad"_a = nb::none(), "panels"_a = std::vector<mlx::core::array>{},
        "rms_norm, q/k/v projections (+ optional float32 biases) and RoPE in one node: returns q [B, Hq, L, hd], "
        "k, v [B, Hkv, L, hd]; with cache=[keys, values] buffers [B, Hkv, capacity, hd], k and v are written "
        "into them at offset and the buffers are returned. group_size = bits = 0: each layer's own format. "
        "pad: each batch row's left padding [B]; row b's tokens sit at positions offset + l - pad[b].");
  m.def("attn_out", &edgeai::attn_out, "q"_a, "k"_a, "v"_a, "x"_a, "o_proj"_a, "scale"_a, "causal"_a, "group_size"_a,
        "bits"_a, "fast"_a, "length"_a = -1, "pad"_a = nb::none(), "panels"_a = std::vector<mlx::core::array>{},
        "x + o_proj(attention(q, k[:, :, :length], v[:, :, :length])) in one node; float32. pad: each batch "
        "row's left padding [B]: row b attends to keys pad[b] .. length - 1.");
  m.def("norm_mlp", &edgeai::norm_mlp, "h"_a, "norm_weight"_a, "eps"_a, "gate_up_down"_a, "group_size"_a, "bits"_a,
        "fast"_a, "panels"_a = std::vector<mlx::core::array>{}, "gelu"_a = false, "post_norm"_a = nb::none(),
        "post_eps"_a = 0.f,
        "h + down(silu(gate(n)) * up(n)), n = rms_norm(h), in one node; float32. gelu: gemma3's tanh-approximated "
        "GELU instead of silu; post_norm: h + rms_norm(down(...)) * post_norm instead (gemma3's sandwich norm).");
  nb::class_<edgeai::FusedLlamaLayer>(m, "FusedLlamaLayer",
                                      "A llama or qwen2 decoder layer's weights for the fused calls (checked once).")
      .def(nb::init<mlx::core::array, std::vector<mlx::core::array>, std::vector<mlx::core::array>, mlx::core::array,
                    std::vector<mlx::core::array>, float, float, int, int, int, bool, float, float, int, int, bool,
                    std::vector<mlx::core::array>, std::vector<mlx::core::array>>(),
           "norm1"_a, "qkv"_a, "o_proj"_a, "norm2"_a, "mlp"_a, "eps1"_a, "eps2"_a, "n_heads"_a, "n_kv_heads"_a,
           "rope_dims"_a, "traditional"_a, "base"_a, "scale"_a, "group_size"_a, "bits"_a, "fast"_a,
           "qkv_bias"_a = std::vector<mlx::core::array>{}, "panels"_a = std::vector<mlx::core::array>{})
      .def("qkv", &edgeai::FusedLlamaLayer::qkv, "x"_a, "offset"_a, "cache"_a = std::vector<mlx::core::array>{},
           "pad"_a = nb::none())
      .def("attend", &edgeai::FusedLlamaLayer::attend, "q"_a, "k"_a, "v"_a, "x"_a, "scale"_a, "causal"_a,
           "length"_a = -1, "pad"_a = nb::none())
      .def("mlp", &edgeai::FusedLlamaLayer::mlp, "h"_a);
  m.def("set_pool_spin", [](int us) { edgeai::Pool::get().set_spin_us(us); }, "us"_a,
        "How long (microseconds) the kernel's idle workers spin before sleeping");
  m.def("pool_spin", [] { return edgeai::Pool::get().spin_us(); }, "set_pool_spin's value");
  m.def("hugepages", &edgeai::hugepages, "arrays"_a,
        "Back the (evaluated) arrays' buffers with transparent huge pages where Linux allows (MADV_COLLAPSE): "
        "decode streams them every token. Returns the bytes moved into huge pages.");
  m.def("log_softmax", &edgeai::log_softmax, "x"_a,
        "log_softmax over the last axis and each row's entropy (nats), float32: returns [logprobs, entropy].");
  m.def("top_k", &edgeai::top_k, "x"_a, "k"_a,
        "The k largest entries of each row over the last axis, float32, largest first (ties: lower index "
        "first): returns [indices (int32), values], each [..., k].");
  m.def("isa", &edgeai::isa_name, "The instruction set the kernels use now.");
  m.def("int8_gemm", &edgeai::has_int8_gemm,
        "Whether fast-mode matmuls of more rows than int8_rows() run as the int8 GEMM on the current "
        "instruction set (else float32).");
  m.def("int8_panels", &edgeai::has_int8_panels,
        "Whether pack_q8 can repack weights into panels that fast-mode batches read (decode steps of "
        "4 rows or more; on AVX-512 VNNI also prompts) on the current instruction set.");
  m.def("int8_rows", &edgeai::int8_tile_rows, "decode"_a = true,
        "Most rows a fast-mode matmul runs by the per-row int8 tile on the current instruction set (each "
        "row bit-equal to its single-row result; 0: no tile): 3, or for a decode step (x of shape (B, 1, K)) "
        "on layers without panels 31 but on AVX-512 VNNI.");
  m.def("available_isas", &edgeai::available_isas, "Instruction sets this CPU can run, best first.");
  m.def("set_isa", &edgeai::set_isa, "name"_a, "Force an instruction set (tests), or 'auto'.");
  m.def("threads", &edgeai::threads, "Threads the kernels use (the caller's included).");
  m.def("set_threads", &edgeai::set_threads, "n"_a, "Use n threads in all.");
}
