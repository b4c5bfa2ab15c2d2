// Twilight decode kernels: Quest page scores, top-k page selection (radix select), INT4 estimate,
// top-p by threshold search, GQA union (bitmap + compaction) and split-KV sparse attention with
// an LSE merge. Layouts (all row-major, contiguous):
//   q (b, hq, d); K, V (b, hkv, cap, d); page min/max (b, hkv, pcap, d);
//   INT4 codes (b, hkv, cap, d/2) u8, byte j = channel 2j (low nibble) | channel 2j+1 (high);
//   scale/min (b, hkv, cap, 2) f16; index rows u32 with NO_TOKEN = 0xffffffff padding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"

#define NO_TOKEN 0xffffffffu
#define FULL_MASK 0xffffffffu

// Loads N consecutive elements (16- or 8-byte vectors when the size allows; the caller guarantees
// the matching alignment) and converts them to f32.
template <typename T, int N>
__device__ __forceinline__ void load_f(const T* __restrict__ p, float (&x)[N]) {
  constexpr int BYTES = N * sizeof(T);
  alignas(16) T tmp[N];
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i)
      reinterpret_cast<uint4*>(tmp)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  } else if constexpr (BYTES % 8 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 8; ++i)
      reinterpret_cast<uint2*>(tmp)[i] = __ldg(reinterpret_cast<const uint2*>(p) + i);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) tmp[i] = p[i];
  }
#pragma unroll
  for (int i = 0; i < N; ++i) x[i] = to_f(tmp[i]);
}

// Block-wide sum of an int (every thread gets the total). `red` holds >= 32 ints.
__device__ __forceinline__ int block_sum_int(int v, int* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  int t = lane < nw ? red[lane] : 0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(FULL_MASK, t, o);
  return t;
}

// Block-wide exclusive prefix sum of an int; `*total` gets the sum. `red` holds >= 33 ints.
__device__ __forceinline__ int block_exclusive_scan(int v, int* red, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int y = __shfl_up_sync(FULL_MASK, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) red[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int x = lane < nw ? red[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int y = __shfl_up_sync(FULL_MASK, x, o);
      if (lane >= o) x += y;
    }
    red[lane] = x;  // inclusive prefix over warps
  }
  __syncthreads();
  *total = red[nw - 1];
  return (warp == 0 ? 0 : red[warp - 1]) + incl - v;
}

// Order-preserving map of a float to u32 (NaN maps to the key of -inf: lowest).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = neg_inf();
  uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------
// 1. Quest page scores. Grid (ceil(np / 8), b * hkv), 256 threads: one warp per page, all `group`
// query heads at once (q of the group in dynamic shared memory, group * D floats).
// out (b, hq, np) f32 = sum_d max(q_d * max_d, q_d * min_d).
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ void page_scores(const T* __restrict__ q, const T* __restrict__ pmin,
                            const T* __restrict__ pmax, float* __restrict__ out, int hq, int hkv,
                            int pcap, int np) {
  constexpr int EPL = D / 32;
  extern __shared__ float sq[];
  const int group = hq / hkv, row = blockIdx.y, b = row / hkv, kvh = row % hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* qg = q + ((long long)b * hq + (long long)kvh * group) * D;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) sq[i] = to_f(qg[i]);
  __syncthreads();
  const int page = blockIdx.x * 8 + warp;
  if (page >= np) return;
  const long long off = ((long long)row * pcap + page) * D + lane * EPL;
  float mn[EPL], mx[EPL];
  load_f<T, EPL>(pmin + off, mn);
  load_f<T, EPL>(pmax + off, mx);
  for (int h = 0; h < group; ++h) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      float qc = sq[h * D + lane * EPL + e];
      s += fmaxf(qc * mx[e], qc * mn[e]);
    }
    s = warp_sum(s);
    if (lane == 0) out[((long long)b * hq + (long long)kvh * group + h) * np + page] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Top-k of each row (ties to the lower index), expanded to token ids, ascending. One block of
