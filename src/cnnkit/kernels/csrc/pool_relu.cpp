// Fused 2x2 max pooling (stride 2, ceil mode: TensorFlow's SAME padding) + ReLU on the CPU, for float
// and bfloat16 tensors in NCHW or NHWC (channels_last) memory. Used by cnnkit/pooling.py.
//
// The forward pass also writes one byte per output: the window position (0 top-left, 1 top-right,
// 2 bottom-left, 3 bottom-right) that receives the gradient, or 255 where ReLU cuts it off (output
// <= 0). The backward pass then only scatters. Results are bit for bit those of
// relu(max_pool2d(x, 2, 2, ceil_mode=True)) on the CPU: see `consider`, `finish` and
// `gradient_at_winner`.
//
// The arithmetic is written with GCC/Clang vector types of 16 lanes, which the compiler maps to the
// CPU's registers (one AVX-512 register of floats, two AVX2 ones, four NEON ones). Left to itself, GCC
// 12 vectorised these loops only sometimes: rows (NCHW) and channel runs (NHWC) are short, and where
// it did not, every comparison became a branch and the op ran 10-40 times slower.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr uint8_t kNoGradient = 255;
// Elements of input per parallel task: below this the threads cost more than they save.
constexpr int64_t kGrainElements = 32768;

#include "vectors.h"

// The gradient's lanes, as bits: the backward pass only moves them (and fixes -0.0 and NaN).
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using Vector = Words;
};
template <>
struct Bits<uint16_t> {
  using Vector = Halves;
};


// bfloat16 values are handled as their bits: widening to float is a shift, and since every value
// stored is one of the inputs (or 0), narrowing it back is a shift too (exact, NaN payloads included).
inline Floats load(const float* source) { return load_bits<Floats>(source); }
inline Floats load(const uint16_t* source) {
  return (Floats)(__builtin_convertvector(load_bits<Halves>(source), Words) << 16);
}
inline void store(float* destination, Floats values) { store_bits(destination, values); }
inline void store(uint16_t* destination, Floats values) {
  store_bits(destination, __builtin_convertvector((Words)values >> 16, Halves));
}

inline Floats select(Ints mask, Floats yes, Floats no) {
  return (Floats)((mask & (Ints)yes) | (~mask & (Ints)no));
}
inline Ints select(Ints mask, Ints yes, Ints no) { return (mask & yes) | (~mask & no); }

// max_pool2d's CPU rule: a larger value, or a NaN, replaces the running maximum. So the first of
// equal maxima wins, and of several NaNs the last one.
inline void consider(Floats value, int position, Floats& maximum, Ints& winner) {
  const Ints replaces = (value > maximum) | (value != value);
  maximum = select(replaces, value, maximum);
  winner = select(replaces, splat<Ints>(position), winner);
}

// torch.relu keeps -0.0 and NaN as they are, and its backward passes no gradient where out <= 0.
template <bool kNeedWinners, typename T>
inline void finish(Floats maximum, Ints winner, T* out, uint8_t* winners) {
  const Floats zero{};
  store(out, select(maximum < zero, zero, maximum));
  if (kNeedWinners) {
    const Ints codes = select(maximum <= zero, splat<Ints>(kNoGradient), winner);
    store_bits(winners, __builtin_convertvector(codes, Bytes));
  }
}

// max_pool2d's backward adds the gradient to a zero: -0.0 becomes +0.0, and in bfloat16 (added in
// float and rounded by c10) a NaN becomes the canonical NaN.
inline Words gradient_at_winner(Words bits) { return (Words)((Floats)bits + 0.0f); }
inline Halves gradient_at_winner(Halves bits) {
  const Halves is_nan = (Halves)((bits & splat<Halves>(0x7fff)) > splat<Halves>(0x7f80));
  const Halves negative_zero = (Halves)(bits == splat<Halves>(0x8000));
  return (bits & ~negative_zero & ~is_nan) | (splat<Halves>(0x7fc0) & is_nan);
}

// The gradient where the winner is `position`, +0.0 elsewhere.
template <typename Vector>
inline Vector gradient_if(Vector winners, int position, Vector value) {
  return value & (Vector)(winners == splat<Vector>(position));
}

int64_t grain(int64_t elements_per_task) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_task));
}

inline float minus_infinity(float) { return -std::numeric_limits<float>::infinity(); }
inline uint16_t minus_infinity(uint16_t) { return 0xff80; }


