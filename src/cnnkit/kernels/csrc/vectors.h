// Vectors of 16 lanes as GCC/Clang vector types, which the compiler maps to the CPU's registers (one
// AVX-512 register of floats, two AVX2 ones, four NEON ones), and the moves and conversions the kernels
// share. Each source includes this inside its own anonymous namespace, after ATen's headers, <cstring>
// and <type_traits>.
#pragma once

constexpr int64_t kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));  // masks over Floats, and winners
typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));  // float bits, bfloat16 pairs
typedef uint16_t Halves __attribute__((vector_size(2 * kLanes)));  // bfloat16 bits
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));  // winners

template <typename Vector, typename Scalar>
inline Vector splat(Scalar value) {
  using Element = std::remove_cv_t<std::remove_reference_t<decltype(Vector{}[0])>>;
  return Vector{} + static_cast<Element>(value);
}
template <typename Vector, typename T>
inline Vector load_bits(const T* source) {
  Vector vector;
  std::memcpy(&vector, source, sizeof vector);
  return vector;
}
template <typename T, typename Vector>
inline void store_bits(T* destination, Vector vector) {
  std::memcpy(destination, &vector, sizeof vector);
}
template <typename T>
inline void copy(T* destination, const T* source, int64_t count) {
  std::memcpy(destination, source, count * sizeof(T));
}

// A float32 tensor's data as floats, a bfloat16 one's as the bits of its values (uint16_t).
template <typename T>
T* raw(const at::Tensor& tensor) {
  if constexpr (std::is_same_v<T, float>) {
    return tensor.data_ptr<float>();
  } else {
    return reinterpret_cast<uint16_t*>(tensor.data_ptr<at::BFloat16>());
  }
}

// A float32 value, or the float32 value of bfloat16 bits (exact: a shift).
inline float to_float(float value) { return value; }
inline float to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}
