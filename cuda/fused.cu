// Fused training ops of the char-level GPT (see src/fused/cuda.rs for the launch side):
// - ln_fwd / ln_bwd: LayerNorm over the last axis with a gain and no bias, one warp per row,
//   statistics in f32; the backward writes the input gradient (plus an optional residual) and
//   reduces the gain gradient per block into f32 partials (summed over blocks by the caller).
// - add_ln_fwd: a residual add and the LayerNorm of its result, one warp per row.
//   The three LayerNorm kernels come in register-resident variants `<name>_<dtype>_v<V>n<N>`: the
//   warp loads its row once (lane l owns chunks l, l + 32, ... of V elements, at most N chunks:
//   16-byte loads for V = 16 / sizeof(T), scalar loads for V = 1), computes the statistics (and
//   the backward's two row sums) from registers and writes each output once; the backward keeps
//   its gain-gradient sums in registers across its rows. The host picks the smallest N that holds
//   the row (V = 16 / sizeof(T) when c is a multiple of V and every pointer is 16-byte aligned,
//   else V = 1); wider rows use the plain `<name>_<dtype>` kernels, which re-read the row from
//   memory. A vector variant checks the alignment again and falls back to the plain code.
// - gelu_fwd / gelu_bwd: GELU (tanh approximation), element-wise (16-byte vectors when
//   aligned), f32 math.
// - emb_fwd: embedding rows gathered by id (NaN rows for ids outside the vocabulary); emb_bwd:
//   its backward, atomicAdd of each output-gradient row into an f32 table.
// - batch_sum: the leading axis of a (b, n) tensor summed in f32 (a position table's gradient).
// - one_hot: one-hot rows of ids (a small vocabulary's embedding gradient as a GEMM).
// - heads_split / heads_merge: (b, t, parts, h, d) <-> one part (b, h, t, d) (parts 3: the fused
//   qkv projection; parts 1: heads of a plain (b, t, h·d) tensor); heads_split3 / heads_merge3:
//   all three parts at once, in rows that may be wider than the three parts (a projection with
//   more columns after q, k, v: split reads a view of it, merge appends the extra columns). Pure copies in units of 16, 4 or 2 bytes (the caller picks the
//   widest that divides a head row and its offsets), 32-bit index math.
// - xent: softmax cross-entropy per row (loss and logit gradient), one warp per row.
// - adamw_step: one AdamW update of an f32 parameter, its moments and gradient.
// - adamw_many: AdamW updates of many f32 parameters and their moments in place (a table of
//   pointers), one launch per 120 tensors.
// - cast_concat: many f32 tensors cast to bf16 / f16 into one output, one after the other (a
//   table of pointers), one launch per 160 tensors.
// - sumsq_partial / sum_f32: sum of squares of many f32 tensors (a table of pointers), per-block
//   partials then one block summing them in a fixed order; norm_clip: the norm and its clip
//   factor from that sum.
//   The three take their tables by value (WordTable, a kernel parameter): no host-to-device copy
//   is queued before the launch, so a captured CUDA graph holds its tables itself.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "chunk.cuh"
#include "mma.cuh"

#define FULL 0xffffffffu

// A table of 64-bit words (pointers and lengths) passed by value as a kernel parameter. 480 words
// (3,840 bytes) keep each launch's parameters under the 4 KB limit; the host splits longer lists
// over several launches (TABLE_WORDS in src/fused/cuda.rs).
#define TABLE_WORDS 480
struct WordTable {
  uint64_t w[TABLE_WORDS];
};

// Mean and 1/sqrt(var + eps) of row x[0..c) (two passes over the row, f32).
template <typename T>
__device__ __forceinline__ void row_stats(const T* x, int c, float eps, int lane, float& mean,
                                          float& rstd) {
  float s = 0.f;
  for (int j = lane; j < c; j += 32) s += to_f(x[j]);
  mean = warp_sum(s) / c;
  float q = 0.f;
  for (int j = lane; j < c; j += 32) {
    float d = to_f(x[j]) - mean;
    q += d * d;
  }
  rstd = rsqrtf(warp_sum(q) / c + eps);
}