// --- NHWC: the four positions of a window are four contiguous runs of C channels ---

template <bool kHasRight, bool kHasBottom, bool kNeedWinners, typename T>
inline void pool_lanes(const T* top_left, const T* top_right, const T* bottom_left, const T* bottom_right,
                       T* out, uint8_t* winners) {
  Floats maximum = load(top_left);
  Ints winner{};
  if (kHasRight) consider(load(top_right), 1, maximum, winner);
  if (kHasBottom) consider(load(bottom_left), 2, maximum, winner);
  if (kHasRight && kHasBottom) consider(load(bottom_right), 3, maximum, winner);
  finish<kNeedWinners>(maximum, winner, out, winners);
}

template <bool kHasRight, bool kHasBottom, bool kNeedWinners, typename T>
void pool_channels(const T* top_left, const T* top_right, const T* bottom_left, const T* bottom_right, T* out,
                   uint8_t* winners, int64_t channels) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    pool_lanes<kHasRight, kHasBottom, kNeedWinners>(top_left + c, top_right + c, bottom_left + c,
                                                    bottom_right + c, out + c,
                                                    kNeedWinners ? winners + c : nullptr);
  }
  if (c < channels) {  // the last channels, through zero-padded copies
    const int64_t count = channels - c;
    T inputs[4][kLanes] = {}, outputs[kLanes];
    uint8_t codes[kLanes];
    copy(inputs[0], top_left + c, count);
    if (kHasRight) copy(inputs[1], top_right + c, count);
    if (kHasBottom) copy(inputs[2], bottom_left + c, count);
    if (kHasRight && kHasBottom) copy(inputs[3], bottom_right + c, count);
    pool_lanes<kHasRight, kHasBottom, kNeedWinners>(inputs[0], inputs[1], inputs[2], inputs[3], outputs, codes);
    copy(out + c, outputs, count);
    if (kNeedWinners) copy(winners + c, codes, count);
  }
}

template <bool kNeedWinners, typename T>
void forward_nhwc(const T* in, T* out, uint8_t* winners, int64_t batch, int64_t channels, int64_t height,
                  int64_t width) {
  const int64_t out_height = (height + 1) / 2, out_width = (width + 1) / 2;
  at::parallel_for(0, batch * out_height, grain(2 * width * channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_height, oh = row % out_height;
      const T* top = in + (n * height + 2 * oh) * width * channels;
      const bool has_bottom = 2 * oh + 1 < height;
      const T* bottom = has_bottom ? top + width * channels : top;
      for (int64_t ow = 0; ow < out_width; ++ow) {
        const int64_t left = 2 * ow * channels;
        const bool has_right = 2 * ow + 1 < width;
        const int64_t right = has_right ? left + channels : left;
        T* o = out + (row * out_width + ow) * channels;
        uint8_t* w = kNeedWinners ? winners + (row * out_width + ow) * channels : nullptr;
        if (has_right && has_bottom) {
          pool_channels<true, true, kNeedWinners>(top + left, top + right, bottom + left, bottom + right, o, w,
                                                  channels);
        } else if (has_bottom) {
          pool_channels<false, true, kNeedWinners>(top + left, top, bottom + left, bottom, o, w, channels);
        } else if (has_right) {
          pool_channels<true, false, kNeedWinners>(top + left, top + right, top, top, o, w, channels);
        } else {
          pool_channels<false, false, kNeedWinners>(top + left, top, top, top, o, w, channels);
        }
      }
    }
  });
}

template <bool kHasRight, bool kHasBottom, typename T>
inline void scatter_lanes(const T* gradient, const uint8_t* winners, T* top_left, T* top_right, T* bottom_left,
                          T* bottom_right) {
  using Vector = typename Bits<T>::Vector;
  const Vector value = gradient_at_winner(load_bits<Vector>(gradient));
  const Vector winner = __builtin_convertvector(load_bits<Bytes>(winners), Vector);
  store_bits(top_left, gradient_if(winner, 0, value));
  if (kHasRight) store_bits(top_right, gradient_if(winner, 1, value));
  if (kHasBottom) store_bits(bottom_left, gradient_if(winner, 2, value));
  if (kHasRight && kHasBottom) store_bits(bottom_right, gradient_if(winner, 3, value));
}

