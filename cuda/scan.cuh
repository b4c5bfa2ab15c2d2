// Prefix scans over a warp and over a block (blockDim.x a multiple of 32, at most 1024).
#pragma once
#include <stdint.h>

// Inclusive scan of v over the lanes of a warp, in lane order, under the associative op (all 32
// lanes call it).
template <typename T, typename Op>
__device__ __forceinline__ T warp_inclusive_scan(T v, uint32_t lane, Op op) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T o = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= (uint32_t)off) v = op(v, o);
  }
  return v;
}

// Inclusive sum of v over the lanes of a warp.
__device__ __forceinline__ int warp_inclusive_scan(int v, uint32_t lane) {
  return warp_inclusive_scan(v, lane, [](int a, int b) { return a + b; });
}

// Exclusive sum of one value per thread over the block, in thread order; *total (when not null)
// receives the sum. Every thread of the block must call it (it synchronises the block, also on
// exit, so it can be called in a loop).
__device__ __forceinline__ int block_exclusive_scan(int v, int* total) {
  __shared__ int sums[33];
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int incl = warp_inclusive_scan(v, lane);
  if (lane == 31) sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int s = lane < warps ? sums[lane] : 0;
    const int si = warp_inclusive_scan(s, lane);
    if (lane < warps) sums[lane] = si - s;
    if (lane == 31) sums[32] = si;
  }
  __syncthreads();
  const int out = sums[warp] + incl - v;
  if (total != nullptr) *total = sums[32];
  __syncthreads();
  return out;
}