// y = (x - mean) * rstd * gain; one warp per row.
template <typename T>
__device__ void ln_fwd(const T* __restrict__ x, const T* __restrict__ gain, T* __restrict__ y,
                       int rows, int c, float eps) {
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + (size_t)row * c;
  T* yr = y + (size_t)row * c;
  float mean, rstd;
  row_stats(xr, c, eps, lane, mean, rstd);
  for (int j = lane; j < c; j += 32) yr[j] = from_f<T>((to_f(xr[j]) - mean) * rstd * to_f(gain[j]));
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gain (plus acc[row] when acc is
// not null), one warp per row, rows strided over the grid; partial[blockIdx.x, j] = sum over this
// block's rows of dy * xhat (f32). Dynamic shared memory: one row of c floats per warp (each lane
// owns its columns, so no atomics).
template <typename T>
__device__ void ln_bwd(const T* __restrict__ x, const T* __restrict__ gain,
                       const T* __restrict__ dy, const T* __restrict__ acc, T* __restrict__ dx,
                       float* __restrict__ partial, int rows, int c, float eps) {
  extern __shared__ float wacc[];
  int lane = threadIdx.x & 31;
  int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float* mine = wacc + (size_t)warp * c;
  for (int j = lane; j < c; j += 32) mine[j] = 0.f;
  for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
    size_t off = (size_t)row * c;
    float mean, rstd;
    row_stats(x + off, c, eps, lane, mean, rstd);
    float sg = 0.f, sgx = 0.f;
    for (int j = lane; j < c; j += 32) {
      float g = to_f(dy[off + j]) * to_f(gain[j]);
      float xh = (to_f(x[off + j]) - mean) * rstd;
      sg += g;
      sgx += g * xh;
    }
    sg = warp_sum(sg) / c;
    sgx = warp_sum(sgx) / c;
    for (int j = lane; j < c; j += 32) {
      float d = to_f(dy[off + j]);
      float xh = (to_f(x[off + j]) - mean) * rstd;
      float out = rstd * (d * to_f(gain[j]) - sg - xh * sgx);
      if (acc) out += to_f(acc[off + j]);
      dx[off + j] = from_f<T>(out);
      mine[j] += d * xh;
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += wacc[(size_t)w * c + j];
    partial[(size_t)blockIdx.x * c + j] = s;
  }
}

// GELU, tanh approximation (GPT-2's gelu_new, the form of cuBLASLt's GELU epilogues):
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float gelu_f(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_grad_f(float x) {
  const float th = tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
  return 0.5f * (1.f + th) +
         0.5f * x * (1.f - th * th) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * x * x);
}

// Element-wise kernels over n elements: 16-byte vectors of V = 16 / sizeof(T) elements when every
// pointer is 16-byte aligned, then the scalar tail (all scalar otherwise); grid-stride loops.
template <typename T>
struct Vec16 {
  static constexpr int V = 16 / sizeof(T);
  union {
    uint4 raw;
    T e[V];
  };
};

__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c) {
  return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c) & 15) == 0;
}

template <typename T>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, size_t n) {
  constexpr int V = Vec16<T>::V;
  size_t start = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t nv = aligned16(x, y, y) ? n / V : 0;
  for (size_t i = start; i < nv; i += stride) {
    Vec16<T> a, out;
    a.raw = reinterpret_cast<const uint4*>(x)[i];
#pragma unroll
    for (int k = 0; k < V; ++k) out.e[k] = from_f<T>(gelu_f(to_f(a.e[k])));
    reinterpret_cast<uint4*>(y)[i] = out.raw;
  }
  for (size_t i = nv * V + start; i < n; i += stride) y[i] = from_f<T>(gelu_f(to_f(x[i])));
}

template <typename T>
__device__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                         size_t n) {
  constexpr int V = Vec16<T>::V;
  size_t start = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t nv = aligned16(x, dy, dx) ? n / V : 0;
  for (size_t i = start; i < nv; i += stride) {
    Vec16<T> a, g, out;
    a.raw = reinterpret_cast<const uint4*>(x)[i];
    g.raw = reinterpret_cast<const uint4*>(dy)[i];
#pragma unroll
    for (int k = 0; k < V; ++k) out.e[k] = from_f<T>(to_f(g.e[k]) * gelu_grad_f(to_f(a.e[k])));
    reinterpret_cast<uint4*>(dx)[i] = out.raw;
  }
  for (size_t i = nv * V + start; i < n; i += stride)
    dx[i] = from_f<T>(to_f(dy[i]) * gelu_grad_f(to_f(x[i])));
}

// s = x + delta (rounded to T) and y = LayerNorm(s) * gain, one warp per row: the residual add
// before every LayerNorm of the GPT's forward in one pass. Row r of x takes row r % delta_rows of
// delta (delta_rows = rows, or fewer for a delta broadcast over the leading axes).
template <typename T>
__device__ void add_ln_fwd(const T* __restrict__ x, const T* __restrict__ delta,
                           const T* __restrict__ gain, T* __restrict__ s, T* __restrict__ y,
                           int rows, int delta_rows, int c, float eps) {
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  size_t off = (size_t)row * c;
  const T* dr = delta + (size_t)(row % delta_rows) * c;
  float sum = 0.f;
  for (int j = lane; j < c; j += 32) {
    T v = from_f<T>(to_f(x[off + j]) + to_f(dr[j]));
    s[off + j] = v;
    sum += to_f(v);
  }
  float mean = warp_sum(sum) / c;
  // Each lane reads back only the elements of s it wrote.
  float q = 0.f;
  for (int j = lane; j < c; j += 32) {
    float d = to_f(s[off + j]) - mean;
    q += d * d;
  }
  float rstd = rsqrtf(warp_sum(q) / c + eps);
  for (int j = lane; j < c; j += 32)
    y[off + j] = from_f<T>((to_f(s[off + j]) - mean) * rstd * to_f(gain[j]));
}