// 1024 threads per row; the row's order keys in dynamic shared memory (n u32). Radix select of
// the k-th largest key (32 counting passes), then an order-preserving compaction.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(1024)
    tw_top_indices(const float* __restrict__ scores, uint32_t* __restrict__ out, int n, int k,
                   int expand, int valid_len) {
  extern __shared__ uint32_t keys[];
  __shared__ int red[33];
  const long long row = blockIdx.x;
  const float* s = scores + row * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) keys[i] = order_key(s[i]);
  __syncthreads();
  uint32_t tau = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t c = tau | (1u << bit);
    int cnt = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) cnt += keys[i] >= c;
    if (block_sum_int(cnt, red) >= k) tau = c;
  }
  // tau is the k-th largest key: keep every key > tau, and the first (k - #greater) equal ones.
  const int seg = (n + blockDim.x - 1) / blockDim.x;
  const int lo = min(n, (int)threadIdx.x * seg), hi = min(n, lo + seg);
  int gt = 0, eq = 0;
  for (int i = lo; i < hi; ++i) {
    gt += keys[i] > tau;
    eq += keys[i] == tau;
  }
  const int total_gt = block_sum_int(gt, red);
  int total_eq;
  const int eq_before = block_exclusive_scan(eq, red, &total_eq);
  const int ties = k - total_gt;
  const int take_eq = max(0, min(eq, ties - eq_before));
  int total;
  int pos = block_exclusive_scan(gt + take_eq, red, &total);
  int eq_seen = 0;
  uint32_t* o = out + row * (long long)k * expand;
  for (int i = lo; i < hi; ++i) {
    bool keep = keys[i] > tau;
    if (keys[i] == tau) keep = eq_seen++ < take_eq;
    if (keep) {
      for (int j = 0; j < expand; ++j) {
        long long t = (long long)i * expand + j;
        o[(long long)pos * expand + j] = t < valid_len ? (uint32_t)t : NO_TOKEN;
      }
      ++pos;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. INT4 estimate: one thread per candidate. Grid (ceil(n / 256), b * hq), 256 threads.
// est = scale * (s * sum_d q_d code_d + m * sum_d q_d); -inf for padding (id >= len).
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ void estimate(const T* __restrict__ q, const uint8_t* __restrict__ codes,
                         const __half2* __restrict__ scale_min, const uint32_t* __restrict__ cand,
                         float* __restrict__ est, int hq, int hkv, int cap, int len, int n,
                         float scale) {
  __shared__ float sq[D];
  __shared__ float sqsum;
  const int row = blockIdx.y, group = hq / hkv;
  const long long kv_row = ((long long)(row / hq) * hkv + (row % hq) / group) * cap;
  for (int i = threadIdx.x; i < D; i += blockDim.x) sq[i] = to_f(q[(long long)row * D + i]);
  __syncthreads();
  if (threadIdx.x < 32) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < D; i += 32) acc += sq[i];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) sqsum = acc;
  }
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const uint32_t t = cand[(long long)row * n + j];
  float r = neg_inf();
  if (t < (uint32_t)len) {
    const long long tok = kv_row + t;
    const uint4* cp = reinterpret_cast<const uint4*>(codes + tok * (D / 2));
    float dot = 0.f;
#pragma unroll
    for (int v = 0; v < D / 32; ++v) {
      const uint4 w4 = __ldg(cp + v);
      const uint32_t words[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
#pragma unroll
        for (int byte = 0; byte < 4; ++byte) {
          const uint32_t bits = words[w] >> (8 * byte);
          const int c = v * 32 + w * 8 + byte * 2;
          dot += sq[c] * (float)(bits & 15u) + sq[c + 1] * (float)((bits >> 4) & 15u);
        }
      }
    }
    const float2 sm = __half22float2(scale_min[tok]);
    r = scale * (sm.x * dot + sm.y * sqsum);
  }
  est[(long long)row * n + j] = r;
}

