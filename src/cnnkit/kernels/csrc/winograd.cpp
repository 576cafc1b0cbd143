// The transforms of a Winograd convolution F(4x4, 5x5) for float32 tensors on the CPU: the tiles of the
// images into the Winograd domain and the products back out, forward and backward. The matrices are
// those cnnkit/kernels/winograd.py derives (B^T 8x8, A^T 4x8), compiled in; the products in the Winograd
// domain are batched matrix products done by torch (bmm), so this file only moves and combines numbers.
// Each multiplication and addition is rounded on its own (the library is compiled with
// -ffp-contract=off): every instruction-set level gives the same bits.
//
// Layouts: images are channels_last (N, H, W, C in memory); the Winograd domain is (64, T, C), position
// (a, b) of the 8x8 tile first, then the tile t = (n * th + i) * tw + j of the 4x4 output block (i, j),
// then the channels. Input tile t covers rows 4i .. 4i + 7 and columns 4j .. 4j + 7, zero beyond the
// image. Each transform is two passes of a matrix over a tile's rows then its columns, the sums taken in
// a fixed order, skipping the matrix's zeros: the results depend neither on the threads nor on the CPU.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

#include "vectors.h"

constexpr int kTile = 8, kOut = 4, kStride = 4;

// The matrices of cnnkit/kernels/winograd.py's `matrices()` (a test compares them with these).
constexpr float kBT[kTile][kTile] = {{-1.0f, 0.0f, 5.25f, 0.0f, -5.25f, 0.0f, 1.0f, 0.0f}, {0.0f, 1.0f, 1.0f, -4.25f, -4.25f, 1.0f, 1.0f, 0.0f}, {0.0f, -1.0f, 1.0f, 4.25f, -4.25f, -1.0f, 1.0f, 0.0f}, {0.0f, 0.5f, 0.25f, -2.5f, -1.25f, 2.0f, 1.0f, 0.0f}, {0.0f, -0.5f, 0.25f, 2.5f, -1.25f, -2.0f, 1.0f, 0.0f}, {0.0f, 2.0f, 4.0f, -2.5f, -5.0f, 0.5f, 1.0f, 0.0f}, {0.0f, -2.0f, 4.0f, 2.5f, -5.0f, -0.5f, 1.0f, 0.0f}, {0.0f, -1.0f, 0.0f, 5.25f, 0.0f, -5.25f, 0.0f, 1.0f}};
constexpr float kAT[kOut][kTile] = {{1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 0.0f}, {0.0f, 1.0f, -1.0f, 2.0f, -2.0f, 0.5f, -0.5f, 0.0f}, {0.0f, 1.0f, 1.0f, 4.0f, 4.0f, 0.25f, 0.25f, 0.0f}, {0.0f, 1.0f, -1.0f, 8.0f, -8.0f, 0.125f, -0.125f, 1.0f}};

// out[r] = sum over i of M[r][i] * in[i], for `Rows` outputs from `Cols` inputs of kLanes floats each, with
// the matrix's zeros skipped at compile time (the loops are unrolled over constants). `Transposed` reads
// M[i][r] instead. Inputs are `in_stride` floats apart, outputs `out_stride`.
template <int Rows, int Cols, bool Transposed, int MRows, int MCols>
inline void combine(const float (&m)[MRows][MCols], const float* in, int64_t in_stride, float* out,
                    int64_t out_stride) {
  Floats x[Cols];
#pragma GCC unroll 8
  for (int i = 0; i < Cols; ++i) x[i] = load_bits<Floats>(in + i * in_stride);
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r) {
    Floats acc = splat<Floats>(0.0f);
#pragma GCC unroll 8
    for (int i = 0; i < Cols; ++i) {
      const float v = Transposed ? m[i][r] : m[r][i];
      if (v != 0.0f) acc = acc + splat<Floats>(v) * x[i];
    }
    store_bits(out + r * out_stride, acc);
  }
}

void check_images(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32 CPU images");
  TORCH_CHECK(x.size(1) % kLanes == 0, "channels in multiples of 16");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "channels_last images");
}

