// The first layer of the chapter's CNN fused on the CPU: a VALID convolution of images with ONE channel
// by C filters of k x k, its bias, 2x2 max pooling (stride 2, ceil mode: TensorFlow's SAME padding)
// and ReLU, for float32 and bfloat16 tensors. Used by cnnkit/conv_pool.py.
//
// Forward: out = relu(max_pool2d(conv2d(x, weight, bias), 2, 2, ceil_mode=True)) in channels_last, and
// one byte per output: the window position (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)
// of the winning convolution output, or 255 where ReLU cuts it off (output <= 0). The convolution's
// output is never stored.
//
// The arithmetic is fixed, whatever the threads or the instruction set. Each convolution output is
//   acc = +0.0f; for i in 0..k-1: for j in 0..k-1: acc = acc + x[i][j] * w[i][j]
// in float32, a multiply then an add (never fused: the library is compiled with -ffp-contract=off),
// then acc = acc + bias, rounded to the output's dtype (bfloat16: to nearest even, NaN to 0x7fc0, as
// c10::BFloat16 does). That is not oneDNN's order, so the outputs are not bit for bit F.conv2d's; the
// tests compare them with a pure-PyTorch computation in this order. Then max pooling with max_pool2d's
// CPU rules (in each window, in the order above, a larger value or a NaN replaces the running maximum,
// so the first of equal maxima wins; ceil mode's edge windows have fewer positions) and ReLU, which
// keeps -0.0 and NaN, as in pool_relu.cpp.
//
// A product of two bfloat16 values is exact in float32 (8-bit significands) unless it underflows or
// overflows. So with AVX512-BF16, bfloat16 images go through VDPBF16PS, which adds two such products
// to a float32 sum one after the other, each addition rounded to nearest even (the high halves' product
// first: the taps are paired in that order, and the bias comes last, times 1.0): the bits of the loop
// above in half the instructions, but for subnormal numbers, which it reads and writes as zeros.
// `pairs_are_exact` and `biases_are_exact` check, per image, that every value is finite, and that every
// product, and the bias, is a multiple of 2^-126 (so that no partial sum is subnormal) and below 2^128;
// the other images, and float32 ones, take the multiply-add loop.
//
// Backward: only the gradients with respect to the weight and the bias (the images need none), sums
// over the winning positions only:
//   grad_weight[c][i][j] = sum, over images n and pooled outputs p not cut off by ReLU, of
//                          grad_out[n][c][p] * x[n][row(p, c) + i][col(p, c) + j]
//   grad_bias[c]         = sum of those grad_out[n][c][p]
// where (row, col) is the winning convolution output. They are accumulated in float32 per chunk of
// kChunkImages images, image by image and output by output (row by row), the chunks' sums are added in
// chunk order and the totals rounded to the weight's dtype: deterministic, whatever the number of
// threads. With AVX-512 and k = 3, 5 or 7 each term is one fused multiply-add, the 16 channels of a
// vector taking their own x by a permutation of lanes; bfloat16 chunks for which `pairs_are_exact`
// holds go through VDPBF16PS, two outputs at a time, in the same order and with the same roundings (the
// products are exact), so to the same bits. Elsewhere each term is a multiply and an add, lane by lane.
//
// Like pool_relu.cpp, the code is written with GCC/Clang vector types of 16 lanes, and AVX-512
// intrinsics (and a few lines of assembly) where they do much better. Compiled without AVX-512, the
// portable code is correct but slower than PyTorch's own ops (GCC 12 spills 16-lane vectors on AVX2),
// and cnnkit/conv_pool.py does not use it (`vectorised`). Measured on a 2-core AVX-512 EPYC (Zen 4),
// (64, 1, 28, 28) bfloat16 images and 32 filters of 5x5, 2 threads: 190 us forward and 90 us backward,
// against 310 + 110 us forward and 370 + 85 us backward for conv2d (oneDNN) and cnnkit.pooling.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include "kernels.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CNNKIT_PAIRS 1  // VDPBF16PS
#endif

namespace {

constexpr uint8_t kCut = 255;
// Images per partial sum of the backward pass: fixed, so that the sums do not depend on the threads.
constexpr int64_t kChunkImages = 8;

#include "vectors.h"

// bfloat16 values are handled as their bits (uint16_t): widening to float is a shift, and narrowing a
// value already rounded to bfloat16 is a shift too. (GCC 12 widens bytes and narrows words lane by
// lane or through permutations: the intrinsics say how.)
inline Floats load(const float* source) { return load_bits<Floats>(source); }
inline Floats load(const uint16_t* source) {
#if defined(__AVX512F__)
  return (Floats)_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_bits<__m256i>(source)), 16);
#else
  return (Floats)(__builtin_convertvector(load_bits<Halves>(source), Words) << 16);
#endif
}
inline void store(float* destination, Floats values) { store_bits(destination, values); }
inline void store(uint16_t* destination, Floats values) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(destination), _mm512_cvtepi32_epi16((__m512i)((Words)values >> 16)));
#else
  store_bits(destination, __builtin_convertvector((Words)values >> 16, Halves));
#endif
}
inline Ints widen(Bytes bytes) {
#if defined(__AVX512F__)
  return (Ints)_mm512_cvtepu8_epi32((__m128i)bytes);
#else
  return __builtin_convertvector(bytes, Ints);
#endif
}

// mask ? yes : no, lane by lane (each lane of the mask all ones or all zeros). With AVX-512 GCC makes it a
// blend under a mask register; elsewhere GCC 12 would pick lane by lane (see pool_relu.cpp), so bitwise.
template <typename Vector>
inline Vector select(Ints mask, Vector yes, Vector no) {
#if defined(__AVX512F__)
  return mask ? yes : no;
#else
  return (Vector)((mask & (Ints)yes) | (~mask & (Ints)no));
#endif
}

template <typename T>
inline T from_float(float value);
template <>
inline float from_float<float>(float value) {
  return value;
}
template <>
inline uint16_t from_float<uint16_t>(float value) {
  return c10::BFloat16(value).x;  // to nearest even, NaN to 0x7fc0
}

// --- the shapes, and the padded copies of an image ---

struct Shape {
  int64_t batch, channels, groups, height, width, k, conv_height, conv_width, out_height, out_width;
  int64_t stride;  // row length of the padded copies of an image
  int64_t rows;  // rows of the padded copies

  Shape(const at::Tensor& x, const at::Tensor& weight)
      : batch(x.size(0)),
        channels(weight.size(0)),
        groups((weight.size(0) + kLanes - 1) / kLanes),
        height(x.size(2)),
        width(x.size(3)),
        k(weight.size(3)),
        conv_height(height - k + 1),
        conv_width(width - k + 1),
        out_height((conv_height + 1) / 2),
        out_width((conv_width + 1) / 2),
        // The forward pass computes kPooled pooled outputs at a time, each from its whole window: the
        // last ones may reach 7 columns and 1 row beyond the convolution's output, which read zeros;
        // make_pairs writes whole vectors of 16 columns, up to width + 5.
        stride(std::max(width + k + 16, (width + 6 + kLanes - 1) / kLanes * kLanes)),
        rows(height + 2) {}

