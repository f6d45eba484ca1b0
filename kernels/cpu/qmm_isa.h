// Shared declarations for the per-ISA quantized-matmul kernels.
//
// Each ISA lives in its own translation unit compiled with its own -m flags; the
// driver (qmm.cpp) picks one at run time from what the CPU reports.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace edgeai {

// Most rows the fast (int8) path takes. It redoes the integer work for every row, so past a
// few rows the float32 tile (weights dequantized once for 64 rows) catches up: at M = 16, 64
// and 512 the int8 tile ran 1.2x, 1.1x and 1.05x the float32 one's speed on 4-bit matrices
// but 0.9x, 0.7x and 0.9x on the 8-bit LM head. (Prompts run in float32 anyway: see
// kernels_cpu.full_precision.) Every row is quantized on its own: up to this count a row's
// result does not depend on what else is in the batch.
constexpr int kMaxQ8Rows = 3;

// The limit for a batch's decode step (rows of one token each) where the CPU has no int8 GEMM
// (AVX2): the float32 tile it would fall back to is half as wide there, so the int8 tile stays
// ahead up to where the float32 GEMM takes over. SmolLM2-135M batched decode step (AVX2, 2
// threads), tok/s at 4/8/16 rows: 124/149/181 with the float32 tile, 238/259/252 with the int8
// one; and each row stays its single-stream self. Prompt tokens keep kMaxQ8Rows: a batch's
// prompts fill their caches in one call, each prompt alone in another (Engine.generate), and
// both calls must take the same path for a batched answer to equal the single-stream one.
constexpr int kMaxQ8DecodeRows = 31;

// Rows from which float32 (accurate, prompt) matmuls run as Kernel::gemm rather than the 4x4
// tile: its weight panels cost a dequantization + transpose per weight row and m-block,
// repaid from about 32 rows. Measured on the 1.5B's shapes (one AVX-512 core, CPU time): vs
// the tile 0.85x at M = 16, 1.1x at 32, 1.3x at 64, 1.5x at 128, 1.65x at 512.
constexpr int kGemmRows = 32;

// Rows from which fast-mode (int8) matmuls run as the int8 GEMM (QmmIsa::gemm_q8, where the
// CPU has one) rather than the float32 tile or GEMM. Below kMaxQ8Rows + 1 the per-row int8
// tile reads each weight once per row, which is what decode wants.
constexpr int kQ8GemmRows = 4;

// Rows from which fast-mode matmuls of layers whose weights were repacked into panels
// (pack_panels_q8: the server's batches) run as the panel GEMM, QmmIsa::gemm_q8_panels,
// instead of the unpacking one. It would beat the per-row tile from 2 rows (SmolLM2-135M
// step, CPU ms: 2 rows 10.6 vs 12.3, 3 rows 12.8 vs 15.9) but sums in another order, and up
// to kMaxQ8Rows a batched row must give its single-stream answer bit for bit.
constexpr int kQ8PanelRows = kMaxQ8Rows + 1;

// One call's operands, already prepared by the driver.
//
// `xp` holds the activations as float32, reordered for 4-bit weights so that a block
// of 2*W values reads [W even-indexed, W odd-indexed]: MLX packs element 2i in the low
// nibble and 2i+1 in the high nibble of a byte, so unpacking the low (high) nibbles of
// W bytes yields the even (odd) elements. W is the kernel's vector width.
struct QmmArgs {
  const float* xp;     // M x K prepared activations
  const float* xs;     // M x G per-group sums of x (for the bias term)
  const uint8_t* w;    // N rows of packed weights, K*bits/8 bytes each
  const void* s;       // N x G scales (float32, or float16 when half_scales)
  const void* b;       // N x G biases (same dtype as the scales)
  float* y;            // M x N output
  int M, N, K, gs, bits;
  bool half_scales;  // float16 scales/biases: half the bytes to stream per token
  // Fast mode only: activations as int8 per block of 32, x ~= xd[blk] * xq. For 5, 6 and
  // 8-bit weights in natural order; for 4-bit see q4_even_at. xs then holds the group sums of the
  // quantized row (see prepare_row_q8).
  const int8_t* xq = nullptr;  // M x K
  const float* xd = nullptr;   // M x K/32
  // Weights repacked into panels (pack_panels_q8), or nullptr: gemm_q8_panels reads these.
  const uint8_t* wp = nullptr;
  const void* sp = nullptr;  // scales per panel and group (dtype of s)
  const void* bp = nullptr;  // biases, likewise
};