// ---------------------------------------------------------------------------------------------
// 4. Top-p: one block of 1024 threads per row; weights in dynamic shared memory (n f32).
// softmax over the finite entries, then the threshold search of `prune.rs` (same arithmetic
// order up to the parallel sums). out = candidate id where kept, NO_TOKEN elsewhere.
// ---------------------------------------------------------------------------------------------
struct Red3 {
  float sum, mn, mx;
};

__device__ __forceinline__ Red3 block_red3(Red3 v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.sum += __shfl_xor_sync(FULL_MASK, v.sum, o);
    v.mn = fminf(v.mn, __shfl_xor_sync(FULL_MASK, v.mn, o));
    v.mx = fmaxf(v.mx, __shfl_xor_sync(FULL_MASK, v.mx, o));
  }
  __syncthreads();
  if (lane == 0) {
    red[3 * warp] = v.sum;
    red[3 * warp + 1] = v.mn;
    red[3 * warp + 2] = v.mx;
  }
  __syncthreads();
  Red3 r{0.f, pos_inf(), neg_inf()};
  if (lane < nw) r = Red3{red[3 * lane], red[3 * lane + 1], red[3 * lane + 2]};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    r.sum += __shfl_xor_sync(FULL_MASK, r.sum, o);
    r.mn = fminf(r.mn, __shfl_xor_sync(FULL_MASK, r.mn, o));
    r.mx = fmaxf(r.mx, __shfl_xor_sync(FULL_MASK, r.mx, o));
  }
  return r;
}

extern "C" __global__ void __launch_bounds__(1024)
    tw_top_p(const float* __restrict__ est, const uint32_t* __restrict__ cand,
             uint32_t* __restrict__ out, int n, float p, float eps, int max_iters) {
  extern __shared__ float w[];
  __shared__ float red[96];
  const long long row = blockIdx.x;
  const float* e = est + row * n;
  const uint32_t* c = cand + row * n;
  uint32_t* o = out + row * n;
  float m = neg_inf();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    w[i] = e[i];
    m = fmaxf(m, w[i]);
  }
  m = block_red3(Red3{0.f, pos_inf(), m}, red).mx;
  if (m == neg_inf()) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = NO_TOKEN;
    return;
  }
  if (p >= 1.f) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] > neg_inf() ? c[i] : NO_TOKEN;
    return;
  }
  float z = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    w[i] = __expf(w[i] - m);
    z += w[i];
  }
  z = block_red3(Red3{z, pos_inf(), neg_inf()}, red).sum;
  float wmax = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    w[i] = w[i] / z;
    wmax = fmaxf(wmax, w[i]);
  }
  float lo = 0.f, hi = block_red3(Red3{0.f, pos_inf(), wmax}, red).mx;  // the real row max
  for (int it = 0; it < max_iters; ++it) {
    const float mid = 0.5f * (lo + hi);
    Red3 v{0.f, hi, lo};
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float x = w[i];
      if (x > mid) v.sum += x;
      if (x > lo) v.mn = fminf(v.mn, x);
      if (x <= hi) v.mx = fmaxf(v.mx, x);
    }
    v = block_red3(v, red);
    if (v.mx - v.mn <= eps || mid <= lo || mid >= hi) break;
    if (v.sum >= p) lo = mid;
    else hi = mid;
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = w[i] > lo ? c[i] : NO_TOKEN;
}

// ---------------------------------------------------------------------------------------------
// 5. GQA union: mark every kept id in a zeroed (b, hkv, len) u8 bitmap, then compact each row in
// ascending order: lists (b, hkv, width) = [count, ids...].
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void tw_union_mark(const uint32_t* __restrict__ kept,
                                         uint8_t* __restrict__ bitmap, long long total, int hq,
                                         int hkv, int n, int len) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const uint32_t t = kept[i];
  if (t >= (uint32_t)len) return;
  const long long r = i / n;  // b * hq + h
  const long long kv_row = (r / hq) * hkv + (r % hq) / (hq / hkv);
  bitmap[kv_row * len + t] = 1;
}