  int64_t taps() const { return k * k; }
  int64_t image_size() const { return height * width; }
  int64_t padded_size() const { return rows * stride; }
  int64_t out_plane() const { return out_height * out_width * channels; }
};

// The image into the top left of a padded buffer, whose padding is zero and stays so.
template <typename T, typename U>
void load_image(const T* x, const Shape& s, U* image) {
  for (int64_t r = 0; r < s.height; ++r) {
    const T* row = x + r * s.width;
    U* destination = image + r * s.stride;
    if constexpr (std::is_same_v<T, U>) {
      copy(destination, row, s.width);
    } else {
      for (int64_t c = 0; c < s.width; ++c) destination[c] = to_float(row[c]);
    }
  }
}

// --- forward: the convolution ---

// The convolution outputs computed together: the 2x2 windows of kPooled neighbouring pooled outputs
// of a row. acc[4 * q + d] is window position d of pooled output q, at rows kRow and columns kCol
// from the first window's top left.
#if defined(__AVX512F__)
constexpr int kPooled = 4;  // 16 sums in flight (VDPBF16PS's latency) in 16 of the 32 registers
#else
constexpr int kPooled = 1;  // 4 sums, in 8 of AVX2's 16 registers (2 each)
#endif
constexpr int kOutputs = 4 * kPooled;
constexpr int kRow[16] = {0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1};
constexpr int kCol[16] = {0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7};

// The header's loop, 16 channels a vector. K > 0: k known at compile time.
template <int K>
inline void convolve(const float* image, int64_t stride, int64_t k_runtime, const Floats* weights,
                     Floats (&acc)[kOutputs]) {
  const int64_t k = K > 0 ? K : k_runtime;
#if defined(__AVX512F__)
#pragma GCC unroll 8
#else  // unrolled, GCC 12 would keep the broadcasts that several taps share, and spill the sums
#pragma GCC unroll 1
#endif
  for (int64_t i = 0; i < k; ++i) {
#if defined(__AVX512F__)
#pragma GCC unroll 8
#else
#pragma GCC unroll 1
#endif
    for (int64_t j = 0; j < k; ++j) {
      const Floats w = weights[i * k + j];
      const float* x = image + i * stride + j;
#pragma GCC unroll 16
      for (int o = 0; o < kOutputs; ++o) {
        const float* value = x + kRow[o] * stride + kCol[o];
#if defined(__AVX512F__)
        // x broadcast within the multiplication (m32bcst). Written in C, GCC 12 keeps the broadcasts that
        // several taps share in registers, and then spills the sums; and a multiply alone in asm would
        // be hoisted before all the additions.
        Floats product;
        __asm__("vmulps %3%{1to16%}, %2, %1\n\tvaddps %1, %0, %0"
                : "+v"(acc[o]), "=&v"(product)
                : "v"(w), "m"(*value));
#else
        acc[o] = acc[o] + w * *value;
#endif
      }
    }
  }
}

#if defined(CNNKIT_PAIRS)
// The same sums, bias included, with VDPBF16PS: tap 2m (the high halves) then tap 2m + 1 (the low
// halves) in one instruction. pairs[r][c] holds x[r][c] and x[r][c + 1]; where tap 2m ends a row of
// the filter, its partner, the first tap of the next row, is in cross[r][c], which holds
// x[r][c + k - 1] and x[r + 1][c]. The last instruction adds the bias, times 1.0: with k odd, after the
// last tap (last[r][c] holds x[r][c] and 1.0); with k even, alone (and 0 * 0, which adds +0.0 to a sum
// that is never -0.0: no change).
struct PairImages {
  const uint32_t* pairs;
  const uint32_t* cross;
  const uint32_t* last;
};
constexpr uint32_t kOneAndZero = 0x3f800000;  // bfloat16 1.0, then 0.0
constexpr int64_t kLargestPairedK = 17;  // see make_pairs

template <int K>
inline void convolve_pairs(PairImages images, int64_t at, int64_t stride, int64_t k_runtime,
                           const Words* weight_pairs, Floats (&acc)[kOutputs]) {
  const int64_t k = K > 0 ? K : k_runtime;
  const auto add = [&](const uint32_t* x, int64_t step, Words weights) {
    const __m512bh w = (__m512bh)weights;
#pragma GCC unroll 16
    for (int o = 0; o < kOutputs; ++o) {
      // x broadcast within the instruction (m32bcst), which GCC 12 does not do by itself.
      __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc[o]) : "v"(w), "m"(x[step * (kRow[o] * stride + kCol[o])]));
    }
  };
#pragma GCC unroll 32
  for (int64_t m = 0; m < k * k / 2; ++m) {
    const int64_t i = 2 * m / k, j = 2 * m % k;
    add(j + 1 < k ? images.pairs + at + i * stride + j : images.cross + at + i * stride, 1, weight_pairs[m]);
  }
  if (k % 2 == 1) {
    add(images.last + at + (k - 1) * stride + k - 1, 1, weight_pairs[k * k / 2]);
  } else {
    add(&kOneAndZero, 0, weight_pairs[k * k / 2]);
  }
}
#endif

// The range of the exponent fields of the nonzero values among bfloat16 bits.
struct Exponents {
  int smallest = 255, largest = 0;
  bool any = false;
};

#if defined(CNNKIT_PAIRS)
Exponents exponents(const uint16_t* bits, int64_t count) {
  // The smallest nonzero magnitude (as magnitude - 1, where zero wraps around to the largest) and the
  // largest: their exponents are the smallest and the largest.
  typedef uint16_t Magnitudes __attribute__((vector_size(64)));
  Magnitudes smallest = splat<Magnitudes>(0xffff), largest{};
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    const Magnitudes magnitude = load_bits<Magnitudes>(bits + i) & 0x7fff;
    const Magnitudes below = magnitude - 1;
    smallest = below < smallest ? below : smallest;
    largest = magnitude > largest ? magnitude : largest;
  }
  uint16_t low = 0xffff, high = 0;
  for (int64_t lane = 0; lane < 32; ++lane) {
    low = std::min(low, smallest[lane]);
    high = std::max(high, largest[lane]);
  }
  for (; i < count; ++i) {
    const uint16_t magnitude = bits[i] & 0x7fff;
    low = std::min(low, static_cast<uint16_t>(magnitude - 1));
    high = std::max(high, magnitude);
  }
  Exponents result;
  result.any = high != 0;
  result.smallest = result.any ? (low + 1) >> 7 : 255;
  result.largest = high >> 7;
  return result;
}