template <bool kHasRight, bool kHasBottom, typename T>
void scatter_channels(const T* gradient, const uint8_t* winners, T* top_left, T* top_right, T* bottom_left,
                      T* bottom_right, int64_t channels) {
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    scatter_lanes<kHasRight, kHasBottom>(gradient + c, winners + c, top_left + c, top_right + c,
                                         bottom_left + c, bottom_right + c);
  }
  if (c < channels) {
    const int64_t count = channels - c;
    T gradients[kLanes] = {}, outputs[4][kLanes];
    uint8_t codes[kLanes] = {};
    copy(gradients, gradient + c, count);
    copy(codes, winners + c, count);
    scatter_lanes<kHasRight, kHasBottom>(gradients, codes, outputs[0], outputs[1], outputs[2], outputs[3]);
    copy(top_left + c, outputs[0], count);
    if (kHasRight) copy(top_right + c, outputs[1], count);
    if (kHasBottom) copy(bottom_left + c, outputs[2], count);
    if (kHasRight && kHasBottom) copy(bottom_right + c, outputs[3], count);
  }
}

template <typename T>
void backward_nhwc(const T* gradient, const uint8_t* winners, T* grad_in, int64_t batch, int64_t channels,
                   int64_t height, int64_t width) {
  const int64_t out_height = (height + 1) / 2, out_width = (width + 1) / 2;
  at::parallel_for(0, batch * out_height, grain(2 * width * channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_height, oh = row % out_height;
      T* top = grad_in + (n * height + 2 * oh) * width * channels;
      const bool has_bottom = 2 * oh + 1 < height;
      T* bottom = has_bottom ? top + width * channels : top;
      for (int64_t ow = 0; ow < out_width; ++ow) {
        const int64_t left = 2 * ow * channels;
        const bool has_right = 2 * ow + 1 < width;
        const int64_t right = has_right ? left + channels : left;
        const int64_t at = (row * out_width + ow) * channels;
        if (has_right && has_bottom) {
          scatter_channels<true, true>(gradient + at, winners + at, top + left, top + right, bottom + left,
                                       bottom + right, channels);
        } else if (has_bottom) {
          scatter_channels<false, true>(gradient + at, winners + at, top + left, top, bottom + left, bottom,
                                        channels);
        } else if (has_right) {
          scatter_channels<true, false>(gradient + at, winners + at, top + left, top + right, top, top,
                                        channels);
        } else {
          scatter_channels<false, false>(gradient + at, winners + at, top + left, top, top, top, channels);
        }
      }
    }
  });
}

// --- NCHW: a window is two neighbours in each of two rows ---

// Lane shuffles: Clang's __builtin_shufflevector (GCC has it only from version 12), or GCC's
// __builtin_shuffle, which takes the lane indices as a vector of integers as wide as the lanes.
#if defined(__clang__)
#define SHUFFLE(Lanes, first, second, ...) __builtin_shufflevector(first, second, __VA_ARGS__)
#else
#define SHUFFLE(Lanes, first, second, ...) \
  __builtin_shuffle(first, second, typename Indices<Lanes>::Vector{__VA_ARGS__})
#endif
typedef int16_t HalfIndices __attribute__((vector_size(2 * kLanes)));
template <typename Lanes>
struct Indices;
template <>
struct Indices<Floats> {
  using Vector = Ints;
};
template <>
struct Indices<Words> {
  using Vector = Ints;
};
template <>
struct Indices<Halves> {
  using Vector = HalfIndices;
};