// ---- Register-resident LayerNorm rows ----------------------------------------------------------
// Whether a row of c elements fits the register variant <T, V, N> with these pointers (null ones
// are skipped): c a multiple of V, c <= 32·N·V, every pointer aligned to V·sizeof(T).
template <typename T, int V, int N>
__device__ __forceinline__ bool regs_fit(int c, const void* a, const void* b, const void* d,
                                         const void* e, const void* f) {
  const unsigned bytes = V * sizeof(T);
  return c > 0 && c % V == 0 && c <= 32 * N * V && aligned_to(a, bytes) && aligned_to(b, bytes) &&
         aligned_to(d, bytes) && aligned_to(e, bytes) && aligned_to(f, bytes);
}

// Mean and 1/sqrt(var + eps) of a row held in registers (chunk i of this lane: lane + 32·i, valid
// below `chunks`), two passes over the registers, f32.
template <typename T, int V, int N>
__device__ __forceinline__ void regs_stats(const Chunk<T, V> (&v)[N], int lane, int chunks, int c,
                                           float eps, float& mean, float& rstd) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (lane + 32 * i < chunks) {
#pragma unroll
      for (int k = 0; k < V; ++k) s += to_f(v[i].e[k]);
    }
  mean = warp_sum(s) / c;
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (lane + 32 * i < chunks) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        float d = to_f(v[i].e[k]) - mean;
        q += d * d;
      }
    }
  rstd = rsqrtf(warp_sum(q) / c + eps);
}

// The LayerNorm of the row held in v (chunk lane + 32 i in v[i]) by gain, written to yr.
template <typename T, int V, int N>
__device__ __forceinline__ void regs_norm_store(const Chunk<T, V> (&v)[N], int lane, int chunks,
                                                int c, float eps, const T* __restrict__ gain,
                                                T* __restrict__ yr) {
  float mean, rstd;
  regs_stats<T, V, N>(v, lane, chunks, c, eps, mean, rstd);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int ch = lane + 32 * i;
    if (ch < chunks) {
      Chunk<T, V> g = ld_chunk<T, V>(gain + (size_t)ch * V), out;
#pragma unroll
      for (int k = 0; k < V; ++k)
        out.e[k] = from_f<T>((to_f(v[i].e[k]) - mean) * rstd * to_f(g.e[k]));
      st_chunk<T, V>(yr + (size_t)ch * V, out);
    }
  }
}

// ln_fwd with the row in registers (one read of x, one write of y).
template <typename T, int V, int N>
__device__ void ln_fwd_regs(const T* __restrict__ x, const T* __restrict__ gain,
                            T* __restrict__ y, int rows, int c, float eps) {
  if (!regs_fit<T, V, N>(c, x, gain, y, x, x)) {
    ln_fwd(x, gain, y, rows, c, eps);
    return;
  }
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int chunks = c / V;
  const T* xr = x + (size_t)row * c;
  T* yr = y + (size_t)row * c;
  Chunk<T, V> v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int ch = lane + 32 * i;
    if (ch < chunks) v[i] = ld_chunk<T, V>(xr + (size_t)ch * V);
  }
  regs_norm_store<T, V, N>(v, lane, chunks, c, eps, gain, yr);
}

// add_ln_fwd with the row in registers: x and delta read once, s and y written once; the
// statistics use s rounded to T, as in add_ln_fwd.
template <typename T, int V, int N>
__device__ void add_ln_fwd_regs(const T* __restrict__ x, const T* __restrict__ delta,
                                const T* __restrict__ gain, T* __restrict__ s,
                                T* __restrict__ y, int rows, int delta_rows, int c, float eps) {
  if (!regs_fit<T, V, N>(c, x, delta, gain, s, y)) {
    add_ln_fwd(x, delta, gain, s, y, rows, delta_rows, c, eps);
    return;
  }
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int chunks = c / V;
  size_t off = (size_t)row * c;
  const T* dr = delta + (size_t)(row % delta_rows) * c;
  Chunk<T, V> v[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int ch = lane + 32 * i;
    if (ch < chunks) {
      Chunk<T, V> a = ld_chunk<T, V>(x + off + (size_t)ch * V);
      Chunk<T, V> b = ld_chunk<T, V>(dr + (size_t)ch * V);
#pragma unroll
      for (int k = 0; k < V; ++k) v[i].e[k] = from_f<T>(to_f(a.e[k]) + to_f(b.e[k]));
      st_chunk<T, V>(s + off + (size_t)ch * V, v[i]);
    }
  }
  regs_norm_store<T, V, N>(v, lane, chunks, c, eps, gain, y + off);
}

