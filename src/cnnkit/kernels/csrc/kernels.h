// The functions each kernel file gives Python, registered in one place (module.cpp): only that file
// includes pybind11, whose headers took two thirds of each file's compile time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace cnnkit {

namespace pool_relu {  // pool_relu.cpp
std::vector<at::Tensor> forward(const at::Tensor& x, bool channels_last, bool need_winners);
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& winners, int64_t height, int64_t width,
                    bool channels_last);
}  // namespace pool_relu

namespace conv_pool {  // conv_pool.cpp
extern const bool kVectorised;  // compiled with AVX-512: see module.cpp
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                bool need_winners);
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& winners, const at::Tensor& x,
                                 const at::Tensor& weight);
}  // namespace conv_pool

namespace adam {  // adam.cpp
void step(const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& grads,
          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
          const std::vector<at::Tensor>& copies, const std::vector<at::Tensor>& steps, double lr, double beta1,
          double beta2, double eps);
}  // namespace adam

namespace winograd {  // winograd.cpp
at::Tensor input_transform(const at::Tensor& x, int64_t th, int64_t tw);
at::Tensor output_transform(const at::Tensor& m, const at::Tensor& bias, int64_t N, int64_t th, int64_t tw,
                            int64_t oh, int64_t ow);
at::Tensor output_transform_backward(const at::Tensor& gy, int64_t th, int64_t tw);
at::Tensor input_transform_backward(const at::Tensor& dv, int64_t N, int64_t H, int64_t W, int64_t th, int64_t tw);
std::vector<std::vector<std::vector<float>>> constants();
}  // namespace winograd

}  // namespace cnnkit