// Whether VDPBF16PS computes exactly the header's sums for these images and weights: all finite, no
// subnormal input (it would read it as zero), every product a multiple of 2^-126 (so every partial
// sum is zero or normal, never flushed to zero) and below 2^128 (no overflow). A bfloat16 of exponent
// field e (1..254) is a multiple of 2^(e - 134) and below 2^(e - 126). Then no sum is NaN either (a
// sum of finite products may overflow to an infinity, but never meets one of the other sign), nor
// -0.0 (sums start at +0.0, and x + y is -0.0 only for x = y = -0.0, or after an underflow).
bool pairs_are_exact(const Exponents& x, const Exponents& w) {
  if (x.largest == 255 || w.largest == 255) return false;  // infinity or NaN
  if (!x.any || !w.any) return true;  // all products are zero
  return x.smallest >= 1 && w.smallest >= 1 && x.smallest + w.smallest >= 142 && x.largest + w.largest <= 380;
}

// Whether sum + bias is never NaN, -0.0 nor subnormal for such sums: every bias finite and a
// multiple of 2^-126 too (zero, or of exponent field 8 or more).
bool biases_are_exact(const uint16_t* bits, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const int magnitude = bits[i] & 0x7fff, exponent = magnitude >> 7;
    if (exponent == 255 || (magnitude != 0 && exponent < 8)) return false;
  }
  return true;
}
#endif

// --- forward: pooling and ReLU ---

// The convolution's output in the output's dtype: float32 as it is; bfloat16 rounded to nearest even,
// NaN to 0x7fc0 (c10::BFloat16's conversion), kept widened to float for the comparisons.
inline Floats rounded(float, Floats value) { return value; }
inline Floats rounded(uint16_t, Floats value) {
  const Words bits = (Words)value;
  const Words nearest = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  return select(value != value, (Floats)splat<Words>(0x7fc00000u), (Floats)nearest);
}

// max_pool2d's CPU rule: a larger value, or a NaN, replaces the running maximum. So the first of
// equal maxima wins, and of several NaNs the last one.
inline void consider(Floats value, int position, Floats& maximum, Ints& winner) {
  const Ints replaces = (value > maximum) | (value != value);
  maximum = select(replaces, value, maximum);
  winner = select(replaces, splat<Ints>(position), winner);
}

template <typename T>
inline void pool(const Floats* acc, Floats bias, bool has_right, bool has_bottom, T* out, uint8_t* winners,
                 int64_t count) {
  Floats maximum = rounded(T(), acc[0] + bias);
  Ints winner{};
  if (has_right) consider(rounded(T(), acc[1] + bias), 1, maximum, winner);
  if (has_bottom) {
    consider(rounded(T(), acc[2] + bias), 2, maximum, winner);
    if (has_right) consider(rounded(T(), acc[3] + bias), 3, maximum, winner);
  }
  // torch.relu keeps -0.0 and NaN, and its backward passes no gradient where out <= 0.
  const Floats zero{};
  const Floats output = select(maximum < zero, zero, maximum);
  const Bytes codes = __builtin_convertvector(select(maximum <= zero, splat<Ints>(kCut), winner), Bytes);
  if (count == kLanes) {
    store(out, output);
    if (winners != nullptr) store_bits(winners, codes);
  } else {  // the last channels
    T outputs[kLanes];
    uint8_t bytes[kLanes];
    store(outputs, output);
    store_bits(bytes, codes);
    copy(out, outputs, count);
    if (winners != nullptr) copy(winners, bytes, count);
  }
}

#if defined(CNNKIT_PAIRS)
// The same for the sums of convolve_pairs (bias included), which are never NaN, -0.0 nor subnormal:
// VCVTNE(2)PS2BF16 rounds them as c10 does. Their bfloat16 bits, compared as 16-bit integers, order
// the positive values as the values do, and put the negative ones below +0.0: in another order, but the
// maximum's bits only matter where it is positive (elsewhere ReLU outputs +0.0 and no winner).
template <bool kHasRight, bool kHasBottom>
inline void pool_pairs(const Floats* acc, uint16_t* out, uint8_t* winners, int64_t count) {
  const auto bits = [&](int position) { return (__m256i)_mm512_cvtneps_pbh((__m512)acc[position]); };
  __m256i maximum = bits(0);
  __m128i winner = _mm_setzero_si128();
  const auto consider_bits = [&](int position) {
    const __m256i value = bits(position);
    winner = _mm_mask_mov_epi8(winner, _mm256_cmpgt_epi16_mask(value, maximum), _mm_set1_epi8(position));
    maximum = _mm256_max_epi16(maximum, value);
  };
  if (kHasRight) consider_bits(1);
  if (kHasBottom) consider_bits(2);
  if (kHasRight && kHasBottom) consider_bits(3);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i output = _mm256_max_epi16(maximum, zero);
  const __m128i codes =
      _mm_mask_mov_epi8(_mm_set1_epi8(static_cast<char>(kCut)), _mm256_cmpgt_epi16_mask(maximum, zero), winner);
  const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
  _mm256_mask_storeu_epi16(out, lanes, output);
  if (winners != nullptr) _mm_mask_storeu_epi8(winners, lanes, codes);
}

inline void pool_pairs(const Floats* acc, bool has_right, bool has_bottom, uint16_t* out, uint8_t* winners,
                       int64_t count) {
  if (has_right && has_bottom) {
    pool_pairs<true, true>(acc, out, winners, count);
  } else if (has_bottom) {
    pool_pairs<false, true>(acc, out, winners, count);
  } else if (has_right) {
    pool_pairs<true, false>(acc, out, winners, count);
  } else {
    pool_pairs<false, false>(acc, out, winners, count);
  }
}

// Two neighbouring whole windows (acc[0..3] and acc[4..7]) of 16 channels at once, in the 32 lanes of
// one vector; the second pooled output is `next` elements after the first.
inline void pool_two_pairs(const Floats* acc, uint16_t* out, uint8_t* winners, int64_t next) {
  const auto bits = [&](int position) {
    return (__m512i)_mm512_cvtne2ps_pbh((__m512)acc[4 + position], (__m512)acc[position]);
  };
  __m512i maximum = bits(0);
  __m256i winner = _mm256_setzero_si256();
#pragma GCC unroll 4
  for (int position = 1; position < 4; ++position) {
    const __m512i value = bits(position);
    winner = _mm256_mask_mov_epi8(winner, _mm512_cmpgt_epi16_mask(value, maximum), _mm256_set1_epi8(position));
    maximum = _mm512_max_epi16(maximum, value);
  }
  const __m512i zero = _mm512_setzero_si512();
  const __m512i output = _mm512_max_epi16(maximum, zero);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_castsi512_si256(output));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + next), _mm512_extracti64x4_epi64(output, 1));
  if (winners != nullptr) {
    const __m256i codes = _mm256_mask_mov_epi8(_mm256_set1_epi8(static_cast<char>(kCut)),
                                               _mm512_cmpgt_epi16_mask(maximum, zero), winner);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(winners), _mm256_castsi256_si128(codes));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(winners + next), _mm256_extracti128_si256(codes, 1));
  }
}
#endif

