// Adam for training with bfloat16 weights on the CPU: one pass over each parameter that reads its bfloat16
// gradient, updates the float32 master weights and Adam's two moments, and writes the bfloat16 copy the
// next forward pass multiplies with. Used by cnnkit/master_weights.py.
//
// The arithmetic is that of PyTorch's fused CPU Adam (torch._fused_adam_, float32, no weight decay, no
// amsgrad) operation for operation, so the masters and moments come out bit for bit as torch's would
// from the same gradient in float32 (tests/test_master_weights.py checks it):
//   exp_avg    = fma(1 - beta1, grad - exp_avg, exp_avg)          (torch's lerp)
//   exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
//   param      = param + (-step_size * exp_avg) / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
// with the step's constants computed in double and rounded to float as torch does. That is what torch's
// vectorised loop computes (its multiply-add of exp_avg_sq fused, as GCC compiled it); the library is
// compiled with -ffp-contract=off, so that the compiler fuses no other, and -fno-math-errno, so that sqrt
// vectorises. torch's scalar loop for the last (numel % 16) elements of a tensor rounds differently in a
// few percent of cases, so those few elements go through torch._fused_adam_ itself.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/from_blob.h>
#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#include "vectors.h"

// Elements per parallel task: below this the threads cost more than they save.
constexpr int64_t kGrainElements = 16384;
// torch's fused Adam runs its vectorised loop over whole groups of this many floats.
constexpr int64_t kVectorLanes = 16;

struct Constants {
  float lerp_weight, beta2, sq_weight, bias_correction2_sqrt, eps, minus_step_size;
};

Constants constants(double step, double lr, double beta1, double beta2, double eps) {
  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  return {static_cast<float>(1 - beta1),
          static_cast<float>(beta2),
          static_cast<float>(1 - beta2),
          static_cast<float>(std::sqrt(bias_correction2)),
          static_cast<float>(eps),
          static_cast<float>(-(lr / bias_correction1))};
}

// Round to nearest even, NaN to 0x7fc0: c10::BFloat16's conversion, which autocast's casts use, written
// without branches so that the loop below vectorises.
inline uint16_t to_bfloat16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t rounded = (word + 0x7fffu + ((word >> 16) & 1u)) >> 16;
  return value != value ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

void update(float* __restrict param, const uint16_t* __restrict grad, float* __restrict exp_avg,
            float* __restrict exp_avg_sq, uint16_t* __restrict copy, int64_t n, const Constants& k) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(grad[i]);
    const float m = std::fma(k.lerp_weight, g - exp_avg[i], exp_avg[i]);
    const float v = std::fma(k.sq_weight * g, g, exp_avg_sq[i] * k.beta2);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const float p = param[i] + (k.minus_step_size * m) / (std::sqrt(v) / k.bias_correction2_sqrt + k.eps);
    param[i] = p;
    copy[i] = to_bfloat16(p);
  }
}

// One Adam step over every parameter. masters, exp_avgs and exp_avg_sqs are float32, grads and copies
// bfloat16, all of a parameter's tensors with the same strides (dense, not overlapping); steps are
// Adam's step counts (float32 scalars), already incremented for this step.
void step(const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& grads,
          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
          const std::vector<at::Tensor>& copies, const std::vector<at::Tensor>& steps, double lr, double beta1,
          double beta2, double eps) {
  const size_t count = masters.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  copies.size() == count && steps.size() == count,
              "adam.step: expected as many gradients, moments, copies and steps as masters");
  for (size_t t = 0; t < count; ++t) {
    const at::Tensor& master = masters[t];
    TORCH_CHECK(master.device().is_cpu() && master.scalar_type() == at::kFloat &&
                    master.is_non_overlapping_and_dense(),
                "adam.step: masters must be dense float32 CPU tensors");
    for (const at::Tensor* other : {&exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(other->scalar_type() == at::kFloat && other->strides() == master.strides() &&
                      other->sizes() == master.sizes(),
                  "adam.step: moments must be float32 with their master's shape and strides");
    }
    for (const at::Tensor* other : {&grads[t], &copies[t]}) {
      TORCH_CHECK(other->scalar_type() == at::kBFloat16 && other->strides() == master.strides() &&
                      other->sizes() == master.sizes(),
                  "adam.step: gradients and copies must be bfloat16 with their master's shape and strides");
    }
    const Constants k = constants(steps[t].item<float>(), lr, beta1, beta2, eps);
    float* param = raw<float>(master);
    const uint16_t* grad = raw<uint16_t>(grads[t]);
    float* exp_avg = raw<float>(exp_avgs[t]);
    float* exp_avg_sq = raw<float>(exp_avg_sqs[t]);
    uint16_t* copy = raw<uint16_t>(copies[t]);
    const int64_t vectorised = master.numel() - master.numel() % kVectorLanes;
    at::parallel_for(0, vectorised, kGrainElements, [&](int64_t begin, int64_t end) {
      update(param + begin, grad + begin, exp_avg + begin, exp_avg_sq + begin, copy + begin, end - begin, k);
    });
    if (vectorised < master.numel()) {
      const int64_t tail = master.numel() - vectorised;
      const auto floats = master.options();
      auto flat = [&](void* data, const at::TensorOptions& options) {
        return at::from_blob(data, {tail}, options);
      };
      const at::Tensor tail_param = flat(param + vectorised, floats);
      at::_fused_adam_({tail_param}, {flat(const_cast<uint16_t*>(grad) + vectorised, copies[t].options()).to(at::kFloat)},
                       {flat(exp_avg + vectorised, floats)}, {flat(exp_avg_sq + vectorised, floats)}, {}, {steps[t]},
                       lr, beta1, beta2, 0.0, eps, false, false);
      flat(copy + vectorised, copies[t].options()).copy_(tail_param);
    }
  }
}

}  // namespace

namespace cnnkit::adam {
void step(const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& grads,
          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
          const std::vector<at::Tensor>& copies, const std::vector<at::Tensor>& steps, double lr, double beta1,
          double beta2, double eps) {
  ::step(masters, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2, eps);
}
}  // namespace cnnkit::adam