// V (64, T, C): B^T d B for every tile d of the images x (N, C, H, W; channels_last).
at::Tensor input_transform(const at::Tensor& x, int64_t th, int64_t tw) {
  check_images(x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), T = N * th * tw;
  at::Tensor v = at::empty({kTile * kTile, T, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(kTile * kTile * C), tmp(kTile * kTile * C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
      for (int r = 0; r < kTile; ++r)
        for (int s = 0; s < kTile; ++s) {
          const int64_t row = i * kStride + r, col = j * kStride + s;
          float* dst = &d[(r * kTile + s) * C];
          if (row < H && col < W) {
            const float* src = xp + ((n * H + row) * W + col) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
          } else {
            for (int64_t c = 0; c < C; ++c) dst[c] = 0.0f;
          }
        }
      for (int s = 0; s < kTile; ++s)  // tmp[a][s] = sum_r B^T[a][r] d[r][s]
        for (int64_t c = 0; c < C; c += kLanes)
          combine<kTile, kTile, false>(kBT, &d[s * C + c], kTile * C, &tmp[s * C + c], kTile * C);
      for (int a = 0; a < kTile; ++a)  // V[a][b] = sum_s B^T[b][s] tmp[a][s]
        for (int64_t c = 0; c < C; c += kLanes)
          combine<kTile, kTile, false>(kBT, &tmp[a * kTile * C + c], C, vp + (a * kTile * T + t) * C + c, T * C);
    }
  });
  return v;
}

// y (N, O, oh, ow; channels_last): A^T m A + bias for every tile's products m of M (64, T, O).
at::Tensor output_transform(const at::Tensor& m, const at::Tensor& bias, int64_t N,
                            int64_t th, int64_t tw, int64_t oh, int64_t ow) {
  TORCH_CHECK(m.dim() == 3 && m.size(0) == kTile * kTile && m.is_contiguous() && m.scalar_type() == at::kFloat,
              "products (64, T, O)");
  TORCH_CHECK(m.size(2) % kLanes == 0, "filters in multiples of 16");
  const int64_t T = m.size(1), O = m.size(2);
  TORCH_CHECK(T == N * th * tw && bias.numel() == O && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "tiles and bias");
  at::Tensor y = at::empty({N, O, oh, ow}, m.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* mp = m.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kTile * kTile * O), tmp(kOut * kTile * O), out(kOut * kOut * O);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
      for (int ab = 0; ab < kTile * kTile; ++ab) {
        const float* src = mp + (ab * T + t) * O;
        float* dst = &tile[ab * O];
        for (int64_t o = 0; o < O; ++o) dst[o] = src[o];
      }
      for (int b = 0; b < kTile; ++b)  // tmp[p][b] = sum_a A^T[p][a] m[a][b]
        for (int64_t o = 0; o < O; o += kLanes)
          combine<kOut, kTile, false>(kAT, &tile[b * O + o], kTile * O, &tmp[b * O + o], kTile * O);
      for (int p = 0; p < kOut; ++p)  // out[p][q] = sum_b A^T[q][b] tmp[p][b]
        for (int64_t o = 0; o < O; o += kLanes)
          combine<kOut, kTile, false>(kAT, &tmp[p * kTile * O + o], O, &out[p * kOut * O + o], O);
      for (int p = 0; p < kOut; ++p)
        for (int q = 0; q < kOut; ++q) {
          const int64_t row = i * kOut + p, col = j * kOut + q;
          if (row >= oh || col >= ow) continue;
          float* dst = yp + ((n * oh + row) * ow + col) * O;
          const float* src = &out[(p * kOut + q) * O];
          for (int64_t o = 0; o < O; ++o) dst[o] = src[o] + bp[o];
        }
    }
  });
  return y;
}

// dM (64, T, O): the gradient of the products from the gradient gy of the output (channels_last).
at::Tensor output_transform_backward(const at::Tensor& gy, int64_t th, int64_t tw) {
  check_images(gy);
  const int64_t N = gy.size(0), O = gy.size(1), oh = gy.size(2), ow = gy.size(3), T = N * th * tw;
  at::Tensor dm = at::empty({kTile * kTile, T, O}, gy.options().memory_format(at::MemoryFormat::Contiguous));
  const float* gp = gy.data_ptr<float>();
  float* dp = dm.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g(kOut * kOut * O), tmp(kTile * kOut * O);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (th * tw), i = t / tw % th, j = t % tw;
      for (int p = 0; p < kOut; ++p)
        for (int q = 0; q < kOut; ++q) {
          const int64_t row = i * kOut + p, col = j * kOut + q;
          float* dst = &g[(p * kOut + q) * O];
          if (row < oh && col < ow) {
            const float* src = gp + ((n * oh + row) * ow + col) * O;
            for (int64_t o = 0; o < O; ++o) dst[o] = src[o];
          } else {
            for (int64_t o = 0; o < O; ++o) dst[o] = 0.0f;
          }
        }
      for (int q = 0; q < kOut; ++q)  // tmp[a][q] = sum_p A^T[p][a] g[p][q]
        for (int64_t o = 0; o < O; o += kLanes)
          combine<kTile, kOut, true>(kAT, &g[q * O + o], kOut * O, &tmp[q * O + o], kOut * O);
      for (int a = 0; a < kTile; ++a)  // dM[a][b] = sum_q A^T[q][b] tmp[a][q]
        for (int64_t o = 0; o < O; o += kLanes)
          combine<kTile, kOut, true>(kAT, &tmp[a * kOut * O + o], O, dp + (a * kTile * T + t) * O + o, T * O);
    }
  });
  return dm;
}