// --- forward: the images ---

struct Weights {
  std::vector<Floats> taps;  // [group][tap]: 16 channels' weights, zero beyond the last channel
  std::vector<Floats> biases;  // [group]
  std::vector<Words> pairs;  // [group][pair m]: the bfloat16 weights of taps 2m (high) and 2m + 1 (low)
  int64_t pairs_per_group = 0;
  Exponents exponents;  // of the weights
  bool biases_are_exact = false;
};

template <typename T>
Weights prepare_weights(const at::Tensor& weight, const at::Tensor& bias, const Shape& s) {
  // Contiguous float32 copies, (C, k * k) and (C,), whatever the strides (read directly: ATen's copies
  // cost microseconds).
  std::vector<float> w(s.channels * s.taps()), b(s.channels);
  const T* weights = raw<T>(weight);
  const T* biases = raw<T>(bias);
  const int64_t s0 = weight.stride(0), s2 = weight.stride(2), s3 = weight.stride(3);
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t i = 0; i < s.k; ++i) {
      for (int64_t j = 0; j < s.k; ++j) w[c * s.taps() + i * s.k + j] = to_float(weights[c * s0 + i * s2 + j * s3]);
    }
    b[c] = to_float(biases[c * bias.stride(0)]);
  }
  const float* wp = w.data();
  const float* bp = b.data();
  Weights result;
  result.taps.assign(s.groups * s.taps(), Floats{});
  result.biases.assign(s.groups, Floats{});
  for (int64_t c = 0; c < s.channels; ++c) {
    const int64_t g = c / kLanes, lane = c % kLanes;
    for (int64_t t = 0; t < s.taps(); ++t) result.taps[g * s.taps() + t][lane] = wp[c * s.taps() + t];
    result.biases[g][lane] = bp[c];
  }
#if defined(CNNKIT_PAIRS)
  if (std::is_same_v<T, uint16_t>) {
    const auto bfloat16_bits = [](const float* values, int64_t count) {
      std::vector<uint16_t> bits(count);
      for (int64_t i = 0; i < count; ++i) {
        uint32_t word;
        std::memcpy(&word, values + i, sizeof word);
        bits[i] = static_cast<uint16_t>(word >> 16);  // exact: these floats were bfloat16
      }
      return bits;
    };
    const std::vector<uint16_t> bits = bfloat16_bits(wp, s.channels * s.taps());
    result.exponents = exponents(bits.data(), bits.size());
    const std::vector<uint16_t> bias_bits = bfloat16_bits(bp, s.channels);
    result.biases_are_exact = biases_are_exact(bias_bits.data(), s.channels);
    result.pairs_per_group = s.taps() / 2 + 1;  // see convolve_pairs
    result.pairs.assign(s.groups * result.pairs_per_group, Words{});
    for (int64_t c = 0; c < s.channels; ++c) {
      const int64_t g = c / kLanes, lane = c % kLanes;
      const uint16_t* w = bits.data() + c * s.taps();
      Words* pairs = result.pairs.data() + g * result.pairs_per_group;
      for (int64_t m = 0; m < s.taps() / 2; ++m) pairs[m][lane] = static_cast<uint32_t>(w[2 * m]) << 16 | w[2 * m + 1];
      const uint32_t last = s.taps() % 2 == 1 ? static_cast<uint32_t>(w[s.taps() - 1]) << 16 | bias_bits[c]
                                              : static_cast<uint32_t>(bias_bits[c]) << 16;
      pairs[s.taps() / 2][lane] = last;
    }
  }
#endif
  return result;
}

#if defined(CNNKIT_PAIRS)
// x[r][c .. c + 31] (bfloat16 bits), zero outside the image.
inline __m512i image_words(const uint16_t* x, const Shape& s, int64_t r, int64_t c) {
  if (r >= s.height || c >= s.width) return _mm512_setzero_si512();
  const int64_t count = std::min<int64_t>(2 * kLanes, s.width - c);
  const __mmask32 lanes = static_cast<__mmask32>((uint64_t{1} << count) - 1);
  return _mm512_maskz_loadu_epi16(lanes, x + r * s.width + c);
}

// The indices of 16-bit lanes that make pairs (high half, low half) = (x[l], x[l + 1]), (x[l + k - 1],
// below[l]) and (x[l], 1.0) of 32 neighbouring values: see make_pairs.
struct PairIndices {
  __m512i pairs, cross, last;

  explicit PairIndices(int64_t k) {
    alignas(64) uint16_t pairs_index[2 * kLanes], cross_index[2 * kLanes], last_index[2 * kLanes];
    for (int l = 0; l < kLanes; ++l) {
      pairs_index[2 * l] = l + 1;
      pairs_index[2 * l + 1] = l;
      cross_index[2 * l] = 2 * kLanes + l;  // the second source: the row below
      cross_index[2 * l + 1] = static_cast<uint16_t>(l + k - 1);
      last_index[2 * l] = 0;  // replaced by 1.0
      last_index[2 * l + 1] = l;
    }
    pairs = _mm512_load_si512(pairs_index);
    cross = _mm512_load_si512(cross_index);
    last = _mm512_load_si512(last_index);
  }
};
#endif

// A thread's copies of the image it works on; their padding is zero.
struct ForwardScratch {
  std::vector<float> image;
  std::vector<uint32_t> pairs, cross, last;  // (rows - 1) x stride: see convolve_pairs

  ForwardScratch(const Shape& s, bool with_pairs) : image(s.padded_size(), 0.0f) {
    if (with_pairs) {
      pairs.assign(s.padded_size() - s.stride, 0);
      cross.assign(s.padded_size() - s.stride, 0);
      last.assign(s.padded_size() - s.stride, 0);
    }
  }

#if defined(CNNKIT_PAIRS)
  // The pair images of convolve_pairs from the image's bits x, over the columns that the convolution
  // reads (up to width + 5; the stride leaves room for whole vectors).
  void make_pairs(const uint16_t* x, const Shape& s, const PairIndices& indices) {
    const int64_t columns = (s.width + 6 + kLanes - 1) / kLanes * kLanes;
    const __m512i one = _mm512_set1_epi16(static_cast<int16_t>(kOneAndZero >> 16));
    for (int64_t r = 0; r <= s.height; ++r) {
      for (int64_t c = 0; c < columns; c += kLanes) {
        const __m512i here = image_words(x, s, r, c), below = image_words(x, s, r + 1, c);
        const int64_t at = r * s.stride + c;
        _mm512_storeu_si512(pairs.data() + at, _mm512_permutexvar_epi16(indices.pairs, here));
        _mm512_storeu_si512(cross.data() + at, _mm512_permutex2var_epi16(here, indices.cross, below));
        _mm512_storeu_si512(last.data() + at, _mm512_mask_permutexvar_epi16(one, 0xaaaaaaaa, indices.last, here));
      }
    }
  }

