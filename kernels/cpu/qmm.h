#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"

namespace edgeai {

mlx::core::array quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                  const mlx::core::array& scales, const mlx::core::array& biases,
                                  int group_size, int bits);
mlx::core::array attention(const mlx::core::array& q, const mlx::core::array& k, const mlx::core::array& v,
                           float scale, bool causal);
mlx::core::array rms_norm(const mlx::core::array& x, const mlx::core::array& weight, float eps);
mlx::core::array rope(const mlx::core::array& x, int dims, bool traditional, float base, float scale, int offset);
std::string isa_name();
std::vector<std::string> available_isas();
void set_isa(const std::string& name);
int threads();
void set_threads(int n);

}  // namespace edgeai
