// cnnkit's C++ kernels as one Python module, compiled at first use by cnnkit/extension.py: a submodule
// per source file.
#include <torch/csrc/utils/pybind.h>

void define_pool_relu(pybind11::module_ m);
void define_adam(pybind11::module_ m);
void define_conv_pool(pybind11::module_ m);
void define_winograd(pybind11::module_ m);

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = kIsa;
  define_pool_relu(m.def_submodule("pool_relu", "fused 2x2 max pooling and ReLU (pool_relu.cpp)"));
  define_adam(m.def_submodule("adam", "Adam on float32 masters with bfloat16 weights (adam.cpp)"));
  define_conv_pool(m.def_submodule("conv_pool", "one-channel convolution, bias, pooling and ReLU (conv_pool.cpp)"));
  define_winograd(m.def_submodule("winograd", "the transforms of a Winograd convolution F(4x4, 5x5) (winograd.cpp)"));
}