  PairImages pair_images() const { return {pairs.data(), cross.data(), last.data()}; }
#endif
};

template <int K, bool kPairs, typename T>
void forward_image(const Shape& s, const ForwardScratch& scratch, const Weights& weights, T* out,
                   uint8_t* winners) {
  const int64_t stride = s.stride;
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t count = std::min(kLanes, s.channels - g * kLanes);
    const Floats bias = weights.biases[g];
    for (int64_t oh = 0; oh < s.out_height; ++oh) {
      const bool has_bottom = 2 * oh + 1 < s.conv_height;
      for (int64_t ow = 0; ow < s.out_width; ow += kPooled) {
        // (Constant indices only, here and below: the sums then stay in registers.)
        Floats acc[kOutputs];
#pragma GCC unroll 16
        for (int o = 0; o < kOutputs; ++o) acc[o] = Floats{};
        const int64_t at = 2 * oh * stride + 2 * ow;
#if defined(CNNKIT_PAIRS)
        if constexpr (kPairs) {
          convolve_pairs<K>(scratch.pair_images(), at, stride, s.k, weights.pairs.data() + g * weights.pairs_per_group,
                            acc);
        } else
#endif
        {
          convolve<K>(scratch.image.data() + at, stride, s.k, weights.taps.data() + g * s.taps(), acc);
        }
#if defined(CNNKIT_PAIRS)
        if constexpr (kPairs) {
          if (count == kLanes && has_bottom && 2 * (ow + kPooled - 1) + 1 < s.conv_width) {  // whole windows
            const int64_t o = (oh * s.out_width + ow) * s.channels + g * kLanes;
#pragma GCC unroll 4
            for (int q = 0; q < kPooled; q += 2) {
              pool_two_pairs(acc + 4 * q, out + o + q * s.channels,
                             winners != nullptr ? winners + o + q * s.channels : nullptr, s.channels);
            }
            continue;
          }
        }
#endif
#pragma GCC unroll 4
        for (int q = 0; q < kPooled; ++q) {
          if (ow + q >= s.out_width) break;
          const int64_t o = (oh * s.out_width + ow + q) * s.channels + g * kLanes;
          const bool has_right = 2 * (ow + q) + 1 < s.conv_width;
          uint8_t* w = winners != nullptr ? winners + o : nullptr;
#if defined(CNNKIT_PAIRS)
          if constexpr (kPairs) {
            pool_pairs(acc + 4 * q, has_right, has_bottom, out + o, w, count);
            continue;
          }
#endif
          pool(acc + 4 * q, bias, has_right, has_bottom, out + o, w, count);
        }
      }
    }
  }
}

template <int K, typename T>
void forward_images(const Shape& s, const Weights& weights, const T* x, T* out, uint8_t* winners) {
#if defined(CNNKIT_PAIRS)
  constexpr bool kWithPairs = std::is_same_v<T, uint16_t>;
#else
  constexpr bool kWithPairs = false;
#endif
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    ForwardScratch scratch(s, kWithPairs);
#if defined(CNNKIT_PAIRS)
    const PairIndices indices(s.k);
#endif
    for (int64_t n = begin; n < end; ++n) {
      const T* image = x + n * s.image_size();
      T* o = out + n * s.out_plane();
      uint8_t* w = winners != nullptr ? winners + n * s.out_plane() : nullptr;
#if defined(CNNKIT_PAIRS)
      if constexpr (kWithPairs) {
        if (s.k <= kLargestPairedK && weights.biases_are_exact &&
            pairs_are_exact(exponents(image, s.image_size()), weights.exponents)) {
          scratch.make_pairs(image, s, indices);
          forward_image<K, true>(s, scratch, weights, o, w);
          continue;
        }
      }
#endif
      load_image(image, s, scratch.image.data());
      forward_image<K, false>(s, scratch, weights, o, w);
    }
  });
}

template <typename T>
void run_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out,
                 const at::Tensor& winners) {
  const Shape s(x, weight);
  const Weights weights = prepare_weights<T>(weight, bias, s);
  uint8_t* w = winners.defined() ? winners.data_ptr<uint8_t>() : nullptr;
  switch (s.k) {
    case 3:
      return forward_images<3>(s, weights, raw<T>(x), raw<T>(out), w);
    case 5:
      return forward_images<5>(s, weights, raw<T>(x), raw<T>(out), w);
    default:
      return forward_images<0>(s, weights, raw<T>(x), raw<T>(out), w);
  }
}

void check_arguments(const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.size(1) == 1 && x.device().is_cpu(), "conv_pool.", name,
              ": expected x of shape (N, 1, H, W) on the CPU");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) > 0 && weight.size(1) == 1 && weight.size(2) > 0 &&
                  weight.size(2) == weight.size(3) && weight.device().is_cpu(),
              "conv_pool.", name, ": expected a weight of shape (C, 1, k, k) on the CPU");
  TORCH_CHECK(x.size(2) >= weight.size(2) && x.size(3) >= weight.size(3), "conv_pool.", name,
              ": the images are smaller than the filters");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "conv_pool.", name,
              ": expected float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "conv_pool.", name, ": x and weight differ in dtype");
}

// Returns (output, winners); winners is None when need_winners is false.
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                bool need_winners) {
  check_arguments("forward", x, weight);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0) && bias.device().is_cpu() &&
                  bias.scalar_type() == x.scalar_type(),
              "conv_pool.forward: expected a bias of shape (C,) and the dtype of x");
  const at::Tensor input = x.contiguous();
  const Shape s(input, weight);
  const auto format = at::MemoryFormat::ChannelsLast;
  const std::vector<int64_t> out_size{s.batch, s.channels, s.out_height, s.out_width};
  at::Tensor out = at::empty(out_size, x.options().memory_format(format));
  at::Tensor winners;
  if (need_winners) winners = at::empty(out_size, x.options().dtype(at::kByte).memory_format(format));
  if (out.numel() > 0) {
    if (x.scalar_type() == at::kFloat) {
      run_forward<float>(input, weight, bias, out, winners);
    } else {
      run_forward<uint16_t>(input, weight, bias, out, winners);
    }
  }
  return {out, winners};
}

// --- backward ---

