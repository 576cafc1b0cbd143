// cnnkit's C++ kernels as one Python module, compiled at first use by cnnkit/extension.py: a submodule
// per source file.
#include <torch/csrc/utils/pybind.h>

void define_pool_relu(pybind11::module_ m);
void define_adam(pybind11::module_ m);
void define_conv_pool(pybind11::module_ m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  define_pool_relu(m.def_submodule("pool_relu", "fused 2x2 max pooling and ReLU (pool_relu.cpp)"));
  define_adam(m.def_submodule("adam", "Adam on float32 masters with bfloat16 weights (adam.cpp)"));
  define_conv_pool(m.def_submodule("conv_pool", "one-channel convolution, bias, pooling and ReLU (conv_pool.cpp)"));
}
