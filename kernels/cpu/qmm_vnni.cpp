// The int8 tile with AVX-512 VNNI dot products (vpdpbusd, 256-bit: AVX512VL). Compiled with
// -mavx512f -mavx512vl -mavx512bw -mavx512vnni -mavx512vbmi (5/6-bit unpacking, see
// qmm_unpack.h); used only when the CPU reports them all (Ice Lake, Zen 4 and later).
#include <immintrin.h>

#include "qmm_isa.h"

namespace edgeai {
namespace {

#define EDGEAI_Q8_VNNI 1
#include "qmm_unpack.h"
#include "qmm_q8.h"

}  // namespace

void tile_q8_vnni(const QmmArgs& a, int m0, int m1, int n0, int n1) { q8_tile_bits(a, m0, m1, n0, n1); }

}  // namespace edgeai
