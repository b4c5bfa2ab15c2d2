// Chunks of V consecutive elements of T moved as one load / store of V·sizeof(T) bytes (V = 1:
// one element), shared by the element-wise kernels of fused.cu and the key scorer of sparsek.cu.
#pragma once
#include <stdint.h>

template <int BYTES> struct RawUnit;
template <> struct RawUnit<16> { typedef uint4 type; };
template <> struct RawUnit<8> { typedef uint2 type; };
template <> struct RawUnit<4> { typedef unsigned int type; };
template <> struct RawUnit<2> { typedef unsigned short type; };

template <typename T, int V>
struct Chunk {
  typedef typename RawUnit<V * sizeof(T)>::type U;
  union {
    U raw;
    T e[V];
  };
};

// p must be aligned to V·sizeof(T) bytes.
template <typename T, int V>
__device__ __forceinline__ Chunk<T, V> ld_chunk(const T* p) {
  Chunk<T, V> c;
  c.raw = *reinterpret_cast<const typename Chunk<T, V>::U*>(p);
  return c;
}
template <typename T, int V>
__device__ __forceinline__ void st_chunk(T* p, const Chunk<T, V>& c) {
  *reinterpret_cast<typename Chunk<T, V>::U*>(p) = c.raw;
}

// Whether p is aligned to `bytes` (a power of two); a null p is.
__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return ((uintptr_t)p & (uintptr_t)(bytes - 1)) == 0;
}