// ln_bwd with each row in registers: x, dy (and acc) read once, dx written once; the gain and this
// lane's gain-gradient sums stay in registers across the warp's rows (rows strided over the grid)
// and go through the per-warp shared rows (c floats each) only at the end, summed over the warps
// in order into partial[blockIdx.x, :] as in ln_bwd.
template <typename T, int V, int N>
__device__ void ln_bwd_regs(const T* __restrict__ x, const T* __restrict__ gain,
                            const T* __restrict__ dy, const T* __restrict__ acc,
                            T* __restrict__ dx, float* __restrict__ partial, int rows, int c,
                            float eps) {
  if (!regs_fit<T, V, N>(c, x, gain, dy, acc ? (const void*)acc : (const void*)x, dx)) {
    ln_bwd(x, gain, dy, acc, dx, partial, rows, c, eps);
    return;
  }
  extern __shared__ float wacc[];
  int lane = threadIdx.x & 31;
  int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int chunks = c / V;
  Chunk<T, V> g[N];
  float dg[N][V];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int ch = lane + 32 * i;
    if (ch < chunks) g[i] = ld_chunk<T, V>(gain + (size_t)ch * V);
#pragma unroll
    for (int k = 0; k < V; ++k) dg[i][k] = 0.f;
  }
  for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
    size_t off = (size_t)row * c;
    Chunk<T, V> xv[N], dv[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      int ch = lane + 32 * i;
      if (ch < chunks) {
        xv[i] = ld_chunk<T, V>(x + off + (size_t)ch * V);
        dv[i] = ld_chunk<T, V>(dy + off + (size_t)ch * V);
      }
    }
    float mean, rstd;
    regs_stats<T, V, N>(xv, lane, chunks, c, eps, mean, rstd);
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (lane + 32 * i < chunks) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float gg = to_f(dv[i].e[k]) * to_f(g[i].e[k]);
          float xh = (to_f(xv[i].e[k]) - mean) * rstd;
          sg += gg;
          sgx += gg * xh;
        }
      }
    sg = warp_sum(sg) / c;
    sgx = warp_sum(sgx) / c;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      int ch = lane + 32 * i;
      if (ch < chunks) {
        Chunk<T, V> a, out;
        if (acc) a = ld_chunk<T, V>(acc + off + (size_t)ch * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          float d = to_f(dv[i].e[k]);
          float xh = (to_f(xv[i].e[k]) - mean) * rstd;
          float o = rstd * (d * to_f(g[i].e[k]) - sg - xh * sgx);
          if (acc) o += to_f(a.e[k]);
          out.e[k] = from_f<T>(o);
          dg[i][k] += d * xh;
        }
        st_chunk<T, V>(dx + off + (size_t)ch * V, out);
      }
    }
  }
  // Each lane owns its columns of its warp's shared row: no atomics.
  float* mine = wacc + (size_t)warp * c;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    int ch = lane + 32 * i;
    if (ch < chunks) {
#pragma unroll
      for (int k = 0; k < V; ++k) mine[ch * V + k] = dg[i][k];
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < c; j += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += wacc[(size_t)w * c + j];
    partial[(size_t)blockIdx.x * c + j] = s;
  }
}

// out[r, :] = table[ids[r], :] for every row r (c columns); a row of NaN for an id outside the
// vocabulary. One thread per 16-byte chunk when rows are 16-byte multiples and the pointers
// aligned, else per element; grid-stride.
template <typename T>
__device__ void emb_fwd(const T* __restrict__ table, const uint32_t* __restrict__ ids,
                        T* __restrict__ out, int rows, int c, uint32_t vocab) {
  using V = Vec16<T>;
  const bool vec = c % V::V == 0 && aligned16(table, out, out);
  const int per = vec ? c / V::V : c;
  const size_t n = (size_t)rows * per, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += stride) {
    const size_t r = i / per, e = i % per;
    const uint32_t id = ids[r];
    if (vec) {
      V v;
      if (id < vocab) {
        v.raw = reinterpret_cast<const uint4*>(table + (size_t)id * c)[e];
      } else {
        for (int k = 0; k < V::V; ++k) v.e[k] = from_f<T>(__int_as_float(0x7fc00000));
      }
      reinterpret_cast<uint4*>(out + r * c)[e] = v.raw;
    } else {
      out[i] = id < vocab ? table[(size_t)id * c + e] : from_f<T>(__int_as_float(0x7fc00000));
    }
  }
}

