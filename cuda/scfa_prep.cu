// Pre- and post-processing kernels of sparse causal flash attention (src/scfa): row gather and
// scatter, keep-mask compaction, stable counting sort by bucket, angular LSH, index conversion.
// Loaded under the module name "scfa_prep". Every index read from memory is bounds-checked:
// out-of-range row indices mean "padding" (gather writes zeros, scatter skips the row), and
// out-of-range bucket ids are sorted to the end as padding rows.

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------------------
// Row gather / scatter. Tensors are (rows_outer = batch·heads, len, units) where a "unit" is the
// widest copy type (2, 4, 8 or 16 bytes) dividing the row size and the source offset.
//   gather:  out[bh, r, :] = x[bh, idx[bh, r], :], or 0 when idx[bh, r] is outside [0, n_in)
//            idx: (bh, n_out);  out: (bh, n_out, units)
//   scatter: out[bh, idx[bh, r], :] = x[bh, r, :] for idx[bh, r] inside [0, n_out)
//            idx: (bh, n_in);   out: (bh, n_out, units), zero-filled by the caller
// ---------------------------------------------------------------------------------------------

template <typename U>
__device__ __forceinline__ void gather_rows(const U *__restrict__ x, const int *__restrict__ idx,
                                            U *__restrict__ out, uint64_t out_rows, uint32_t n_out,
                                            uint32_t n_in, uint32_t units) {
  const uint64_t total = out_rows * units;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const uint64_t row = i / units;
    const uint64_t u = i - row * units;
    const uint64_t bh = row / n_out;
    const int src = idx[row];
    U val = {};
    if (src >= 0 && (uint32_t)src < n_in) {
      val = x[(bh * n_in + (uint32_t)src) * units + u];
    }
    out[i] = val;
  }
}

template <typename U>
__device__ __forceinline__ void scatter_rows(const U *__restrict__ x, const int *__restrict__ idx,
                                             U *__restrict__ out, uint64_t in_rows, uint32_t n_out,
                                             uint32_t n_in, uint32_t units) {
  const uint64_t total = in_rows * units;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    const uint64_t row = i / units;
    const uint64_t u = i - row * units;
    const uint64_t bh = row / n_in;
    const int dst = idx[row];
    if (dst >= 0 && (uint32_t)dst < n_out) {
      out[(bh * n_out + (uint32_t)dst) * units + u] = x[i];
    }
  }
}

#define ROW_MOVE(U, SUFFIX)                                                                        \
  extern "C" __global__ void gather_rows_##SUFFIX(const U *x, const int *idx, U *out,             \
                                                  uint64_t out_rows, uint32_t n_out,              \
                                                  uint32_t n_in, uint32_t units) {                \
    gather_rows<U>(x, idx, out, out_rows, n_out, n_in, units);                                    \
  }                                                                                               \
  extern "C" __global__ void scatter_rows_##SUFFIX(const U *x, const int *idx, U *out,            \
                                                   uint64_t in_rows, uint32_t n_out,              \
                                                   uint32_t n_in, uint32_t units) {               \
    scatter_rows<U>(x, idx, out, in_rows, n_out, n_in, units);                                    \
  }

ROW_MOVE(uint16_t, u16)
ROW_MOVE(uint32_t, u32)
ROW_MOVE(uint2, u64)
ROW_MOVE(uint4, u128)

// ---------------------------------------------------------------------------------------------
// Keep-mask compaction, one warp per (batch, head) row of length t:
//   pos[r] = time index of the r-th kept row (time order), pad_pos for r >= kept count.
// Stable by construction: a ballot over 32 consecutive time steps, in time order.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void compact_kept(const uint8_t *__restrict__ keep, int *__restrict__ pos,
                                        uint32_t n_rows, uint32_t t, int pad_pos) {
  const uint32_t row = blockIdx.x;
  const uint32_t lane = threadIdx.x;
  if (row >= n_rows || blockDim.x != 32) {
    return;
  }
  const uint8_t *k = keep + (uint64_t)row * t;
  int *p = pos + (uint64_t)row * t;
  const uint32_t lower = (1u << lane) - 1u;
  uint32_t count = 0;
  // One chunk ahead in a register, so the loop does not stall on every load.
  uint8_t next = lane < t ? k[lane] : 0;
  for (uint32_t base = 0; base < t; base += 32) {
    const uint32_t i = base + lane;
    const bool kept = i < t && next != 0;
    next = i + 32 < t ? k[i + 32] : 0;
    const uint32_t ballot = __ballot_sync(FULL_MASK, kept);
    if (kept) {
      p[count + __popc(ballot & lower)] = (int)i;
    }
    count += __popc(ballot);
  }
  for (uint32_t r = count + lane; r < t; r += 32) {
    p[r] = pad_pos;
  }
}