// The 16 channels' gradients and winners at one pooled output; lanes beyond the last channel get no
// gradient (winner 255).
template <typename T>
inline void load_gradient(const T* gradient, const uint8_t* winners, int64_t count, Floats& g, Ints& winner) {
  if (count == kLanes) {
    g = load(gradient);
    winner = widen(load_bits<Bytes>(winners));
  } else {
    T values[kLanes] = {};
    uint8_t codes[kLanes];
    std::fill_n(codes, kLanes, kCut);
    copy(values, gradient, count);
    copy(codes, winners, count);
    g = load(values);
    winner = widen(load_bits<Bytes>(codes));
  }
}

#if defined(__AVX512F__)
constexpr int64_t kLargestPermutedK = 7;

// tables[(r * out_width + ow) * 16 ...]: image row r, columns 2 ow .. 2 ow + 7, then row r + 1, same
// columns: all the values that taps of filter row i (r = 2 oh + i) may meet at pooled output (oh, ow).
void make_tables(const Shape& s, const float* image, float* tables) {
  const int64_t rows = 2 * (s.out_height - 1) + s.k;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t ow = 0; ow < s.out_width; ++ow) {
      float* table = tables + (r * s.out_width + ow) * kLanes;
      copy(table, image + r * s.stride + 2 * ow, 8);
      copy(table + 8, image + (r + 1) * s.stride + 2 * ow, 8);
    }
  }
}

// sums[tap][lane] += one image's terms for the filter rows first_row .. first_row + kRowCount - 1 of
// 16 channels (and sums[k * k][lane], the bias, if kBias), k = K <= 7: one fused multiply-add each,
// lane c taking x at (2 oh + dy + i, 2 ow + dx + j) from the table of row 2 oh + i by a permutation.
// A few filter rows at a time, so that the sums stay in registers.
template <int K, int kFirstRow, int kRowCount, bool kBias, typename T>
void backward_rows(const Shape& s, const float* tables, const T* gradient, const uint8_t* winners, int64_t count,
                   float* sums) {
  __m512 acc[kRowCount * K];
#pragma GCC unroll 64
  for (int t = 0; t < kRowCount * K; ++t) acc[t] = _mm512_loadu_ps(sums + (kFirstRow * K + t) * kLanes);
  __m512 bias_acc = _mm512_loadu_ps(sums + K * K * kLanes);
  for (int64_t oh = 0; oh < s.out_height; ++oh) {
    for (int64_t ow = 0; ow < s.out_width; ++ow) {
      const int64_t at = (oh * s.out_width + ow) * s.channels;
      Floats g;
      Ints winner;
      load_gradient(gradient + at, winners + at, count, g, winner);
      const __mmask16 keep = _mm512_cmpneq_epi32_mask((__m512i)winner, _mm512_set1_epi32(kCut));
      const Ints first = ((winner & 2) << 2) | (winner & 1);  // dy * 8 + dx
      Ints index[K];
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) index[j] = first + j;
      if (kBias) bias_acc = _mm512_mask_add_ps(bias_acc, keep, bias_acc, (__m512)g);
#pragma GCC unroll 8
      for (int i = 0; i < kRowCount; ++i) {
        const __m512 table = _mm512_loadu_ps(tables + ((2 * oh + kFirstRow + i) * s.out_width + ow) * kLanes);
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) {
          const __m512 x = _mm512_permutexvar_ps((__m512i)index[j], table);
          acc[i * K + j] = _mm512_mask3_fmadd_ps((__m512)g, x, acc[i * K + j], keep);
        }
      }
    }
  }
#pragma GCC unroll 64
  for (int t = 0; t < kRowCount * K; ++t) _mm512_storeu_ps(sums + (kFirstRow * K + t) * kLanes, acc[t]);
  if (kBias) _mm512_storeu_ps(sums + K * K * kLanes, bias_acc);
}

// The filter's rows in passes of at most kRowsAtOnce (at most 3 x 7 sums, the bias's, the gradient, 7
// indices and a table: 31 registers of 32).
template <int K, int kFirstRow, typename T>
void backward_passes(const Shape& s, const float* tables, const T* gradient, const uint8_t* winners, int64_t count,
                     float* sums) {
  constexpr int kRowsAtOnce = K <= 3 ? K : 3;
  constexpr int kRowCount = std::min(kRowsAtOnce, K - kFirstRow);
  backward_rows<K, kFirstRow, kRowCount, kFirstRow == 0>(s, tables, gradient, winners, count, sums);
  if constexpr (kFirstRow + kRowCount < K) {
    backward_passes<K, kFirstRow + kRowCount>(s, tables, gradient, winners, count, sums);
  }
}

template <int K, typename T>
void backward_image_permuted(const Shape& s, const float* tables, const T* gradient, const uint8_t* winners,
                             float* sums) {
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t count = std::min(kLanes, s.channels - g * kLanes);
    float* group_sums = sums + g * (K * K + 1) * kLanes;
    backward_passes<K, 0>(s, tables, gradient + g * kLanes, winners + g * kLanes, count, group_sums);
  }
}
#else
constexpr int64_t kLargestPermutedK = 0;
#endif

#if defined(CNNKIT_PAIRS)
// bfloat16 with VDPBF16PS: the same sums, two pooled outputs of a row (ow, ow + 1) per instruction, the
// first in the high halves, so that they are added in the same order, each rounded: the same bits as
// the fused multiply-adds above (whose bfloat16 products are exact), where `pairs_are_exact` holds for
// the images and gradients of the chunk.
//
// tables[(r * out_pairs + pp) * 32 ...]: the bfloat16 bits of image row r, columns 4 pp .. 4 pp + 15,
// then row r + 1, same columns: all the values that taps of filter row i (r = 2 oh + i) may meet at
// pooled outputs (oh, 2 pp) and (oh, 2 pp + 1).
void make_pair_tables(const Shape& s, const uint16_t* bits, uint16_t* tables) {
  const int64_t rows = 2 * (s.out_height - 1) + s.k, out_pairs = (s.out_width + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t pp = 0; pp < out_pairs; ++pp) {
      uint16_t* table = tables + (r * out_pairs + pp) * 2 * kLanes;
      copy(table, bits + r * s.stride + 4 * pp, kLanes);
      copy(table + kLanes, bits + (r + 1) * s.stride + 4 * pp, kLanes);
    }
  }
}

// What the pair of pooled outputs (oh, 2 pp), (oh, 2 pp + 1) of 16 channels contributes, prepared before
// the sums (which then run without waiting on it): the gradients as bfloat16 pairs (the first output in
// the high half), zero where ReLU cut them off; the index of each output's x in the tables for tap
// (0, 0), dy * 16 + dx (plus 2 for the second output); and the mask of the halves not cut off.
struct PairTerms {
  __m512i gradients, first;
  __mmask32 keep;
};