// 4-bit fast mode: where block k's 16 even-indexed int8 activations start in a row of nb
// blocks; its odd-indexed ones follow q4_odd_gap later. Blocks go in pairs A, B stored as
// [A even | B even | A odd | B odd]: the low nibbles of one 32-byte load of packed weights
// (A's 16 bytes, then B's) are then the first 32 values, the high nibbles the next 32. A
// last unpaired block is [even | odd].
inline int q4_even_at(int k, int nb) { return (k | 1) < nb ? 64 * (k / 2) + 16 * (k % 2) : 32 * k; }
inline int q4_odd_gap(int k, int nb) { return (k | 1) < nb ? 32 : 16; }

// Compute y[m0:m1, n0:n1]. Safe to call concurrently on disjoint tiles.
using QmmTileFn = void (*)(const QmmArgs&, int m0, int m1, int n0, int n1);

// Attention operands: q [B, Hq, L, D], k/v [B, Hkv, S, D] with element strides for the
// first three dims (the last is contiguous); out [B, L, Hq, D] contiguous, i.e. already
// in the layout the output projection reads (no transpose + copy node after it).
struct AttnArgs {
  const float *q, *k, *v;
  float* out;
  long qs[3], ks[3], vs[3];
  int B, Hq, Hkv, L, S, D;
  float scale;
  bool causal;
  int block;  // query rows per task
  const int* start;  // per batch row: its first valid key (left padding), or nullptr: 0
  // One query row per batch row (decode): tasks are (batch row, key/value head, chunk of
  // kDecodeKeys keys from the row's first valid key), each writing its partial softmax for
  // the head's query heads here (see attn_impl.h); nullptr: tasks are query-row blocks.
  float* part = nullptr;
  int chunks = 0;  // key chunks per (batch row, key/value head)
};

// Keys per decode task: fixed (not sized to the batch or the thread count) so a row's sums
// run in the same order alone and in a batch.
constexpr int kDecodeKeys = 128;

// Runs attention over the CPU pool: query-row blocks, or for one query row per batch row
// the key chunks above, merged afterwards. `a.block`, `a.part` and `a.chunks` are set here.
struct QmmIsa;
void run_attention_tasks(const QmmIsa& isa, AttnArgs& a);

using AttnTaskFn = void (*)(const AttnArgs&, int task);

struct QmmIsa {
  const char* name;
  int width;  // W above: 16 (AVX-512), 8 (AVX2), 1 (portable C++)
  QmmTileFn tile;
  AttnTaskFn attention;
  QmmTileFn tile_q8;  // int8-activation tile (fast mode), or nullptr
  // int8 GEMM for fast mode's many-row calls (prompts), or nullptr: xq in its block order
  // (see qmm_gemm_q8.cpp), xs per block of 32.
  QmmTileFn gemm_q8 = nullptr;
  // The same GEMM over weights repacked once into panels (QmmArgs::wp, sp, bp), or nullptr.
  QmmTileFn gemm_q8_panels = nullptr;
  // Rows of one token each (a batch's decode step) that take the per-row tile when the layer
  // has no panels: unpacking the weights every step costs the GEMM more than it gains.
  int q8_decode_rows = kMaxQ8DecodeRows;
};

// The AVX2 int8 tile, shared by the AVX-512 unit (every AVX-512 CPU has AVX2), and the same
// tile with AVX-512 VNNI dot products (qmm_vnni.cpp, where the build has it).
void tile_q8_avx2(const QmmArgs& a, int m0, int m1, int n0, int n1);
void tile_q8_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1);
void gemm_q8_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1);
void gemm_q8_panels_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1);
// The panel GEMM with AVX2 dot products (qmm_gemm_q8_avx2.cpp): bit for bit the VNNI one.
void gemm_q8_panels_avx2(const QmmArgs& a, int m0, int m1, int n0, int n1);
// Panels of 32 weight rows for gemm_q8_panels: bytes of the weights, and values (of the
// scales' dtype) of the scales and of the biases each.
size_t panels_q8_bytes(int N, int K, int bits);
size_t panels_q8_scales(int N, int K, int gs);
void pack_panels_q8(const uint8_t* w, const void* s, const void* b, bool half, int N, int K, int gs, int bits,
                    uint8_t* wp, void* sp, void* bp);

QmmIsa isa_avx512();
QmmIsa isa_avx512_vnni();  // AVX-512 float32 tile + the VNNI int8 tile
QmmIsa isa_avx2();
QmmIsa isa_generic();

}  // namespace edgeai