// ---------------------------------------------------------------------------------------------
// Stable counting sort by bucket, one warp per (batch, head) row of length t, n_buckets <= the
// dynamic shared memory ((n_buckets + 1) ints). Output packed as two planes of (n_rows, t) ints:
//   out[0, row, r] = time index of the r-th row in (bucket, time) order (pad_pos for dropped rows)
//   out[1, row, r] = its bucket id (pad_bucket for dropped rows)
// Ids outside [0, n_buckets) go to a virtual last bucket and come out as padding.
// Histogram (shared atomics), exclusive scan (warp shuffles), then a time-ordered scatter where
// lanes with equal buckets rank themselves with __match_any_sync: stable by construction.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int warp_inclusive_scan(int v, uint32_t lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(FULL_MASK, v, off);
    if (lane >= (uint32_t)off) {
      v += o;
    }
  }
  return v;
}

extern "C" __global__ void bucket_sort(const int *__restrict__ ids, int *__restrict__ out,
                                       uint32_t n_rows, uint32_t t, uint32_t n_buckets,
                                       int pad_pos, int pad_bucket) {
  extern __shared__ int offsets[]; // n_buckets + 1 counters
  const uint32_t row = blockIdx.x;
  const uint32_t lane = threadIdx.x;
  if (row >= n_rows || blockDim.x != 32) {
    return;
  }
  const uint32_t slots = n_buckets + 1;
  const int *id = ids + (uint64_t)row * t;
  int *out_pos = out + (uint64_t)row * t;
  int *out_bkt = out + (uint64_t)n_rows * t + (uint64_t)row * t;

  for (uint32_t s = lane; s < slots; s += 32) {
    offsets[s] = 0;
  }
  __syncwarp();
#pragma unroll 4
  for (uint32_t i = lane; i < t; i += 32) {
    const int b = id[i];
    const uint32_t slot = (b >= 0 && (uint32_t)b < n_buckets) ? (uint32_t)b : n_buckets;
    atomicAdd(&offsets[slot], 1);
  }
  __syncwarp();
  int carry = 0;
  for (uint32_t base = 0; base < slots; base += 32) {
    const uint32_t s = base + lane;
    const int c = s < slots ? offsets[s] : 0;
    const int incl = warp_inclusive_scan(c, lane);
    if (s < slots) {
      offsets[s] = carry + incl - c;
    }
    carry += __shfl_sync(FULL_MASK, incl, 31);
  }
  __syncwarp();

  const uint32_t lower = (1u << lane) - 1u;
  int next = lane < t ? id[lane] : 0; // one chunk ahead, as in compact_kept
  for (uint32_t base = 0; base < t; base += 32) {
    const uint32_t i = base + lane;
    const bool active = i < t;
    const int b = next;
    next = i + 32 < t ? id[i + 32] : 0;
    const bool valid = b >= 0 && (uint32_t)b < n_buckets;
    // Inactive lanes take a key no active lane can have.
    const int slot = !active ? -1 : (valid ? b : (int)n_buckets);
    const uint32_t peers = __match_any_sync(FULL_MASK, slot);
    const int start = active ? offsets[slot] : 0;
    __syncwarp();
    if (active) {
      const uint32_t dst = (uint32_t)start + __popc(peers & lower);
      if (dst < t) {
        out_pos[dst] = valid ? (int)i : pad_pos;
        out_bkt[dst] = valid ? b : pad_bucket;
      }
      if (lane == (uint32_t)(__ffs(peers) - 1)) {
        offsets[slot] = start + __popc(peers);
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Angular LSH: bucket = argmax([x·R, −x·R]) over n_buckets = 2·half candidates, ties to the
// lowest index. x: (n_rows = batch·heads·t, d); R: (rot_heads, d, half) f32; row -> head
// (row / t) % heads -> rotation head / group (clamped to rot_heads - 1).
// A warp handles rows_per_warp consecutive rows (a power of two dividing 32), staged in shared
// memory (blockDim/32 · rows_per_warp · d floats); each row gets width = 32 / rows_per_warp lanes,
// lane c of a row computing columns c, c + width, ... and the row's lanes reducing the argmax.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ bool better(float v, int i, float best, int best_i) {
  return v > best || (v == best && i < best_i);
}

template <typename T>
__device__ __forceinline__ void lsh_buckets(const T *__restrict__ x, const float *__restrict__ rot,
                                            int *__restrict__ out, uint64_t n_rows, uint32_t t,
                                            uint32_t heads, uint32_t group, uint32_t rot_heads,
                                            uint32_t d, uint32_t half, uint32_t rows_per_warp) {
  extern __shared__ float staged[];
  const uint32_t warps = blockDim.x / 32;
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  if (warp >= warps || t == 0 || heads == 0 || group == 0 || rot_heads == 0 || d == 0 ||
      rows_per_warp == 0 || rows_per_warp > 32 || 32 % rows_per_warp != 0) {
    return;
  }
  const uint32_t width = 32 / rows_per_warp;
  const uint32_t sub = lane / width;
  const uint32_t col0 = lane % width;
  float *xs = staged + (uint64_t)warp * rows_per_warp * d;
  const uint64_t rows_per_block = (uint64_t)warps * rows_per_warp;
  for (uint64_t first = (uint64_t)blockIdx.x * rows_per_block + (uint64_t)warp * rows_per_warp;
       first < n_rows; first += (uint64_t)gridDim.x * rows_per_block) {
    // Consecutive rows are contiguous in memory: a coalesced copy.
    for (uint32_t e = lane; e < rows_per_warp * d; e += 32) {
      const uint64_t r = first + e / d;
      xs[e] = r < n_rows ? to_float(x[first * d + e]) : 0.f;
    }
    __syncwarp();
    const uint64_t row = first + sub;
    const bool valid = row < n_rows;
    float best = -INFINITY;
    int best_i = 0;
    if (valid) {
      const uint32_t head = (uint32_t)((row / t) % heads);
      uint32_t rh = head / group;
      rh = rh < rot_heads ? rh : rot_heads - 1;
      const float *r = rot + (uint64_t)rh * d * half;
      const float *xr = xs + (uint64_t)sub * d;
      for (uint32_t c = col0; c < half; c += width) {
        float p = 0.f;
        for (uint32_t k = 0; k < d; ++k) {
          p = fmaf(xr[k], r[(uint64_t)k * half + c], p);
        }
        if (better(p, (int)c, best, best_i)) {
          best = p;
          best_i = (int)c;
        }
        if (better(-p, (int)(c + half), best, best_i)) {
          best = -p;
          best_i = (int)(c + half);
        }
      }
    }
    // Butterfly within the row's aligned group of `width` lanes; every lane takes part.
    for (uint32_t off = width / 2; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, best, off);
      const int oi = __shfl_xor_sync(FULL_MASK, best_i, off);
      if (better(ov, oi, best, best_i)) {
        best = ov;
        best_i = oi;
      }
    }
    if (valid && col0 == 0) {
      out[row] = best_i;
    }
    __syncwarp();
  }
}

#define LSH(T, SUFFIX)                                                                             \
  extern "C" __global__ void lsh_buckets_##SUFFIX(                                                 \
      const T *x, const float *rot, int *out, uint64_t n_rows, uint32_t t, uint32_t heads,         \
      uint32_t group, uint32_t rot_heads, uint32_t d, uint32_t half, uint32_t rows_per_warp) {     \
    lsh_buckets<T>(x, rot, out, n_rows, t, heads, group, rot_heads, d, half, rows_per_warp);       \
  }

LSH(float, f32)
LSH(__half, f16)
LSH(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Index conversion to i32: values inside [lo, hi] are copied, others become `invalid`.
// ---------------------------------------------------------------------------------------------

#define TO_I32(T, SUFFIX)                                                                          \
  extern "C" __global__ void to_i32_##SUFFIX(const T *in, int *out, uint64_t n, int64_t lo,        \
                                             int64_t hi, int invalid) {                            \
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;                                      \
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {       \
      const int64_t v = (int64_t)in[i];                                                            \
      out[i] = (v >= lo && v <= hi) ? (int)v : invalid;                                            \
    }                                                                                              \
  }

TO_I32(uint8_t, u8)
TO_I32(uint32_t, u32)
TO_I32(int32_t, i32)
TO_I32(int64_t, i64)
