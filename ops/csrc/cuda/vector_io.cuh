// Loads and stores of N consecutive elements per thread: 16-byte accesses when the caller
// has checked the alignment (coalesced across a warp, since neighbouring threads take
// neighbouring chunks), element by element otherwise (unaligned views, a tensor's tail).
#pragma once
#include <cstdint>

#include "device_math.cuh"

namespace offload_engine {
namespace cuda {

// An element's storage bits, and back (fp32: 32 bits; bf16/fp16: 16).
__device__ __forceinline__ uint32_t storage_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint32_t storage_bits(bf16_t x) { return x.bits; }
__device__ __forceinline__ uint32_t storage_bits(f16_t x) { return x.bits; }
template <class T> __device__ __forceinline__ T from_storage_bits(uint32_t b);
template <> __device__ __forceinline__ float from_storage_bits<float>(uint32_t b) { return __uint_as_float(b); }
template <> __device__ __forceinline__ bf16_t from_storage_bits<bf16_t>(uint32_t b) { return bf16_t{uint16_t(b)}; }
template <> __device__ __forceinline__ f16_t from_storage_bits<f16_t>(uint32_t b) { return f16_t{uint16_t(b)}; }

// Element j of N elements of T held in 16-byte words (little-endian), by shifts rather than
// a union, so the words stay in registers.
__device__ __forceinline__ uint32_t word_lane(const uint4& w, int k) {
  return k == 0 ? w.x : (k == 1 ? w.y : (k == 2 ? w.z : w.w));
}
template <class T, int N>
__device__ __forceinline__ T element_of(const uint4 (&words)[N * sizeof(T) / 16], int j) {
  constexpr int kPerWord = 16 / sizeof(T), kPerLane = 4 / sizeof(T);
  const uint32_t lane = word_lane(words[j / kPerWord], (j % kPerWord) / kPerLane);
  return from_storage_bits<T>(sizeof(T) == 4 ? lane : (lane >> (16 * (j % kPerLane))) & 0xFFFFU);
}

// out[j] = element j as fp32 for j < count (0 beyond). `vector_ok`: p is 16-byte aligned.
// kReadOnly: the data is not written by this kernel (grads), so the read-only path may cache it.
template <bool kReadOnly, int N, class T>
__device__ __forceinline__ void load_as_float(const T* p, bool vector_ok, int count, float (&out)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte words");
  constexpr int kWords = int(N * sizeof(T) / 16);
  if (vector_ok && count == N) {
    uint4 words[kWords];
    const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = kReadOnly ? __ldg(src + w) : src[w];
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(element_of<T, N>(words, j));
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < count ? to_float(p[j]) : 0.0f;
  }
}

// p[j] = vals[j] for j < count.
template <int N, class T>
__device__ __forceinline__ void store_elems(T* p, bool vector_ok, int count, const T (&vals)[N]) {
  static_assert(N * sizeof(T) % 16 == 0, "whole 16-byte words");
  constexpr int kWords = int(N * sizeof(T) / 16), kPerLane = int(4 / sizeof(T));
  if (vector_ok && count == N) {
    uint32_t lanes[kWords * 4];
#pragma unroll
    for (int l = 0; l < kWords * 4; ++l) {
      lanes[l] = 0;
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) lanes[l] |= storage_bits(vals[l * kPerLane + k]) << (16 * k);
    }
    uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      dst[w] = make_uint4(lanes[4 * w], lanes[4 * w + 1], lanes[4 * w + 2], lanes[4 * w + 3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (j < count) p[j] = vals[j];
    }
  }
}

// ---- codes: 8 per thread, one byte each (8-bit) or two per byte, element 2k low (4-bit) ----
// Codes are padded to whole quantization blocks, so a thread's 8 codes always exist.
template <int kBits>
struct CodeWord;

template <>
struct CodeWord<8> {
  static constexpr int kAlign = 8;  // bytes a vector access needs
  __device__ static uint2 load(const uint8_t* codes, int64_t first, bool vector_ok) {
    const uint8_t* p = codes + first;
    if (vector_ok) return *reinterpret_cast<const uint2*>(p);
    uint2 w{0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w.x |= uint32_t(p[j]) << (8 * j);
      w.y |= uint32_t(p[4 + j]) << (8 * j);
    }
    return w;
  }
  __device__ static uint32_t get(uint2 w, int j) { return ((j < 4 ? w.x : w.y) >> (8 * (j & 3))) & 0xFF; }
  __device__ static void store(uint8_t* codes, int64_t first, bool vector_ok, const uint32_t (&c)[8]) {
    uint2 w{0, 0};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w.x |= c[j] << (8 * j);
      w.y |= c[4 + j] << (8 * j);
    }
    uint8_t* p = codes + first;
    if (vector_ok) {
      *reinterpret_cast<uint2*>(p) = w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) p[j] = uint8_t(c[j]);
    }
  }
};

template <>
struct CodeWord<4> {
  static constexpr int kAlign = 4;
  __device__ static uint32_t load(const uint8_t* codes, int64_t first, bool vector_ok) {
    const uint8_t* p = codes + first / 2;
    if (vector_ok) return *reinterpret_cast<const uint32_t*>(p);
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
  }
  __device__ static uint32_t get(uint32_t w, int j) { return (w >> (4 * j)) & 0xF; }
  __device__ static void store(uint8_t* codes, int64_t first, bool vector_ok, const uint32_t (&c)[8]) {
    uint32_t w = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) w |= c[j] << (4 * j);
    uint8_t* p = codes + first / 2;
    if (vector_ok) {
      *reinterpret_cast<uint32_t*>(p) = w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) p[j] = uint8_t(w >> (8 * j));
    }
  }
};

}  // namespace cuda
}  // namespace offload_engine
