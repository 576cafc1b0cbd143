// cnnkit's C++ kernels as one Python module, compiled at first use by cnnkit/kernels/extension.py: a
// submodule per source file, each registered here (kernels.h declares them), so that only this file
// includes pybind11.
#include <torch/csrc/utils/pybind.h>

#include "kernels.h"

// The instructions the compiler was allowed (cnnkit/extension.py's ISA levels), for the tests and the logs.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
constexpr const char* kIsa = "avx512_bf16";
#elif defined(__AVX512F__)
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "portable";
#endif

namespace {

using pybind11::arg;
namespace k = cnnkit;

void define_pool_relu(pybind11::module_ m) {
  m.def("forward", &k::pool_relu::forward, "relu(max_pool2d(x, 2, 2, ceil_mode=True)) and the winner of each window",
        arg("x"), arg("channels_last"), arg("need_winners"));
  m.def("backward", &k::pool_relu::backward, "the gradient with respect to x, scattered to the winners",
        arg("grad_out"), arg("winners"), arg("height"), arg("width"), arg("channels_last"));
}

void define_conv_pool(pybind11::module_ m) {
  m.attr("vectorised") = k::conv_pool::kVectorised;
  m.def("forward", &k::conv_pool::forward,
        "relu(max_pool2d(conv2d(x, weight, bias), 2, 2, ceil_mode=True)) for one input channel, in channels_last, "
        "and the winner of each window",
        arg("x"), arg("weight"), arg("bias"), arg("need_winners"));
  m.def("backward", &k::conv_pool::backward, "the gradients with respect to the weight and the bias, from the winners",
        arg("grad_out"), arg("winners"), arg("x"), arg("weight"));
}

void define_adam(pybind11::module_ m) {
  m.def("step", &k::adam::step, "one Adam step: float32 masters and moments from bfloat16 gradients, bfloat16 copies",
        arg("masters"), arg("grads"), arg("exp_avgs"), arg("exp_avg_sqs"), arg("copies"), arg("steps"), arg("lr"),
        arg("beta1"), arg("beta2"), arg("eps"));
}

void define_winograd(pybind11::module_ m) {
  m.def("constants", &k::winograd::constants, "the matrices (B^T, A^T) compiled in");
  m.def("input_transform", &k::winograd::input_transform, "V (64, T, C) from channels_last images");
  m.def("output_transform", &k::winograd::output_transform,
        "channels_last output from products M (64, T, O), plus bias");
  m.def("output_transform_backward", &k::winograd::output_transform_backward,
        "dM (64, T, O) from the output's gradient");
  m.def("input_transform_backward", &k::winograd::input_transform_backward,
        "the images' gradient from dV (64, T, C)");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = kIsa;
  define_pool_relu(m.def_submodule("pool_relu", "fused 2x2 max pooling and ReLU (pool_relu.cpp)"));
  define_adam(m.def_submodule("adam", "Adam on float32 masters with bfloat16 weights (adam.cpp)"));
  define_conv_pool(m.def_submodule("conv_pool", "one-channel convolution, bias, pooling and ReLU (conv_pool.cpp)"));
  define_winograd(m.def_submodule("winograd", "the transforms of a Winograd convolution F(4x4, 5x5) (winograd.cpp)"));
}