// out (rows, vocab) = the one-hot rows of ids (a row of zeros for an id outside the vocabulary).
template <typename T>
__device__ void one_hot(const uint32_t* __restrict__ ids, T* __restrict__ out, int rows,
                        int vocab) {
  const size_t n = (size_t)rows * vocab, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = from_f<T>(ids[i / vocab] == i % vocab ? 1.f : 0.f);
}

// out[j] = sum over r < b of x[r * n + j] in f32 (the leading axis summed; b small), in a fixed
// order; one thread per 16-byte chunk of a row when n is a multiple of the chunk and x aligned.
template <typename T>
__device__ void batch_sum(const T* __restrict__ x, float* __restrict__ out, int b, size_t n) {
  using V = Vec16<T>;
  const bool vec = n % V::V == 0 && aligned16(x, x, x);
  const size_t m = vec ? n / V::V : n, stride = (size_t)gridDim.x * blockDim.x;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < m; i += stride) {
    if (vec) {
      float acc[V::V] = {};
      for (int r = 0; r < b; ++r) {
        V v;
        v.raw = reinterpret_cast<const uint4*>(x + r * n)[i];
        for (int k = 0; k < V::V; ++k) acc[k] += to_f(v.e[k]);
      }
      for (int k = 0; k < V::V; ++k) out[i * V::V + k] = acc[k];
    } else {
      float acc = 0.f;
      for (int r = 0; r < b; ++r) acc += to_f(x[r * n + i]);
      out[i] = acc;
    }
  }
}

// table_grad[ids[r], j] += dy[r, j] for every row r (f32 atomics; the caller zeroes the table;
// ids outside the vocabulary are skipped, the forward rejects them).
template <typename T>
__device__ void emb_bwd(const T* __restrict__ dy, const uint32_t* __restrict__ ids,
                        float* __restrict__ table_grad, int rows, int c, uint32_t vocab) {
  size_t n = (size_t)rows * c;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t r = i / c, j = i % c;
    uint32_t id = ids[r];
    if (id < vocab) atomicAdd(&table_grad[(size_t)id * c + j], to_f(dy[i]));
  }
}

// The heads kernels copy units U (uint4, uint32_t or uint16_t); du = units per head row of d
// elements. Index of unit e of row (bi, ti, pi, hi) in a (b, t, parts, h, du) tensor:
__device__ __forceinline__ unsigned parts_at(unsigned bi, unsigned ti, unsigned pi, unsigned hi,
                                             unsigned e, unsigned t, unsigned parts, unsigned h,
                                             unsigned du) {
  return (((bi * t + ti) * parts + pi) * h + hi) * du + e;
}

// out (b, h, t, du) = part p of x (b, t, parts, h, du); one thread per output unit.
template <typename U>
__device__ void heads_split(const U* __restrict__ x, U* __restrict__ out, unsigned b, unsigned h,
                            unsigned t, unsigned du, unsigned parts, unsigned p) {
  unsigned n = b * h * t * du;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned e = i % du, r = i / du;
    unsigned ti = r % t, bh = r / t;
    out[i] = x[parts_at(bh / h, ti, p, bh % h, e, t, parts, h, du)];
  }
}

// q, k, v (b, h, t, du) = the three parts of x (b, t, 3, h, du) whose (b, t) rows are ru units
// apart (ru >= 3 * h * du: a view of a wider projection); one thread per output unit of each.
template <typename U>
__device__ void heads_split3(const U* __restrict__ x, U* __restrict__ q, U* __restrict__ k,
                             U* __restrict__ v, unsigned b, unsigned h, unsigned t, unsigned du,
                             unsigned ru) {
  unsigned n = b * h * t * du;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned e = i % du, r = i / du;
    unsigned ti = r % t, bh = r / t;
    unsigned src = ((bh / h) * t + ti) * ru + (bh % h) * du + e;
    unsigned stride = h * du;
    q[i] = x[src];
    k[i] = x[src + stride];
    v[i] = x[src + 2 * stride];
  }
}

// The inverse of heads_split (and its gradient): dx (b, t, parts, h, du) holds dout (b, h, t, du)
// in part p and zeros in the other parts; one thread per dx unit.
template <typename U>
__device__ void heads_merge(const U* __restrict__ dout, U* __restrict__ dx, unsigned b, unsigned h,
                            unsigned t, unsigned du, unsigned parts, unsigned p) {
  unsigned n = b * t * parts * h * du;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned e = i % du, r = i / du;
    unsigned hi = r % h;
    r /= h;
    unsigned pi = r % parts, bt = r / parts;
    unsigned ti = bt % t, bi = bt / t;
    U zero{};
    dx[i] = pi == p ? dout[((bi * h + hi) * t + ti) * du + e] : zero;
  }
}