void prepare_pairs(const Shape& s, const uint16_t* gradient, const uint8_t* winners, int64_t count, PairTerms* terms) {
  const int64_t out_pairs = (s.out_width + 1) / 2;
  const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
  const __m128i cut = _mm_set1_epi8(static_cast<char>(kCut));
  for (int64_t oh = 0; oh < s.out_height; ++oh) {
    for (int64_t pp = 0; pp < out_pairs; ++pp) {
      const int64_t at = (oh * s.out_width + 2 * pp) * s.channels;
      const bool second = 2 * pp + 1 < s.out_width;
      const __m256i g1 = _mm256_maskz_loadu_epi16(lanes, gradient + at);
      const __m256i g2 = second ? _mm256_maskz_loadu_epi16(lanes, gradient + at + s.channels) : _mm256_setzero_si256();
      const __m128i w1 = _mm_mask_loadu_epi8(cut, lanes, winners + at);
      const __m128i w2 = second ? _mm_mask_loadu_epi8(cut, lanes, winners + at + s.channels) : cut;
      const __m512i g = _mm512_or_si512(_mm512_slli_epi32(_mm512_cvtepu16_epi32(g1), 16), _mm512_cvtepu16_epi32(g2));
      const __m512i w = _mm512_or_si512(_mm512_slli_epi32(_mm512_cvtepu8_epi32(w1), 16), _mm512_cvtepu8_epi32(w2));
      PairTerms& t = terms[oh * out_pairs + pp];
      t.keep = _mm512_cmpneq_epi16_mask(w, _mm512_set1_epi16(kCut));
      t.gradients = _mm512_maskz_mov_epi16(t.keep, g);
      const __m512i dy = _mm512_slli_epi32(_mm512_and_si512(w, _mm512_set1_epi32(0x00020002)), 3);
      t.first = _mm512_ternarylogic_epi32(dy, w, _mm512_set1_epi32(0x00010001), 0xf8);  // dy | (w & 1)
    }
  }
}

template <int K, int kFirstRow, int kRowCount, bool kBias>
void backward_rows_pairs(const Shape& s, const uint16_t* tables, const PairTerms* terms, float* sums) {
  const int64_t out_pairs = (s.out_width + 1) / 2;
  __m512 acc[kRowCount * K];
#pragma GCC unroll 64
  for (int t = 0; t < kRowCount * K; ++t) acc[t] = _mm512_loadu_ps(sums + (kFirstRow * K + t) * kLanes);
  __m512 bias_acc = _mm512_loadu_ps(sums + K * K * kLanes);
  const __m512bh ones = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  for (int64_t oh = 0; oh < s.out_height; ++oh) {
    for (int64_t pp = 0; pp < out_pairs; ++pp) {
      const PairTerms& t = terms[oh * out_pairs + pp];
      const __m512bh gradients = (__m512bh)t.gradients;
      if (kBias) bias_acc = _mm512_dpbf16_ps(bias_acc, gradients, ones);
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) {
        // Tap column j: the first output's index in the high half, the second's (2 columns on) in the low.
        const __m512i index = _mm512_add_epi32(t.first, _mm512_set1_epi32(j << 16 | (j + 2)));
#pragma GCC unroll 8
        for (int i = 0; i < kRowCount; ++i) {
          const uint16_t* table = tables + ((2 * oh + kFirstRow + i) * out_pairs + pp) * 2 * kLanes;
          // Zero where cut off, as the gradient: 0 * 0 adds +0.0 to a sum that is never -0.0.
          const __m512i x = _mm512_maskz_permutexvar_epi16(t.keep, index, _mm512_loadu_si512(table));
          acc[i * K + j] = _mm512_dpbf16_ps(acc[i * K + j], gradients, (__m512bh)x);
        }
      }
    }
  }
#pragma GCC unroll 64
  for (int t = 0; t < kRowCount * K; ++t) _mm512_storeu_ps(sums + (kFirstRow * K + t) * kLanes, acc[t]);
  if (kBias) _mm512_storeu_ps(sums + K * K * kLanes, bias_acc);
}

// The filter's rows in passes of at most kRowsAtOnce (at most 5 x 5 sums in registers).
template <int K, int kFirstRow>
void backward_passes_pairs(const Shape& s, const uint16_t* tables, const PairTerms* terms, float* sums) {
  constexpr int kRowsAtOnce = K <= 5 ? K : 3;
  constexpr int kRowCount = std::min(kRowsAtOnce, K - kFirstRow);
  backward_rows_pairs<K, kFirstRow, kRowCount, kFirstRow == 0>(s, tables, terms, sums);
  if constexpr (kFirstRow + kRowCount < K) backward_passes_pairs<K, kFirstRow + kRowCount>(s, tables, terms, sums);
}

template <int K>
void backward_image_pairs(const Shape& s, const uint16_t* tables, const uint16_t* gradient, const uint8_t* winners,
                          PairTerms* terms, float* sums) {
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t count = std::min(kLanes, s.channels - g * kLanes);
    prepare_pairs(s, gradient + g * kLanes, winners + g * kLanes, count, terms);
    backward_passes_pairs<K, 0>(s, tables, terms, sums + g * (K * K + 1) * kLanes);
  }
}
#endif

// The same sums lane by lane, a multiply and an add each: any k, any CPU.
template <typename T>
void backward_image_lanes(const Shape& s, const float* image, const T* gradient, const uint8_t* winners,
                          float* sums) {
  const int64_t k = s.k;
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t count = std::min(kLanes, s.channels - g * kLanes);
    float* group_sums = sums + g * (k * k + 1) * kLanes;
    for (int64_t oh = 0; oh < s.out_height; ++oh) {
      for (int64_t ow = 0; ow < s.out_width; ++ow) {
        const int64_t at = (oh * s.out_width + ow) * s.channels + g * kLanes;
        for (int64_t lane = 0; lane < count; ++lane) {
          const uint8_t winner = winners[at + lane];
          if (winner == kCut) continue;
          const float value = to_float(gradient[at + lane]);
          const float* x = image + (2 * oh + (winner >> 1)) * s.stride + 2 * ow + (winner & 1);
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j < k; ++j) {
              float& sum = group_sums[(i * k + j) * kLanes + lane];
              sum = sum + value * x[i * s.stride + j];
            }
          }
          float& bias_sum = group_sums[k * k * kLanes + lane];
          bias_sum = bias_sum + value;
        }
      }
    }
  }
}

// One image's terms: sums[group][tap, then the bias][lane] += ...
template <typename T>
void backward_image(const Shape& s, const float* image, [[maybe_unused]] float* tables, const T* gradient,
                    const uint8_t* winners, float* sums) {
#if defined(__AVX512F__)
  if (s.k == 3 || s.k == 5 || s.k == 7) make_tables(s, image, tables);
  switch (s.k) {
    case 3:
      return backward_image_permuted<3>(s, tables, gradient, winners, sums);
    case 5:
      return backward_image_permuted<5>(s, tables, gradient, winners, sums);
    case 7:
      return backward_image_permuted<7>(s, tables, gradient, winners, sums);
  }
#endif
  backward_image_lanes(s, image, gradient, winners, sums);
}