// 2 * kLanes neighbours, split into the left (even) and right (odd) ones, and back.
template <typename T>
inline void load_pairs(const T* source, Floats& left, Floats& right) {
  const Floats low = load(source), high = load(source + kLanes);
  left = SHUFFLE(Floats, low, high, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  right = SHUFFLE(Floats, low, high, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
template <typename T, typename Vector>
inline void store_pairs(T* destination, Vector left, Vector right) {
  store_bits(destination, SHUFFLE(Vector, left, right, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  store_bits(destination + kLanes,
             SHUFFLE(Vector, left, right, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

template <bool kHasBottom, bool kNeedWinners, typename T>
inline void pool_pairs(const T* top, const T* bottom, T* out, uint8_t* winners) {
  Floats maximum, top_right;
  load_pairs(top, maximum, top_right);
  Ints winner{};
  consider(top_right, 1, maximum, winner);
  if (kHasBottom) {
    Floats bottom_left, bottom_right;
    load_pairs(bottom, bottom_left, bottom_right);
    consider(bottom_left, 2, maximum, winner);
    consider(bottom_right, 3, maximum, winner);
  }
  finish<kNeedWinners>(maximum, winner, out, winners);
}

template <bool kHasBottom, bool kNeedWinners, typename T>
void pool_row(const T* top, const T* bottom, T* out, uint8_t* winners, int64_t width) {
  const int64_t out_width = (width + 1) / 2;
  int64_t ow = 0;
  for (; ow + kLanes <= width / 2; ow += kLanes) {
    pool_pairs<kHasBottom, kNeedWinners>(top + 2 * ow, bottom + 2 * ow, out + ow,
                                         kNeedWinners ? winners + ow : nullptr);
  }
  if (ow < out_width) {
    // The rest through copies padded with -inf, which never replaces a maximum: that also makes ceil
    // mode's last window of one column.
    const int64_t count = out_width - ow, inputs = width - 2 * ow;
    T top_copy[2 * kLanes], bottom_copy[2 * kLanes], outputs[kLanes];
    uint8_t codes[kLanes];
    std::fill_n(top_copy, 2 * kLanes, minus_infinity(T()));
    copy(top_copy, top + 2 * ow, inputs);
    if (kHasBottom) {
      std::fill_n(bottom_copy, 2 * kLanes, minus_infinity(T()));
      copy(bottom_copy, bottom + 2 * ow, inputs);
    }
    pool_pairs<kHasBottom, kNeedWinners>(top_copy, bottom_copy, outputs, codes);
    copy(out + ow, outputs, count);
    if (kNeedWinners) copy(winners + ow, codes, count);
  }
}

template <bool kNeedWinners, typename T>
void forward_nchw(const T* in, T* out, uint8_t* winners, int64_t batch, int64_t channels, int64_t height,
                  int64_t width) {
  const int64_t out_height = (height + 1) / 2, out_width = (width + 1) / 2;
  at::parallel_for(0, batch * channels * out_height, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / out_height, oh = row % out_height;
      const T* top = in + (plane * height + 2 * oh) * width;
      T* o = out + row * out_width;
      uint8_t* w = kNeedWinners ? winners + row * out_width : nullptr;
      if (2 * oh + 1 < height) {
        pool_row<true, kNeedWinners>(top, top + width, o, w, width);
      } else {
        pool_row<false, kNeedWinners>(top, top, o, w, width);
      }
    }
  });
}

template <bool kHasBottom, typename T>
inline void scatter_pairs(const T* gradient, const uint8_t* winners, T* top, T* bottom) {
  using Vector = typename Bits<T>::Vector;
  const Vector value = gradient_at_winner(load_bits<Vector>(gradient));
  const Vector winner = __builtin_convertvector(load_bits<Bytes>(winners), Vector);
  store_pairs(top, gradient_if(winner, 0, value), gradient_if(winner, 1, value));
  if (kHasBottom) store_pairs(bottom, gradient_if(winner, 2, value), gradient_if(winner, 3, value));
}

template <bool kHasBottom, typename T>
void scatter_row(const T* gradient, const uint8_t* winners, T* top, T* bottom, int64_t width) {
  const int64_t out_width = (width + 1) / 2;
  int64_t ow = 0;
  for (; ow + kLanes <= width / 2; ow += kLanes) {
    scatter_pairs<kHasBottom>(gradient + ow, winners + ow, top + 2 * ow, bottom + 2 * ow);
  }
  if (ow < out_width) {
    const int64_t count = out_width - ow, inputs = width - 2 * ow;
    T gradients[kLanes] = {}, top_copy[2 * kLanes], bottom_copy[2 * kLanes];
    uint8_t codes[kLanes];
    std::fill_n(codes, kLanes, kNoGradient);
    copy(gradients, gradient + ow, count);
    copy(codes, winners + ow, count);
    scatter_pairs<kHasBottom>(gradients, codes, top_copy, bottom_copy);
    copy(top + 2 * ow, top_copy, inputs);
    if (kHasBottom) copy(bottom + 2 * ow, bottom_copy, inputs);
  }
}

template <typename T>
void backward_nchw(const T* gradient, const uint8_t* winners, T* grad_in, int64_t batch, int64_t channels,
                   int64_t height, int64_t width) {
  const int64_t out_height = (height + 1) / 2, out_width = (width + 1) / 2;
  at::parallel_for(0, batch * channels * out_height, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / out_height, oh = row % out_height;
      T* top = grad_in + (plane * height + 2 * oh) * width;
      const int64_t at = row * out_width;
      if (2 * oh + 1 < height) {
        scatter_row<true>(gradient + at, winners + at, top, top + width, width);
      } else {
        scatter_row<false>(gradient + at, winners + at, top, top, width);
      }
    }
  });
}

// --- entry points ---

at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& winners, bool channels_last) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const T* in = raw<T>(x);
  T* o = raw<T>(out);
  if (winners.defined()) {
    uint8_t* win = winners.data_ptr<uint8_t>();
    channels_last ? forward_nhwc<true>(in, o, win, n, c, h, w) : forward_nchw<true>(in, o, win, n, c, h, w);
  } else {
    channels_last ? forward_nhwc<false, T>(in, o, nullptr, n, c, h, w)
                  : forward_nchw<false, T>(in, o, nullptr, n, c, h, w);
  }
}

// Returns (output, winners); winners is None when need_winners is false.
std::vector<at::Tensor> forward(const at::Tensor& x, bool channels_last, bool need_winners) {
  const auto format = memory_format(channels_last);
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(format),
              "pool_relu.forward: expected a 4-d CPU tensor contiguous in the given memory format");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "pool_relu.forward: expected float32 or bfloat16, got ", x.scalar_type());
  const std::vector<int64_t> out_size{x.size(0), x.size(1), (x.size(2) + 1) / 2, (x.size(3) + 1) / 2};
  at::Tensor out = at::empty(out_size, x.options().memory_format(format));
  at::Tensor winners;
  if (need_winners) winners = at::empty(out_size, x.options().dtype(at::kByte).memory_format(format));
  if (out.numel() > 0) {
    if (x.scalar_type() == at::kFloat) {
      run_forward<float>(x, out, winners, channels_last);
    } else {
      run_forward<uint16_t>(x, out, winners, channels_last);
    }
  }
  return {out, winners};
}