// The inverse of heads_split3: x (b, t, ru) holds q, k, v (b, h, t, du) as (3, h, du) in its
// first 3 * h * du units and the rows of ex (b, t, ru - 3 * h * du) after them (ex may be null
// when ru = 3 * h * du); one thread per x unit.
template <typename U>
__device__ void heads_merge3(const U* __restrict__ q, const U* __restrict__ k,
                             const U* __restrict__ v, const U* __restrict__ ex, U* __restrict__ x,
                             unsigned b, unsigned h, unsigned t, unsigned du, unsigned ru) {
  unsigned n = b * t * ru, hdu = h * du, ne = ru - 3 * hdu;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned c = i % ru, bt = i / ru;
    if (c >= 3 * hdu) {
      x[i] = ex[bt * ne + c - 3 * hdu];
      continue;
    }
    unsigned pi = c / hdu, hi = (c % hdu) / du, e = c % du;
    unsigned ti = bt % t, bi = bt / t;
    unsigned src = ((bi * h + hi) * t + ti) * du + e;
    x[i] = pi == 0 ? q[src] : pi == 1 ? k[src] : v[src];
  }
}

#define INSTANTIATE_HEADS(U, NAME)                                                                \
  extern "C" __global__ void heads_split_##NAME(const U* x, U* out, unsigned b, unsigned h,       \
                                                unsigned t, unsigned du, unsigned parts,          \
                                                unsigned p) {                                     \
    heads_split(x, out, b, h, t, du, parts, p);                                                   \
  }                                                                                               \
  extern "C" __global__ void heads_split3_##NAME(const U* x, U* q, U* k, U* v, unsigned b,        \
                                                 unsigned h, unsigned t, unsigned du,             \
                                                 unsigned ru) {                                   \
    heads_split3(x, q, k, v, b, h, t, du, ru);                                                    \
  }                                                                                               \
  extern "C" __global__ void heads_merge_##NAME(const U* dout, U* dx, unsigned b, unsigned h,     \
                                                unsigned t, unsigned du, unsigned parts,          \
                                                unsigned p) {                                     \
    heads_merge(dout, dx, b, h, t, du, parts, p);                                                 \
  }                                                                                               \
  extern "C" __global__ void heads_merge3_##NAME(const U* q, const U* k, const U* v,              \
                                                 const U* ex, U* x, unsigned b, unsigned h,       \
                                                 unsigned t, unsigned du, unsigned ru) {          \
    heads_merge3(q, k, v, ex, x, b, h, t, du, ru);                                                \
  }

INSTANTIATE_HEADS(uint4, u16)
INSTANTIATE_HEADS(uint32_t, u4)
INSTANTIATE_HEADS(uint16_t, u2)

// loss[r] = logsumexp(row) - row[target]; grad[r, j] = (softmax(row)_j - [j == target]) * scale;
// one warp per row, f32 math. A target outside [0, v) gives a NaN loss and a zero gradient row.
template <typename T>
__device__ void xent(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                     float* __restrict__ loss, T* __restrict__ grad, int rows, int v,
                     float scale) {
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  size_t off = (size_t)row * v;
  uint32_t target = targets[row];
  float m = __int_as_float(0xff800000);  // -inf
  for (int j = lane; j < v; j += 32) m = fmaxf(m, to_f(logits[off + j]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL, m, o));
  float s = 0.f;
  for (int j = lane; j < v; j += 32) s += expf(to_f(logits[off + j]) - m);
  s = warp_sum(s);
  bool valid = target < (uint32_t)v;
  if (lane == 0) loss[row] = valid ? logf(s) + m - to_f(logits[off + target]) : __int_as_float(0x7fffffff);
  float inv = 1.f / s;
  for (int j = lane; j < v; j += 32) {
    float p = expf(to_f(logits[off + j]) - m) * inv - ((uint32_t)j == target ? 1.f : 0.f);
    grad[off + j] = from_f<T>(valid ? p * scale : 0.f);
  }
}