// dx (N, C, H, W; channels_last): B dV B^T for every tile, added where the tiles overlap. Each image is one
// task, its tiles added in order, so the sums do not depend on the threads.
at::Tensor input_transform_backward(const at::Tensor& dv, int64_t N, int64_t H, int64_t W,
                                    int64_t th, int64_t tw) {
  TORCH_CHECK(dv.dim() == 3 && dv.size(0) == kTile * kTile && dv.is_contiguous() && dv.scalar_type() == at::kFloat,
              "gradients (64, T, C)");
  TORCH_CHECK(dv.size(2) % kLanes == 0, "channels in multiples of 16");
  const int64_t T = dv.size(1), C = dv.size(2);
  TORCH_CHECK(T == N * th * tw, "tiles");
  at::Tensor dx = at::empty({N, C, H, W}, dv.options().memory_format(at::MemoryFormat::ChannelsLast)).zero_();
  const float* vp = dv.data_ptr<float>();
  float* xp = dx.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kTile * kTile * C), tmp(kTile * kTile * C), out(kTile * kTile * C);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t i = 0; i < th; ++i)
        for (int64_t j = 0; j < tw; ++j) {
          const int64_t t = (n * th + i) * tw + j;
          for (int ab = 0; ab < kTile * kTile; ++ab) {
            const float* src = vp + (ab * T + t) * C;
            float* dst = &tile[ab * C];
            for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
          }
          for (int b = 0; b < kTile; ++b)  // tmp[r][b] = sum_a B^T[a][r] v[a][b]
            for (int64_t c = 0; c < C; c += kLanes)
              combine<kTile, kTile, true>(kBT, &tile[b * C + c], kTile * C, &tmp[b * C + c], kTile * C);
          for (int r = 0; r < kTile; ++r)  // out[r][s] = sum_b B^T[b][s] tmp[r][b]
            for (int64_t c = 0; c < C; c += kLanes)
              combine<kTile, kTile, true>(kBT, &tmp[r * kTile * C + c], C, &out[r * kTile * C + c], C);
          for (int r = 0; r < kTile; ++r)
            for (int s = 0; s < kTile; ++s) {
              const int64_t row = i * kStride + r, col = j * kStride + s;
              if (row >= H || col >= W) continue;
              float* dst = xp + ((n * H + row) * W + col) * C;
              const float* src = &out[(r * kTile + s) * C];
              for (int64_t c = 0; c < C; ++c) dst[c] = dst[c] + src[c];
            }
        }
  });
  return dx;
}

}  // namespace

namespace cnnkit::winograd {
at::Tensor input_transform(const at::Tensor& x, int64_t th, int64_t tw) { return ::input_transform(x, th, tw); }
at::Tensor output_transform(const at::Tensor& m, const at::Tensor& bias, int64_t N, int64_t th, int64_t tw,
                            int64_t oh, int64_t ow) {
  return ::output_transform(m, bias, N, th, tw, oh, ow);
}
at::Tensor output_transform_backward(const at::Tensor& gy, int64_t th, int64_t tw) {
  return ::output_transform_backward(gy, th, tw);
}
at::Tensor input_transform_backward(const at::Tensor& dv, int64_t N, int64_t H, int64_t W, int64_t th, int64_t tw) {
  return ::input_transform_backward(dv, N, H, W, th, tw);
}
// (B^T, A^T) as this file has them, for the test that compares them with winograd.py's.
std::vector<std::vector<std::vector<float>>> constants() {
  std::vector<std::vector<float>> bt(kTile, std::vector<float>(kTile)), at(kOut, std::vector<float>(kTile));
  for (int i = 0; i < kTile; ++i)
    for (int j = 0; j < kTile; ++j) {
      bt[i][j] = kBT[i][j];
      if (i < kOut) at[i][j] = kAT[i][j];
    }
  return {bt, at};
}
}  // namespace cnnkit::winograd