extern "C" __global__ void __launch_bounds__(1024)
    tw_union_compact(const uint8_t* __restrict__ bitmap, uint32_t* __restrict__ lists, int len,
                     int width) {
  __shared__ int red[33];
  const long long row = blockIdx.x;
  const uint8_t* bm = bitmap + row * len;
  uint32_t* l = lists + row * (long long)width;
  int base = 0;
  for (int tile = 0; tile < len; tile += 4 * blockDim.x) {
    const int t0 = tile + 4 * threadIdx.x;
    uint8_t f[4];
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[j] = t0 + j < len ? bm[t0 + j] : 0;
      cnt += f[j];
    }
    int total;
    int pos = base + block_exclusive_scan(cnt, red, &total);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (f[j]) l[1 + pos++] = t0 + j;
    base += total;
  }
  if (threadIdx.x == 0) l[0] = base;
}

// ---------------------------------------------------------------------------------------------
// 6. Sparse attention, split over the KV axis. Grid (nchunks, b * hkv), 4 warps: block x attends
// the group's query heads over list entries [x * CHUNK, (x + 1) * CHUNK) (blocks past the count
// exit), each warp every 4th token, online softmax in f32; the warps are merged in shared memory
// and the block writes unnormalised partial o (b*hq, nchunks, D) and (max, sum) (b*hq, nchunks, 2).
// ---------------------------------------------------------------------------------------------
#define CHUNK 128
#define ATT_WARPS 4
#define MAXG 8

template <typename T, int D>
__device__ void attn_chunk(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const uint32_t* __restrict__ lists,
                           float* __restrict__ part_o, float* __restrict__ part_ml, int hq, int hkv,
                           int cap, int width, int nchunks, float scale) {
  constexpr int EPL = D / 32;
  extern __shared__ float sh[];  // ATT_WARPS * group * (D + 2)
  const int row = blockIdx.y, chunk = blockIdx.x, group = hq / hkv;
  const uint32_t* list = lists + (long long)row * width;
  const int count = min((int)list[0], width - 1);
  const int start = chunk * CHUNK;
  if (start >= count) return;
  const int end = min(count, start + CHUNK);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long q_row0 = (long long)(row / hkv) * hq + (long long)(row % hkv) * group;
  float qr[MAXG][EPL], o[MAXG][EPL], m[MAXG], l[MAXG];
#pragma unroll
  for (int h = 0; h < MAXG; ++h) {
    m[h] = neg_inf();
    l[h] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      o[h][e] = 0.f;
      qr[h][e] = h < group ? to_f(q[(q_row0 + h) * D + lane * EPL + e]) * scale : 0.f;
    }
  }
  const T* kb = k + (long long)row * cap * D + lane * EPL;
  const T* vb = v + (long long)row * cap * D + lane * EPL;
  for (int i = start + warp; i < end; i += ATT_WARPS) {
    const long long t = list[1 + i];
    float kx[EPL], vx[EPL];
    load_f<T, EPL>(kb + t * D, kx);
    load_f<T, EPL>(vb + t * D, vx);
#pragma unroll
    for (int h = 0; h < MAXG; ++h) {
      if (h < group) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) s += qr[h][e] * kx[e];
        s = warp_sum(s);
        const float mn = fmaxf(m[h], s);
        const float alpha = __expf(m[h] - mn), pw = __expf(s - mn);
        l[h] = l[h] * alpha + pw;
#pragma unroll
        for (int e = 0; e < EPL; ++e) o[h][e] = o[h][e] * alpha + pw * vx[e];
        m[h] = mn;
      }
    }
  }
  float* mine = sh + warp * group * (D + 2);
