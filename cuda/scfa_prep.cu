// Pre- and post-processing kernels of sparse causal flash attention (src/scfa): row gather (a
// scatter is a gather by the inverse index), index inversion, keep-mask compaction, stable
// counting sort by bucket, angular LSH, index conversion. Loaded under the module name
// "scfa_prep". Every index read from memory is bounds-checked: out-of-range row indices mean
// "padding" (the gather writes zeros), and out-of-range bucket ids are sorted to the end as
// padding rows.

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "scan.cuh"

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------------------
// Row gather. Tensors are (rows_outer = batch·heads, len, units) where a "unit" is the widest copy
// type (2, 4, 8 or 16 bytes) dividing the row size and the source offset.
//   out[bh, r, :] = x[bh, idx[bh, r], :], or 0 when idx[bh, r] is outside [0, n_in)
//   idx: (bh, n_out);  out: (bh, n_out, units), every element written exactly once.
// A scatter is a gather by the inverse index (see invert_rows), so the zero fill of rows where
// nothing lands is part of the same pass. Each row gets min(units, blockDim) consecutive threads
// (coalesced 16-byte copies); out_rows < 2^32.
// ---------------------------------------------------------------------------------------------

template <typename U>
__device__ __forceinline__ void gather_rows(const U *__restrict__ x, const int *__restrict__ idx,
                                            U *__restrict__ out, uint32_t out_rows, uint32_t n_out,
                                            uint32_t n_in, uint32_t units) {
  const uint32_t per_row = units < blockDim.x ? units : blockDim.x;
  const uint32_t rows_per_block = blockDim.x / per_row;
  const uint32_t local = threadIdx.x / per_row;
  if (local >= rows_per_block) {
    return;
  }
  const uint64_t row = (uint64_t)blockIdx.x * rows_per_block + local;
  if (row >= out_rows) {
    return;
  }
  const uint32_t bh = (uint32_t)row / n_out;
  const int src = idx[row];
  const bool hit = src >= 0 && (uint32_t)src < n_in;
  const U *from = x + ((uint64_t)bh * n_in + (hit ? (uint32_t)src : 0u)) * units;
  U *to = out + row * units;
  for (uint32_t u = threadIdx.x - local * per_row; u < units; u += per_row) {
    U val = {};
    if (hit) {
      val = from[u];
    }
    to[u] = val;
  }
}

#define ROW_GATHER(U, SUFFIX)                                                                      \
  extern "C" __global__ void gather_rows_##SUFFIX(const U *x, const int *idx, U *out,             \
                                                  uint32_t out_rows, uint32_t n_out,              \
                                                  uint32_t n_in, uint32_t units) {                \
    gather_rows<U>(x, idx, out, out_rows, n_out, n_in, units);                                    \
  }

ROW_GATHER(uint16_t, u16)
ROW_GATHER(uint32_t, u32)
ROW_GATHER(uint2, u64)
ROW_GATHER(uint4, u128)