#if defined(CNNKIT_PAIRS)
// Whether VDPBF16PS may compute the sums of images first .. last - 1 (see pairs_are_exact: the products of
// the gradients with the images, and with 1.0 for the bias).
bool chunk_pairs_are_exact(const Shape& s, const uint16_t* x, const uint16_t* gradient, int64_t first, int64_t last) {
  Exponents images, gradients;
  images.smallest = images.largest = 127;  // 1.0
  images.any = true;
  const auto widen_range = [](Exponents& range, const Exponents& more) {
    range.smallest = std::min(range.smallest, more.smallest);
    range.largest = std::max(range.largest, more.largest);
    range.any = range.any || more.any;
  };
  for (int64_t n = first; n < last; ++n) {
    widen_range(images, exponents(x + n * s.image_size(), s.image_size()));
    widen_range(gradients, exponents(gradient + n * s.out_plane(), s.out_plane()));
  }
  return pairs_are_exact(images, gradients);
}
#endif

template <typename T>
void run_backward(const Shape& s, const at::Tensor& gradient, const at::Tensor& winners, const at::Tensor& x,
                  const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  const int64_t chunks = (s.batch + kChunkImages - 1) / kChunkImages;
  const int64_t chunk_size = s.groups * (s.taps() + 1) * kLanes;
  std::vector<float> partial(std::max<int64_t>(chunks, 1) * chunk_size, 0.0f);  // zeros if no images
  const T* g = raw<T>(gradient);
  const uint8_t* win = winners.data_ptr<uint8_t>();
  const T* input = raw<T>(x);
  const int64_t table_rows = 2 * (s.out_height - 1) + s.k;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> image(s.padded_size(), 0.0f);
    std::vector<float> tables(s.k <= kLargestPermutedK ? table_rows * s.out_width * kLanes : 0);
#if defined(CNNKIT_PAIRS)
    constexpr bool kWithPairs = std::is_same_v<T, uint16_t>;
    const bool with_pairs = kWithPairs && (s.k == 3 || s.k == 5 || s.k == 7);
    std::vector<uint16_t> bits(with_pairs ? s.padded_size() : 0, 0);
    std::vector<uint16_t> pair_tables(with_pairs ? table_rows * ((s.out_width + 1) / 2) * 2 * kLanes : 0);
    std::vector<PairTerms> terms(with_pairs ? s.out_height * ((s.out_width + 1) / 2) : 0);
#endif
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* sums = partial.data() + chunk * chunk_size;
      const int64_t first = chunk * kChunkImages, last = std::min(s.batch, first + kChunkImages);
#if defined(CNNKIT_PAIRS)
      if constexpr (kWithPairs) {
        if (with_pairs && chunk_pairs_are_exact(s, input, g, first, last)) {
          for (int64_t n = first; n < last; ++n) {
            load_image(input + n * s.image_size(), s, bits.data());
            make_pair_tables(s, bits.data(), pair_tables.data());
            const int64_t at = n * s.out_plane();
            switch (s.k) {
              case 3:
                backward_image_pairs<3>(s, pair_tables.data(), g + at, win + at, terms.data(), sums);
                break;
              case 5:
                backward_image_pairs<5>(s, pair_tables.data(), g + at, win + at, terms.data(), sums);
                break;
              default:
                backward_image_pairs<7>(s, pair_tables.data(), g + at, win + at, terms.data(), sums);
            }
          }
          continue;
        }
      }
#endif
      for (int64_t n = first; n < last; ++n) {
        load_image(input + n * s.image_size(), s, image.data());
        backward_image(s, image.data(), tables.data(), g + n * s.out_plane(), win + n * s.out_plane(), sums);
      }
    }
  });
  for (int64_t chunk = 1; chunk < chunks; ++chunk) {  // in chunk order
    const float* sums = partial.data() + chunk * chunk_size;
    for (int64_t i = 0; i < chunk_size; ++i) partial[i] = partial[i] + sums[i];
  }
  T* gw = raw<T>(grad_weight);
  T* gb = raw<T>(grad_bias);
  const int64_t s0 = grad_weight.stride(0), s2 = grad_weight.stride(2), s3 = grad_weight.stride(3);
  for (int64_t c = 0; c < s.channels; ++c) {
    const float* sums = partial.data() + (c / kLanes) * (s.taps() + 1) * kLanes + c % kLanes;
    for (int64_t i = 0; i < s.k; ++i) {
      for (int64_t j = 0; j < s.k; ++j) gw[c * s0 + i * s2 + j * s3] = from_float<T>(sums[(i * s.k + j) * kLanes]);
    }
    gb[c] = from_float<T>(sums[s.taps() * kLanes]);
  }
}

// Returns (grad_weight, grad_bias): grad_weight with the weight's strides, grad_bias contiguous.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& winners, const at::Tensor& x,
                                 const at::Tensor& weight) {
  check_arguments("backward", x, weight);
  const auto format = at::MemoryFormat::ChannelsLast;
  const at::Tensor input = x.contiguous();
  const Shape s(input, weight);
  const std::vector<int64_t> out_size{s.batch, s.channels, s.out_height, s.out_width};
  TORCH_CHECK(winners.scalar_type() == at::kByte && winners.sizes() == out_size && winners.is_contiguous(format),
              "conv_pool.backward: winners must come from forward");
  TORCH_CHECK(grad_out.sizes() == out_size && grad_out.scalar_type() == x.scalar_type(),
              "conv_pool.backward: the gradient differs from the output in shape or dtype");
  const at::Tensor gradient = grad_out.contiguous(format);
  at::Tensor grad_weight = at::empty_like(weight);
  at::Tensor grad_bias = at::empty({s.channels}, weight.options());
  if (x.scalar_type() == at::kBFloat16) {
    run_backward<uint16_t>(s, gradient, winners, input, grad_weight, grad_bias);
  } else {
    run_backward<float>(s, gradient, winners, input, grad_weight, grad_bias);
  }
  return {grad_weight, grad_bias};
}

}  // namespace

namespace cnnkit::conv_pool {
// Whether the kernels use AVX-512: compiled for other CPUs (AVX2, NEON), the portable code is correct
// but slower than PyTorch's own ops, and cnnkit/conv_pool.py does not use it.
#if defined(__AVX512F__)
const bool kVectorised = true;
#else
const bool kVectorised = false;
#endif
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                bool need_winners) {
  return ::forward(x, weight, bias, need_winners);
}
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& winners, const at::Tensor& x,
                                 const at::Tensor& weight) {
  return ::backward(grad_out, winners, x, weight);
}
}  // namespace cnnkit::conv_pool
