// Body of an mx.fast.metal_kernel: y = x @ dequant(w).T for MLX affine packing.
//
// UNTESTED ON APPLE HARDWARE: written on Linux where Metal is unavailable. edgeai only
// uses it after it matches the float32 reference on the machine (edgeai/kernels.py).
//
// Inputs:  x [M, K] (float/half), w [N, K*BITS/32] uint32, scales/biases [N, K/GS].
// Output:  y [M, N] float. Template constants: BITS (4 or 8), GS (32/64/128), K, N.
// Grid: (32 * N, M, 1), threadgroup (32, 1, 1): one simdgroup per output element, each
// lane takes every 32nd packed word of the row and the simdgroup sums the lanes.
uint lane = thread_position_in_threadgroup.x;
uint n = threadgroup_position_in_grid.x;
uint m = thread_position_in_grid.y;
if (n >= N) return;
constexpr uint PER_WORD = 32 / BITS;
constexpr uint WORDS = K / PER_WORD;
constexpr uint MASK = (1u << BITS) - 1u;
const device uint32_t* wr = w + n * WORDS;
const device auto* xr = x + m * K;
float acc = 0.0f;
for (uint i = lane; i < WORDS; i += 32) {
  uint32_t word = wr[i];
  uint k0 = i * PER_WORD;
  uint g = k0 / GS;
  float s = float(scales[n * (K / GS) + g]);
  float b = float(biases[n * (K / GS) + g]);
  float dot = 0.0f, xsum = 0.0f;
  for (uint j = 0; j < PER_WORD; j++) {
    float xv = float(xr[k0 + j]);
    dot += xv * float((word >> (j * BITS)) & MASK);
    xsum += xv;
  }
  acc += s * dot + b * xsum;
}
acc = simd_sum(acc);
if (lane == 0) {
  y[m * N + n] = acc;
}