template <typename T>
void run_backward(const at::Tensor& gradient, const at::Tensor& winners, const at::Tensor& grad_in,
                  bool channels_last) {
  const int64_t n = grad_in.size(0), c = grad_in.size(1), h = grad_in.size(2), w = grad_in.size(3);
  const T* g = raw<T>(gradient);
  const uint8_t* win = winners.data_ptr<uint8_t>();
  T* gi = raw<T>(grad_in);
  channels_last ? backward_nhwc(g, win, gi, n, c, h, w) : backward_nchw(g, win, gi, n, c, h, w);
}

// The gradient with respect to the input of shape (N, C, height, width), in the given memory format.
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& winners, int64_t height, int64_t width,
                    bool channels_last) {
  const auto format = memory_format(channels_last);
  TORCH_CHECK(winners.dim() == 4 && winners.scalar_type() == at::kByte && winners.is_contiguous(format),
              "pool_relu.backward: winners must come from forward");
  TORCH_CHECK(grad_out.sizes() == winners.sizes(), "pool_relu.backward: gradient and winners differ in shape");
  TORCH_CHECK(winners.size(2) == (height + 1) / 2 && winners.size(3) == (width + 1) / 2,
              "pool_relu.backward: height and width do not match the winners");
  TORCH_CHECK(grad_out.scalar_type() == at::kFloat || grad_out.scalar_type() == at::kBFloat16,
              "pool_relu.backward: expected a float32 or bfloat16 gradient");
  const at::Tensor gradient = grad_out.contiguous(format);
  at::Tensor grad_in =
      at::empty({winners.size(0), winners.size(1), height, width}, grad_out.options().memory_format(format));
  if (grad_in.numel() > 0) {
    if (gradient.scalar_type() == at::kFloat) {
      run_backward<float>(gradient, winners, grad_in, channels_last);
    } else {
      run_backward<uint16_t>(gradient, winners, grad_in, channels_last);
    }
  }
  return grad_in;
}

}  // namespace

namespace cnnkit::pool_relu {
std::vector<at::Tensor> forward(const at::Tensor& x, bool channels_last, bool need_winners) {
  return ::forward(x, channels_last, need_winners);
}
at::Tensor backward(const at::Tensor& grad_out, const at::Tensor& winners, int64_t height, int64_t width,
                    bool channels_last) {
  return ::backward(grad_out, winners, height, width, channels_last);
}
}  // namespace cnnkit::pool_relu