#pragma unroll
  for (int h = 0; h < MAXG; ++h) {
    if (h < group) {
#pragma unroll
      for (int e = 0; e < EPL; ++e) mine[h * (D + 2) + lane * EPL + e] = o[h][e];
      if (lane == 0) {
        mine[h * (D + 2) + D] = m[h];
        mine[h * (D + 2) + D + 1] = l[h];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int h = idx / D, c = idx % D;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, sh[(w * group + h) * (D + 2) + D]);
    float acc = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) {
      const float* s = sh + (w * group + h) * (D + 2);
      const float f = s[D] == neg_inf() ? 0.f : __expf(s[D] - mx);
      acc += f * s[c];
      sum += f * s[D + 1];
    }
    const long long prow = (q_row0 + h) * nchunks + chunk;
    part_o[prow * D + c] = acc;
    if (c == 0) {
      part_ml[2 * prow] = mx;
      part_ml[2 * prow + 1] = sum;
    }
  }
}

// Merge of the chunks: grid b * hq, D threads. out (b, hq, D); zeros for an empty list.
template <typename T>
__device__ void attn_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                           const uint32_t* __restrict__ lists, T* __restrict__ out, int hq,
                           int hkv, int width, int nchunks, int D) {
  const int r = blockIdx.x, c = threadIdx.x;
  const long long kv_row = (long long)(r / hq) * hkv + (r % hq) / (hq / hkv);
  const int count = min((int)lists[kv_row * width], width - 1);
  const int nc = (count + CHUNK - 1) / CHUNK;
  const float* ml = part_ml + (long long)r * nchunks * 2;
  float mx = neg_inf();
  for (int i = 0; i < nc; ++i) mx = fmaxf(mx, ml[2 * i]);
  float acc = 0.f, sum = 0.f;
  for (int i = 0; i < nc; ++i) {
    const float f = __expf(ml[2 * i] - mx);
    acc += f * part_o[((long long)r * nchunks + i) * D + c];
    sum += f * ml[2 * i + 1];
  }
  out[(long long)r * D + c] = from_f<T>(nc == 0 ? 0.f : acc / sum);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: TN in {f32, f16, bf16}, D in {32, 64, 96, 128, 256}.
// ---------------------------------------------------------------------------------------------
#define PER_D(TN, T, D)                                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      tw_page_scores_##TN##_d##D(const T* q, const T* pmin, const T* pmax, float* out, int hq,   \
                                 int hkv, int pcap, int np) {                                    \
    page_scores<T, D>(q, pmin, pmax, out, hq, hkv, pcap, np);                                    \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      tw_estimate_##TN##_d##D(const T* q, const uint8_t* codes, const __half2* scale_min,        \
                              const uint32_t* cand, float* est, int hq, int hkv, int cap,        \
                              int len, int n, float scale) {                                     \
    estimate<T, D>(q, codes, scale_min, cand, est, hq, hkv, cap, len, n, scale);                 \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                   \
      tw_attn_##TN##_d##D(const T* q, const T* k, const T* v, const uint32_t* lists,             \
                          float* part_o, float* part_ml, int hq, int hkv, int cap, int width,    \
                          int nchunks, float scale) {                                            \
    attn_chunk<T, D>(q, k, v, lists, part_o, part_ml, hq, hkv, cap, width, nchunks, scale);      \
  }

#define PER_T(TN, T)                                                                             \
  PER_D(TN, T, 32) PER_D(TN, T, 64) PER_D(TN, T, 96) PER_D(TN, T, 128) PER_D(TN, T, 256)         \
  extern "C" __global__ void tw_merge_##TN(const float* part_o, const float* part_ml,            \
                                           const uint32_t* lists, T* out, int hq, int hkv,       \
                                           int width, int nchunks, int D) {                      \
    attn_merge<T>(part_o, part_ml, lists, out, hq, hkv, width, nchunks, D);                      \
  }

PER_T(f32, float)
PER_T(f16, __half)
PER_T(bf16, __nv_bfloat16)