#define INSTANTIATE(TY, NAME)                                                                     \
  extern "C" __global__ void ln_fwd_##NAME(const TY* x, const TY* gain, TY* y, int rows, int c,  \
                                           float eps) {                                           \
    ln_fwd(x, gain, y, rows, c, eps);                                                             \
  }                                                                                               \
  extern "C" __global__ void ln_bwd_##NAME(const TY* x, const TY* gain, const TY* dy,          \
                                           const TY* acc, TY* dx, float* partial, int rows,       \
                                           int c, float eps) {                                    \
    ln_bwd(x, gain, dy, acc, dx, partial, rows, c, eps);                                          \
  }                                                                                               \
  extern "C" __global__ void add_ln_fwd_##NAME(const TY* x, const TY* delta, const TY* gain,      \
                                               TY* s, TY* y, int rows, int delta_rows, int c,     \
                                               float eps) {                                       \
    add_ln_fwd(x, delta, gain, s, y, rows, delta_rows, c, eps);                                   \
  }                                                                                               \
  extern "C" __global__ void gelu_fwd_##NAME(const TY* x, TY* y, size_t n) { gelu_fwd(x, y, n); } \
  extern "C" __global__ void gelu_bwd_##NAME(const TY* x, const TY* dy, TY* dx, size_t n) {       \
    gelu_bwd(x, dy, dx, n);                                                                       \
  }                                                                                               \
  extern "C" __global__ void emb_fwd_##NAME(const TY* table, const uint32_t* ids, TY* out,        \
                                            int rows, int c, uint32_t vocab) {                    \
    emb_fwd(table, ids, out, rows, c, vocab);                                                     \
  }                                                                                               \
  extern "C" __global__ void one_hot_##NAME(const uint32_t* ids, TY* out, int rows, int vocab) {  \
    one_hot(ids, out, rows, vocab);                                                               \
  }                                                                                               \
  extern "C" __global__ void batch_sum_##NAME(const TY* x, float* out, int b, size_t n) {         \
    batch_sum(x, out, b, n);                                                                      \
  }                                                                                               \
  extern "C" __global__ void emb_bwd_##NAME(const TY* dy, const uint32_t* ids, float* table_grad, \
                                            int rows, int c, uint32_t vocab) {                    \
    emb_bwd(dy, ids, table_grad, rows, c, vocab);                                                      \
  }                                                                                               \
  extern "C" __global__ void xent_##NAME(const TY* logits, const uint32_t* targets, float* loss,  \
                                         TY* grad, int rows, int v, float scale) {                \
    xent(logits, targets, loss, grad, rows, v, scale);                                            \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

// Register variants of the LayerNorm kernels: <dtype>_v<V>n<N> (see the top of the file), at most
// 256 threads per block. The backward asks for enough resident blocks (a register cap) that
// small rows keep many warps per SM (bf16 / f16 rows of up to 512 elements: 3 blocks, 80
// registers, no spills with sm_90).
#define LN_BWD_MIN_BLOCKS(V, N)                                                                   \
  ((V) * (N) <= 8 ? 4 : ((V) * (N) <= 16 && (V) == 8) ? 3 : (V) * (N) <= 32 ? 2 : 1)

#define INSTANTIATE_LN_REGS(TY, NAME, V, N)                                                       \
  extern "C" __global__ void ln_fwd_##NAME##_v##V##n##N(const TY* x, const TY* gain, TY* y,      \
                                                        int rows, int c, float eps) {            \
    ln_fwd_regs<TY, V, N>(x, gain, y, rows, c, eps);                                              \
  }                                                                                               \
  extern "C" __global__ void add_ln_fwd_##NAME##_v##V##n##N(const TY* x, const TY* delta,        \
                                                            const TY* gain, TY* s, TY* y,        \
                                                            int rows, int delta_rows, int c,     \
                                                            float eps) {                         \
    add_ln_fwd_regs<TY, V, N>(x, delta, gain, s, y, rows, delta_rows, c, eps);                    \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(256, LN_BWD_MIN_BLOCKS(V, N))                    \
      ln_bwd_##NAME##_v##V##n##N(const TY* x, const TY* gain,                                     \
                                                        const TY* dy, const TY* acc, TY* dx,     \
                                                        float* partial, int rows, int c,         \
                                                        float eps) {                             \
    ln_bwd_regs<TY, V, N>(x, gain, dy, acc, dx, partial, rows, c, eps);                           \
  }

// Vector chunks (16 bytes): N = 1, 2, 4, 8 (rows of up to 32·8·16 = 4096 bytes).
#define INSTANTIATE_LN_VEC(TY, NAME, V)                                                           \
  INSTANTIATE_LN_REGS(TY, NAME, V, 1)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, V, 2)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, V, 4)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, V, 8)
// Scalar chunks (any width or alignment): N = 1, 2, 4, 8, 16 (rows of up to 512 elements).
#define INSTANTIATE_LN_SCALAR(TY, NAME)                                                           \
  INSTANTIATE_LN_REGS(TY, NAME, 1, 1)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, 1, 2)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, 1, 4)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, 1, 8)                                                             \
  INSTANTIATE_LN_REGS(TY, NAME, 1, 16)

INSTANTIATE_LN_VEC(float, f32, 4)
INSTANTIATE_LN_VEC(__nv_bfloat16, bf16, 8)
INSTANTIATE_LN_VEC(__half, f16, 8)
INSTANTIATE_LN_SCALAR(float, f32)
INSTANTIATE_LN_SCALAR(__nv_bfloat16, bf16)
INSTANTIATE_LN_SCALAR(__half, f16)