// Inverse of a row index, one block per (batch, head): inv[bh, s] = r for idx[bh, r] == s, -1
// where no entry lands (entries outside [0, n_inv) are skipped; duplicates: one of them wins).
// idx: (rows, n_idx); inv: (rows, n_inv).
extern "C" __global__ void invert_rows(const int *__restrict__ idx, int *__restrict__ inv,
                                       uint32_t n_idx, uint32_t n_inv) {
  const uint64_t row = blockIdx.x;
  int *dst = inv + row * n_inv;
  for (uint32_t s = threadIdx.x; s < n_inv; s += blockDim.x) {
    dst[s] = -1;
  }
  __syncthreads();
  const int *src = idx + row * n_idx;
  for (uint32_t r = threadIdx.x; r < n_idx; r += blockDim.x) {
    const int s = src[r];
    if (s >= 0 && (uint32_t)s < n_inv) {
      dst[s] = (int)r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Keep-mask compaction, one block per (batch, head) row of length t. Output two planes of
// (n_rows, t) ints:
//   out[0, row, r] = time index of the r-th kept step (time order), pad_pos for r >= kept count
//   out[1, row, i] = compacted row of step i, -1 when step i is dropped
// Tiles of blockDim·16 steps: each thread counts 16 consecutive steps, a block scan gives its
// first compacted row. Stable by construction.
// ---------------------------------------------------------------------------------------------

#define COMPACT_STEPS 16

extern "C" __global__ void compact_kept(const uint8_t *__restrict__ keep, int *__restrict__ out,
                                        uint32_t n_rows, uint32_t t, int pad_pos) {
  const uint32_t row = blockIdx.x;
  if (row >= n_rows) {
    return;
  }
  const uint8_t *k = keep + (uint64_t)row * t;
  int *pos = out + (uint64_t)row * t;
  int *inv = out + (uint64_t)n_rows * t + (uint64_t)row * t;
  int carry = 0;
  for (uint32_t base = 0; base < t; base += blockDim.x * COMPACT_STEPS) {
    const uint32_t first = base + threadIdx.x * COMPACT_STEPS;
    uint32_t bits = 0;
#pragma unroll
    for (uint32_t j = 0; j < COMPACT_STEPS; ++j) {
      const uint32_t i = first + j;
      if (i < t && k[i] != 0) {
        bits |= 1u << j;
      }
    }
    int total;
    int r = carry + block_exclusive_scan(__popc(bits), &total);
#pragma unroll
    for (uint32_t j = 0; j < COMPACT_STEPS; ++j) {
      const uint32_t i = first + j;
      if (i < t) {
        if ((bits >> j) & 1u) {
          pos[r] = (int)i;
          inv[i] = r++;
        } else {
          inv[i] = -1;
        }
      }
    }
    carry += total;
  }
  for (uint32_t r = (uint32_t)carry + threadIdx.x; r < t; r += blockDim.x) {
    pos[r] = pad_pos;
  }
}

// ---------------------------------------------------------------------------------------------
// Stable counting sort by bucket, one block of W = blockDim/32 warps per (batch, head) row of
// length t. Output three planes of (n_rows, t) ints:
//   out[0, row, r] = time index of the r-th row in (bucket, time) order (pad_pos for dropped rows)
//   out[1, row, r] = its bucket id (pad_bucket for dropped rows)
//   out[2, row, i] = sorted row of step i, -1 for dropped steps
// Ids outside [0, n_buckets) go to a virtual last bucket and come out as padding.
// Warp w owns the w-th of W consecutive segments of the row (whole 32-step chunks but the last),
// so the block synchronises only twice:
//   1. each warp counts its segment per slot (slots = n_buckets + 1) into its own row of counters
//      (lanes with equal slots combine with __match_any_sync, the lowest lane adds);
//   2. per slot, the total over the warps; an exclusive scan over the slots gives each bucket's
//      first row; per slot, the warps' counts become their first rows in warp (= time) order;
//   3. each warp walks its segment again in order, ranking equal slots by lane and advancing its
//      own running offsets.
// Dynamic shared memory: slots running offsets, plus W·slots per-warp counters when W > 1 (W = 1
// uses the offsets as its counters). Stable by construction.
// ---------------------------------------------------------------------------------------------

extern "C" __global__ void bucket_sort(const int *__restrict__ ids, int *__restrict__ out,
                                       uint32_t n_rows, uint32_t t, uint32_t n_buckets,
                                       int pad_pos, int pad_bucket) {
  extern __shared__ int offsets[]; // slots bucket starts, then [W][slots] counters when W > 1
  const uint32_t row = blockIdx.x;
  if (row >= n_rows) {
    return;
  }
  const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const uint32_t slots = n_buckets + 1;
  int *counts = warps > 1 ? offsets + slots : offsets;
  int *mine = counts + (uint64_t)warp * slots;
  const int *id = ids + (uint64_t)row * t;
  const uint64_t plane = (uint64_t)n_rows * t;
  int *out_pos = out + (uint64_t)row * t;
  int *out_bkt = out_pos + plane;
  int *out_inv = out_bkt + plane;
  // Warp segments: whole chunks of 32 steps, [lo, hi).
  const uint32_t seg = ((t + 32 * warps - 1) / (32 * warps)) * 32;
  const uint64_t lo64 = (uint64_t)warp * seg;
  const uint32_t lo = lo64 < t ? (uint32_t)lo64 : t;
  const uint32_t hi = (uint64_t)lo + seg < t ? lo + seg : t;
  const uint32_t lower = (1u << lane) - 1u;

  // Slot of step i of the segment: its bucket, n_buckets for an invalid id, and for steps past
  // the segment (inactive lanes) -1, a key no active lane can have.
  auto slot_of = [&](uint32_t i) -> int {
    if (i >= hi) return -1;
    const int b = id[i];
    return b >= 0 && (uint32_t)b < n_buckets ? b : (int)n_buckets;
  };

  for (uint32_t e = threadIdx.x; e < warps * slots; e += blockDim.x) {
    counts[e] = 0;
  }
  if (warps > 1) {
    for (uint32_t s = threadIdx.x; s < slots; s += blockDim.x) {
      offsets[s] = 0;
    }
  }
  __syncthreads();

  // 1. Per-warp counts of the segment (only this warp touches its counters).
  for (uint32_t base = lo; base < hi; base += 32) {
    const uint32_t i = base + lane;
    const bool active = i < hi;
    const int slot = slot_of(i);
    const uint32_t peers = __match_any_sync(FULL_MASK, slot);
    if (active && lane == (uint32_t)(__ffs(peers) - 1)) {
      mine[slot] += __popc(peers);
    }
    __syncwarp();
  }
  __syncthreads();

  // 2. Bucket starts, then each warp's first row per slot.
  if (warps > 1) {
    for (uint32_t s = threadIdx.x; s < slots; s += blockDim.x) {
      int total = 0;
      for (uint32_t w = 0; w < warps; ++w) {
        total += counts[w * slots + s];
      }
      offsets[s] = total;
    }
    __syncthreads();
  }
  if (warp == 0) {
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
  }
  __syncthreads();
  if (warps > 1) {
    for (uint32_t s = threadIdx.x; s < slots; s += blockDim.x) {
      int run = offsets[s];
      for (uint32_t w = 0; w < warps; ++w) {
        const int c = counts[w * slots + s];
        counts[w * slots + s] = run;
        run += c;
      }
    }
    __syncthreads();
  }

  // 3. Ranks: this warp's running offsets, in time order.
  for (uint32_t base = lo; base < hi; base += 32) {
    const uint32_t i = base + lane;
    const bool active = i < hi;
    const int slot = slot_of(i);
    const uint32_t peers = __match_any_sync(FULL_MASK, slot);
    const int start = active ? mine[slot] : 0;
    __syncwarp();
    if (active && lane == (uint32_t)(__ffs(peers) - 1)) {
      mine[slot] = start + __popc(peers);
    }
    __syncwarp();
    if (active) {
      const bool valid = slot < (int)n_buckets;  // the slot is the row's bucket
      const uint32_t dst = (uint32_t)start + __popc(peers & lower);
      if (dst < t) {
        out_pos[dst] = valid ? (int)i : pad_pos;
        out_bkt[dst] = valid ? slot : pad_bucket;
      }
      out_inv[i] = valid && dst < t ? (int)dst : -1;
    }
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

// Thread-per-row variant for head dims D = 64 and 128 (compile-time) and 16-byte aligned x. Block
// b takes rows tile·blockDim .. of sequence seq (seq = b / tiles, tile = b % tiles; a sequence is
// the t rows of one (batch, head)), so all its rows share one rotation head, which the block
// stages in shared memory first (D·half floats, dynamic; the host checks the size). Each thread
// reads its row with 16-byte loads into registers (kept packed, D fully unrolled so every index is
// static: no local memory), scores the columns in chunks of 8 accumulators with the rotation
// entries read from shared memory (the whole warp reads one address: a broadcast, 16 bytes at a
// time when half % 4 == 0). Same products (k ascending fmaf chain from 0) and tie rule as
// lsh_buckets, so the same ids.
#define LSH_CHUNK 8

__device__ __forceinline__ uint32_t word_of(const uint4 &u, int w) {
  return w == 0 ? u.x : w == 1 ? u.y : w == 2 ? u.z : u.w;
}

// Element j (static after unrolling) of a 16-byte unit of T, as f32 (exact).
template <typename T> struct Unit16;
template <> struct Unit16<float> {
  static constexpr int PER = 4;
  static __device__ __forceinline__ float get(const uint4 &u, int j) {
    return __uint_as_float(word_of(u, j));
  }
};
template <> struct Unit16<__nv_bfloat16> {
  static constexpr int PER = 8;
  static __device__ __forceinline__ float get(const uint4 &u, int j) {
    const uint32_t w = word_of(u, j >> 1);
    return __uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16));
  }
};
template <> struct Unit16<__half> {
  static constexpr int PER = 8;
  static __device__ __forceinline__ float get(const uint4 &u, int j) {
    const uint32_t w = word_of(u, j >> 1);
    return __half2float(__ushort_as_half((unsigned short)((j & 1) ? (w >> 16) : (w & 0xffffu))));
  }
};

template <typename T, int D>
__device__ __forceinline__ void lsh_rows(const T *__restrict__ x, const float *__restrict__ rot,
                                         int *__restrict__ out, uint32_t seqs, uint32_t t,
                                         uint32_t heads, uint32_t group, uint32_t rot_heads,
                                         uint32_t half, uint32_t tiles) {
  extern __shared__ float4 staged_rot4[];
  float *rs = reinterpret_cast<float *>(staged_rot4);
  if (t == 0 || heads == 0 || group == 0 || rot_heads == 0 || tiles == 0) {
    return;
  }
  // Uniform over the block: every thread reaches the barrier below or none does.
  const uint32_t seq = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  if (seq >= seqs) {
    return;
  }
  uint32_t rh = (seq % heads) / group;
  rh = rh < rot_heads ? rh : rot_heads - 1;
  const float *r = rot + (uint64_t)rh * D * half;
  for (uint32_t e = threadIdx.x; e < (uint32_t)D * half; e += blockDim.x) {
    rs[e] = r[e];
  }
  __syncthreads();
  const uint64_t ti = (uint64_t)tile * blockDim.x + threadIdx.x;
  if (ti >= t) {
    return;
  }
  const uint64_t row = (uint64_t)seq * t + ti;
  typedef Unit16<T> U;
  static_assert(D % U::PER == 0, "row must be whole 16-byte units");
  constexpr int UNITS = D / U::PER;
  uint4 xu[UNITS];
  const uint4 *src = reinterpret_cast<const uint4 *>(x + row * D);
#pragma unroll
  for (int i = 0; i < UNITS; ++i) {
    xu[i] = src[i];
  }
  const bool vec4 = half % 4 == 0;
  float best = -INFINITY;
  int best_i = 0;
  for (uint32_t c0 = 0; c0 < half; c0 += LSH_CHUNK) {
    float acc[LSH_CHUNK];
#pragma unroll
    for (int j = 0; j < LSH_CHUNK; ++j) {
      acc[j] = 0.f;
    }
    if (c0 + LSH_CHUNK <= half && vec4) {
      // (k·half + c0) is a multiple of 4: float4 reads of the staged rotation.
      const float4 *rk = staged_rot4 + c0 / 4;
      const uint32_t step = half / 4;
#pragma unroll
      for (int k = 0; k < D; ++k) {
        const float xk = U::get(xu[k / U::PER], k % U::PER);
#pragma unroll
        for (int j4 = 0; j4 < LSH_CHUNK / 4; ++j4) {
          const float4 w = rk[(uint32_t)k * step + j4];
          acc[4 * j4] = fmaf(xk, w.x, acc[4 * j4]);
          acc[4 * j4 + 1] = fmaf(xk, w.y, acc[4 * j4 + 1]);
          acc[4 * j4 + 2] = fmaf(xk, w.z, acc[4 * j4 + 2]);
          acc[4 * j4 + 3] = fmaf(xk, w.w, acc[4 * j4 + 3]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < D; ++k) {
        const float xk = U::get(xu[k / U::PER], k % U::PER);
        const float *rk = rs + (uint32_t)k * half + c0;
#pragma unroll
        for (int j = 0; j < LSH_CHUNK; ++j) {
          if (c0 + j < half) {
            acc[j] = fmaf(xk, rk[j], acc[j]);
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < LSH_CHUNK; ++j) {
      const uint32_t c = c0 + j;
      if (c < half) {
        if (better(acc[j], (int)c, best, best_i)) {
          best = acc[j];
          best_i = (int)c;
        }
        if (better(-acc[j], (int)(c + half), best, best_i)) {
          best = -acc[j];
          best_i = (int)(c + half);
        }
      }
    }
  }
  out[row] = best_i;
}

#define LSH_ROWS(T, SUFFIX, D)                                                                     \
  extern "C" __global__ void lsh_rows_##SUFFIX##_d##D(const T *x, const float *rot, int *out,      \
                                                       uint32_t seqs, uint32_t t, uint32_t heads,  \
                                                       uint32_t group, uint32_t rot_heads,         \
                                                       uint32_t half, uint32_t tiles) {            \
    lsh_rows<T, D>(x, rot, out, seqs, t, heads, group, rot_heads, half, tiles);                    \
  }

LSH_ROWS(float, f32, 64)
LSH_ROWS(__half, f16, 64)
LSH_ROWS(__nv_bfloat16, bf16, 64)
LSH_ROWS(float, f32, 128)
LSH_ROWS(__half, f16, 128)
LSH_ROWS(__nv_bfloat16, bf16, 128)

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

// ---------------------------------------------------------------------------------------------
// Counter-based random numbers (src/scfa/random.rs computes the same on the CPU): value i of the
// stream keyed by key = mix64(seed) is mix64(key + (i + 1)·γ), SplitMix64.
// ---------------------------------------------------------------------------------------------

#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15ull

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t stream_value(uint64_t key, uint64_t i) {
  return mix64(key + (i + 1) * SPLITMIX_GAMMA);
}

// keep[i] = 1 iff the top 24 bits of value i are >= threshold (of 2^24 draws, `threshold` drop).
extern "C" __global__ void random_keep(uint8_t *__restrict__ keep, uint64_t n, uint64_t key,
                                       uint32_t threshold) {
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    keep[i] = (uint32_t)(stream_value(key, i) >> 40) >= threshold ? 1 : 0;
  }
}

// Standard normal number e of the stream (Box-Muller in double from values 2e and 2e + 1).
__device__ __forceinline__ double stream_gaussian(uint64_t key, uint64_t e) {
  const double unit = 1.0 / 9007199254740992.0; // 2^-53
  const double u1 = (double)((stream_value(key, 2 * e) >> 11) + 1) * unit;
  const double u2 = (double)(stream_value(key, 2 * e + 1) >> 11) * unit;
  return sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2);
}

// out (heads, dim, cols) f32: Gaussian entries (flat index e), each column (over dim) divided by
// its double L2 norm. One warp per (head, column): lane l generates entries l, l + 32, ... of the
// column (twice: for the norm, a warp sum, then for the output).
extern "C" __global__ void normalised_gaussian(float *__restrict__ out, uint32_t heads,
                                               uint32_t dim, uint32_t cols, uint64_t key) {
  const uint64_t n = (uint64_t)heads * cols;
  const uint32_t lane = threadIdx.x % 32;
  const uint64_t warps = (uint64_t)gridDim.x * blockDim.x / 32;
  for (uint64_t j = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; j < n; j += warps) {
    const uint64_t h = j / cols, c = j % cols;
    double sum = 0.0;
    for (uint32_t k = lane; k < dim; k += 32) {
      const double z = stream_gaussian(key, (h * dim + k) * cols + c);
      sum += z * z;
    }
    for (int off = 16; off > 0; off >>= 1) {
      sum += __shfl_xor_sync(FULL_MASK, sum, off);
    }
    const double norm = sqrt(sum);
    for (uint32_t k = lane; k < dim; k += 32) {
      const uint64_t e = (h * dim + k) * cols + c;
      const double z = stream_gaussian(key, e);
      out[e] = (float)(norm > 0.0 ? z / norm : z);
    }
  }
}