// One AdamW element: g = grad * grad_scale; the moments m, v are updated in place; returns the
// new parameter.
__device__ __forceinline__ float adamw_element(float param, float grad, float& m, float& v,
                                               float lr, float beta1, float beta2, float eps,
                                               float weight_decay, float scale_m, float scale_v,
                                               float grad_scale) {
  float g = grad * grad_scale;
  m = beta1 * m + (1.f - beta1) * g;
  v = beta2 * v + (1.f - beta2) * g * g;
  float update = (m * scale_m) / (sqrtf(v * scale_v) + eps);
  return param * (1.f - lr * weight_decay) - lr * update;
}

// AdamW on f32 tensors of n elements: g = grad * grad_scale; m, v updated; the new parameter,
// first and second moments go to out[0..n), out[n..2n), out[2n..3n). state holds m then v.
extern "C" __global__ void adamw_step(const float* __restrict__ param,
                                      const float* __restrict__ state,
                                      const float* __restrict__ grad, float* __restrict__ out,
                                      size_t n, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, float scale_m, float scale_v,
                                      float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float m = state[i], v = state[n + i];
    out[i] = adamw_element(param[i], grad[i], m, v, lr, beta1, beta2, eps, weight_decay, scale_m,
                           scale_v, grad_scale);
    out[n + i] = m;
    out[2 * n + i] = v;
  }
}

// In-place AdamW of many tensors: table row blockIdx.y = (param, state, grad, n) with param and
// grad of n f32 and state (2, n) f32 (m then v); the update of adamw_step, the gradient scaled by
// grad_scale and, when grad_factor is not null, by the device scalar *grad_factor (a clipping
// factor computed on the device: no host read between the backward and the update).
// When step_scalars is not null it holds (lr, scale_m, scale_v) of this step, which replace the
// arguments (a captured graph reads the schedule from the device).
extern "C" __global__ void adamw_many(const WordTable table, const float* __restrict__ grad_factor,
                                      const float* __restrict__ step_scalars, float lr,
                                      float beta1, float beta2, float eps, float weight_decay,
                                      float scale_m, float scale_v, float grad_scale) {
  if (grad_factor != nullptr) grad_scale *= *grad_factor;
  if (step_scalars != nullptr) {
    lr = step_scalars[0];
    scale_m = step_scalars[1];
    scale_v = step_scalars[2];
  }
  const uint64_t* row = table.w + 4 * blockIdx.y;
  float* param = reinterpret_cast<float*>(row[0]);
  float* state = reinterpret_cast<float*>(row[1]);
  const float* grad = reinterpret_cast<const float*>(row[2]);
  size_t n = row[3];
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float m = state[i], v = state[n + i];
    param[i] = adamw_element(param[i], grad[i], m, v, lr, beta1, beta2, eps, weight_decay, scale_m,
                             scale_v, grad_scale);
    state[i] = m;
    state[n + i] = v;
  }
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  v = warp_sum(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.f;
  return warp == 0 ? warp_sum(v) : 0.f;
}

// Casts of many f32 tensors in one launch: table row blockIdx.y = (src, offset, n), src of n f32
// cast to out[offset, offset + n).
template <typename T>
__device__ void cast_concat(const WordTable& table, T* __restrict__ out) {
  const uint64_t* row = table.w + 3 * blockIdx.y;
  const float* src = reinterpret_cast<const float*>(row[0]);
  T* dst = out + row[1];
  size_t n = row[2];
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    dst[i] = from_f<T>(src[i]);
}
extern "C" __global__ void cast_concat_bf16(const WordTable table, __nv_bfloat16* out) {
  cast_concat(table, out);
}
extern "C" __global__ void cast_concat_f16(const WordTable table, __half* out) {
  cast_concat(table, out);
}

// partial[(first + blockIdx.y) * gridDim.x + blockIdx.x] = sum of squares of this block's share
// of table row blockIdx.y = (x, n): f32 data of n elements.
extern "C" __global__ void sumsq_partial(const WordTable table, float* __restrict__ partial,
                                         int first) {
  const float* x = reinterpret_cast<const float*>(table.w[2 * blockIdx.y]);
  size_t n = table.w[2 * blockIdx.y + 1];
  float s = 0.f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    float v = x[i];
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[(size_t)(first + blockIdx.y) * gridDim.x + blockIdx.x] = s;
}

// out[0] = sqrt(sumsq[0]) * scale (a gradient norm) and out[1] = the factor clipping it to
// max_norm: max_norm / (norm + 1e-6) where norm > max_norm and is finite, else 1; one thread.
extern "C" __global__ void norm_clip(const float* __restrict__ sumsq, float* __restrict__ out,
                                     float scale, float max_norm) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const float norm = sqrtf(sumsq[0]) * scale;
  out[0] = norm;
  out[1] = norm > max_norm && norm <= 3.402823466e38f ? max_norm / (norm + 1e-6f) : 1.f;
}

// out[0] = sum of x[0..n) in a fixed order; one block.
extern "C" __global__ void sum_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = s;
}
