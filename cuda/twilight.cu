// Twilight decode kernels: Quest page scores, top-k page selection (radix select), INT4 estimate,
// top-p by threshold search, GQA union (bitmap + compaction) and split-KV sparse attention with
// an LSE merge, plus two fused fast paths used by a decode step: Quest selection (page scores +
// top pages) and the pruner (estimate + top-p + union), one block per (batch, kv head) each.
// Layouts (all row-major, contiguous):
//   q (b, hq, d); K, V (b, hkv, cap, d); page min/max (b, hkv, pcap, d);
//   INT4 codes (b, hkv, cap, d/2) u8, byte j = channel 2j (low nibble) | channel 2j+1 (high);
//   scale/min (b, hkv, cap, 2) f16; index rows u32 with NO_TOKEN = 0xffffffff padding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "scan.cuh"

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

// Order-preserving map of a float to u32 (NaN maps to the key of -inf: lowest).
__device__ __forceinline__ uint32_t order_key(float x) {
  if (x != x) x = neg_inf();
  uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Query heads per KV head the kernels hold in registers (MAX_GROUP in cuda.rs).
#define MAXG 8

// How a D-wide row is split over threads: LPR = D / EPT consecutive lanes per row (a power of
// two <= 32), EPT elements each, EPT at least a 16-byte vector where D allows it.
template <typename T, int D>
struct RowSplit {
  static constexpr int lanes() {
    int l = 32;
    while (l > 1 && (D % l != 0 || D / l < 16 / (int)sizeof(T))) l >>= 1;
    return l;
  }
  static constexpr int LPR = lanes();
  static constexpr int EPT = D / LPR;
};

// Sum over the LPR consecutive lanes of a row (every lane of the warp must call it).
template <int LPR>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int o = LPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
  return x;
}

// ---------------------------------------------------------------------------------------------
// 1. Quest page scores: sum_d max(q_d * max_d, q_d * min_d) for every query head of the group.
// Each page is read by RowSplit::LPR lanes (16-byte loads); `page_bound` is shared by the
// stand-alone kernel and the fused selection (so both give bitwise equal scores).
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ __forceinline__ void page_bound(const float* sq, const T* __restrict__ pmin,
                                           const T* __restrict__ pmax, int row, int pcap,
                                           int page, int np, int group, float (&s)[MAXG]) {
  using S = RowSplit<T, D>;
  const int sub = threadIdx.x % S::LPR;
  float mn[S::EPT], mx[S::EPT];
  if (page < np) {
    const long long off = ((long long)row * pcap + page) * D + sub * S::EPT;
    load_f<T, S::EPT>(pmin + off, mn);
    load_f<T, S::EPT>(pmax + off, mx);
  } else {
#pragma unroll
    for (int e = 0; e < S::EPT; ++e) mn[e] = mx[e] = 0.f;
  }
#pragma unroll
  for (int h = 0; h < MAXG; ++h) {
    s[h] = 0.f;
    if (h < group) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < S::EPT; ++e) {
        const float qc = sq[h * D + sub * S::EPT + e];
        acc += fmaxf(qc * mx[e], qc * mn[e]);
      }
      s[h] = row_sum<S::LPR>(acc);
    }
  }
}

// Grid (ceil(np / (256 / LPR)), b * hkv), 256 threads; q of the group in dynamic shared memory
// (group * D floats). out (b, hq, np) f32.
template <typename T, int D>
__device__ void page_scores(const T* __restrict__ q, const T* __restrict__ pmin,
                            const T* __restrict__ pmax, float* __restrict__ out, int hq, int hkv,
                            int pcap, int np) {
  using S = RowSplit<T, D>;
  extern __shared__ float sq[];
  const int group = hq / hkv, row = blockIdx.y, b = row / hkv, kvh = row % hkv;
  const T* qg = q + ((long long)b * hq + (long long)kvh * group) * D;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) sq[i] = to_f(qg[i]);
  __syncthreads();
  const int page = blockIdx.x * (blockDim.x / S::LPR) + threadIdx.x / S::LPR;
  float s[MAXG];
  page_bound<T, D>(sq, pmin, pmax, row, pcap, page, np, group, s);
  if (page < np && threadIdx.x % S::LPR == 0) {
#pragma unroll
    for (int h = 0; h < MAXG; ++h)
      if (h < group) out[((long long)b * hq + (long long)kvh * group + h) * np + page] = s[h];
  }
}

// ---------------------------------------------------------------------------------------------
// 1+2 fused (the Quest fast path). One block of 1024 threads per (b, kv head): the page scores of
// all `group` query heads into shared memory (as order keys), then per head the k-th largest key
// by a radix select over 8-bit digits (4 histogram passes, all heads at once, warp-aggregated
// shared-memory atomics), then an order-preserving compaction (one warp per head, ballots),
// expanded to token ids like tw_top_indices: out (b, hq, k * expand), ascending, ties to the lower
// page index. The first `sink` and the last `recent` pages score +inf (always kept). Dynamic
// shared memory: group * (D + np + k) words.
// ---------------------------------------------------------------------------------------------
template <typename T, int D>
__device__ void quest_select(const T* __restrict__ q, const T* __restrict__ pmin,
                             const T* __restrict__ pmax, uint32_t* __restrict__ out, int hq,
                             int hkv, int pcap, int np, int k, int expand, int valid_len,
                             int sink, int recent) {
  using S = RowSplit<T, D>;
  extern __shared__ float sh[];
  __shared__ int hist[MAXG * 256];
  __shared__ uint32_t pref[MAXG];
  __shared__ int need[MAXG];
  const int group = hq / hkv, row = blockIdx.x, b = row / hkv, kvh = row % hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long q0 = (long long)b * hq + (long long)kvh * group;
  float* sq = sh;
  uint32_t* keys = reinterpret_cast<uint32_t*>(sh + group * D);
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) sq[i] = to_f(q[q0 * D + i]);
  if (threadIdx.x < group) {
    pref[threadIdx.x] = 0;
    need[threadIdx.x] = k;
  }
  __syncthreads();
  // Scores, two pages per thread in flight.
  const int per_pass = blockDim.x / S::LPR;
  for (int p0 = 0; p0 < np; p0 += 2 * per_pass) {
    const int page0 = p0 + threadIdx.x / S::LPR, page1 = page0 + per_pass;
    float s0[MAXG], s1[MAXG];
    page_bound<T, D>(sq, pmin, pmax, row, pcap, page0, np, group, s0);
    page_bound<T, D>(sq, pmin, pmax, row, pcap, page1, np, group, s1);
    if (threadIdx.x % S::LPR == 0) {
      const bool pin0 = page0 < sink || page0 >= np - recent;
      const bool pin1 = page1 < sink || page1 >= np - recent;
#pragma unroll
      for (int h = 0; h < MAXG; ++h) {
        if (h < group && page0 < np) keys[h * np + page0] = order_key(pin0 ? INFINITY : s0[h]);
        if (h < group && page1 < np) keys[h * np + page1] = order_key(pin1 ? INFINITY : s1[h]);
      }
    }
  }
  // Radix select: pref[h] collects the digits of head h's k-th largest key, need[h] its rank
  // among the keys that share the digits found so far.
  const int total = group * np;
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = threadIdx.x; i < group * 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const uint32_t high = pass == 0 ? 0u : (0xffffffffu << (shift + 8));
    for (int base = threadIdx.x & ~31; base < total; base += blockDim.x) {
      const int i = base + lane;
      int bin = -1;
      if (i < total) {
        const int h = i / np;
        const uint32_t key = keys[i];
        if (((key ^ pref[h]) & high) == 0) bin = h * 256 + (int)((key >> shift) & 255u);
      }
      const unsigned same = __match_any_sync(FULL_MASK, bin);
      if (bin >= 0 && lane == __ffs(same) - 1) atomicAdd(&hist[bin], __popc(same));
    }
    __syncthreads();
    if (warp < group) {
      // Lane l holds digits 255 - 8l .. 248 - 8l (descending); find the digit where the count
      // from the top reaches need.
      const int nd = need[warp];
      __syncwarp();
      int c[8], mine = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = hist[warp * 256 + 255 - 8 * lane - j];
        mine += c[j];
      }
      const int incl = warp_inclusive_scan(mine, lane);
      int run = incl - mine;
      if (run < nd && nd <= incl) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (run + c[j] >= nd) {
            pref[warp] |= (uint32_t)(255 - 8 * lane - j) << shift;
            need[warp] = nd - run;
            break;
          }
          run += c[j];
        }
      }
    }
    __syncthreads();
  }
  // Compaction: every key > tau, and the first need[h] keys equal to tau, in page order, into
  // sel (group * k page ids after the keys); then every thread writes the expanded token ids.
  uint32_t* sel = keys + group * np;
  if (warp < group) {
    const uint32_t tau = pref[warp];
    int take = need[warp];
    int pos = 0;
    for (int base = 0; base < np; base += 32) {
      const int i = base + lane;
      const uint32_t key = i < np ? keys[warp * np + i] : 0u;
      const bool gt = i < np && key > tau, eq = i < np && key == tau;
      const unsigned below = (1u << lane) - 1u;
      const unsigned eqm = __ballot_sync(FULL_MASK, eq);
      const bool keep = gt || (eq && __popc(eqm & below) < take);
      take -= min(take, __popc(eqm));
      const unsigned km = __ballot_sync(FULL_MASK, keep);
      if (keep) sel[warp * k + pos + __popc(km & below)] = (uint32_t)i;
      pos += __popc(km);
    }
  }
  __syncthreads();
  const int per_head = k * expand;
  for (int idx = threadIdx.x; idx < group * per_head; idx += blockDim.x) {
    const int h = idx / per_head, r = idx - h * per_head;
    const long long t = (long long)sel[h * k + r / expand] * expand + r % expand;
    out[(q0 + h) * per_head + r] = t < valid_len ? (uint32_t)t : NO_TOKEN;
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
  __shared__ int red[32];
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
  const int eq_before = block_exclusive_scan(eq, &total_eq);
  const int ties = k - total_gt;
  const int take_eq = max(0, min(eq, ties - eq_before));
  int total;
  int pos = block_exclusive_scan(gt + take_eq, &total);
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

// sum_d q_d * code_d over one token's packed INT4 codes (D / 2 bytes, 16-byte aligned).
template <int D>
__device__ __forceinline__ float int4_dot(const float* sq, const uint8_t* __restrict__ codes) {
  const uint4* cp = reinterpret_cast<const uint4*>(codes);
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
  return dot;
}

// sum_d q_d of a query row in shared memory, by one warp (the same order in every kernel).
template <int D>
__device__ __forceinline__ float warp_row_sum(const float* sq) {
  float acc = 0.f;
  for (int i = threadIdx.x & 31; i < D; i += 32) acc += sq[i];
  return warp_sum(acc);
}

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
    const float acc = warp_row_sum<D>(sq);
    if (threadIdx.x == 0) sqsum = acc;
  }
  __syncthreads();
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const uint32_t t = cand[(long long)row * n + j];
  float r = neg_inf();
  if (t < (uint32_t)len) {
    const long long tok = kv_row + t;
    const float dot = int4_dot<D>(sq, codes + tok * (D / 2));
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
    int pos = base + block_exclusive_scan(cnt, &total);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (f[j]) l[1 + pos++] = t0 + j;
    base += total;
  }
  if (threadIdx.x == 0) l[0] = base;
}

// ---------------------------------------------------------------------------------------------
// 3+4+5 fused (the pruner's fast path). One block of 1024 threads per (b, kv head) and its
// `group` query heads' candidate rows (n each): the INT4 estimate of every candidate into
// shared memory, then per head (its own 32 / group warps) the softmax and the top-p threshold
// search of tw_top_p (all heads in lock step, each stopping on its own criterion), the kept ids
// (b, hq, n) written like tw_top_p, and the GQA union marked in a shared bitmap of `len` bits and
// compacted in ascending order: lists (b, hkv, width) = [count, ids...]. p >= 1 keeps every
// finite candidate. Dynamic shared memory: group * (D + n) + ceil(len / 32) words.
// ---------------------------------------------------------------------------------------------

// (sum, min, max) over the threads of each head: head h owns warps [h * wph, (h + 1) * wph).
// One __syncthreads; `red` (32 x 3 floats) must not be reused before the next barrier.
__device__ __forceinline__ Red3 head_red3(Red3 v, float (*red)[3], int wph) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.sum += __shfl_xor_sync(FULL_MASK, v.sum, o);
    v.mn = fminf(v.mn, __shfl_xor_sync(FULL_MASK, v.mn, o));
    v.mx = fmaxf(v.mx, __shfl_xor_sync(FULL_MASK, v.mx, o));
  }
  if (lane == 0) {
    red[warp][0] = v.sum;
    red[warp][1] = v.mn;
    red[warp][2] = v.mx;
  }
  __syncthreads();
  const int first = (warp / wph) * wph;
  Red3 r{0.f, pos_inf(), neg_inf()};
  if (lane < wph && first + lane < 32) r = Red3{red[first + lane][0], red[first + lane][1], red[first + lane][2]};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    r.sum += __shfl_xor_sync(FULL_MASK, r.sum, o);
    r.mn = fminf(r.mn, __shfl_xor_sync(FULL_MASK, r.mn, o));
    r.mx = fmaxf(r.mx, __shfl_xor_sync(FULL_MASK, r.mx, o));
  }
  return r;
}

template <typename T, int D>
__device__ void prune_union(const T* __restrict__ q, const uint8_t* __restrict__ codes,
                            const __half2* __restrict__ scale_min,
                            const uint32_t* __restrict__ cand, uint32_t* __restrict__ kept,
                            uint32_t* __restrict__ lists, int hq, int hkv, int cap, int len, int n,
                            int width, float scale, float p, float eps, int max_iters) {
  extern __shared__ float sh[];
  __shared__ float sqsum[MAXG];
  __shared__ float red[2][32][3];
  const int group = hq / hkv, row = blockIdx.x, b = row / hkv, kvh = row % hkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long long q0 = (long long)b * hq + (long long)kvh * group;
  const long long kv_base = (long long)row * cap;
  const int nwords = (len + 31) / 32;
  float* sq = sh;
  float* w = sq + group * D;
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(w + group * n);
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) sq[i] = to_f(q[q0 * D + i]);
  for (int i = threadIdx.x; i < nwords; i += blockDim.x) bitmap[i] = 0u;
  __syncthreads();
  if (warp < group) {
    const float acc = warp_row_sum<D>(sq + warp * D);
    if (lane == 0) sqsum[warp] = acc;
  }
  __syncthreads();
  // Estimates of the group's rows (contiguous: row h of the group at crow + h * n).
  const uint32_t* crow = cand + q0 * n;
#pragma unroll 4
  for (int i = threadIdx.x; i < group * n; i += blockDim.x) {
    const int h = i / n;
    const uint32_t t = crow[i];
    float r = neg_inf();
    if (t < (uint32_t)len) {
      const long long tok = kv_base + t;
      const float dot = int4_dot<D>(sq + h * D, codes + tok * (D / 2));
      const float2 sm = __half22float2(scale_min[tok]);
      r = scale * (sm.x * dot + sm.y * sqsum[h]);
    }
    w[i] = r;
  }
  __syncthreads();
  // Threads of head hh: warps [hh * wph, (hh + 1) * wph); warps past group * wph only take part
  // in the barriers.
  const int wph = (blockDim.x >> 5) / group, tph = wph * 32;
  const int hh = warp / wph, ht = threadIdx.x - hh * tph;
  const bool in_head = hh < group;
  float* wr = w + (in_head ? hh : 0) * n;
  float lo = 0.f, m = neg_inf();
  if (p < 1.f) {
    for (int j = ht; in_head && j < n; j += tph) m = fmaxf(m, wr[j]);
    m = head_red3(Red3{0.f, pos_inf(), m}, red[0], wph).mx;
    float z = 0.f;
    for (int j = ht; in_head && m > neg_inf() && j < n; j += tph) {
      const float e = __expf(wr[j] - m);
      wr[j] = e;
      z += e;
    }
    z = head_red3(Red3{z, pos_inf(), neg_inf()}, red[1], wph).sum;
    float wmax = 0.f;
    for (int j = ht; in_head && m > neg_inf() && j < n; j += tph) {
      const float x = wr[j] / z;
      wr[j] = x;
      wmax = fmaxf(wmax, x);
    }
    float hi = head_red3(Red3{0.f, pos_inf(), wmax}, red[0], wph).mx;  // the real row max
    bool active = in_head && m > neg_inf();
    int buf = 1;
    for (int it = 0; it < max_iters; ++it) {
      if (!__syncthreads_or(active)) break;
      const float mid = 0.5f * (lo + hi);
      Red3 v{0.f, hi, lo};
      for (int j = ht; active && j < n; j += tph) {
        const float x = wr[j];
        if (x > mid) v.sum += x;
        if (x > lo) v.mn = fminf(v.mn, x);
        if (x <= hi) v.mx = fmaxf(v.mx, x);
      }
      v = head_red3(v, red[buf], wph);
      buf ^= 1;
      if (active) {
        if (v.mx - v.mn <= eps || mid <= lo || mid >= hi) active = false;
        else if (v.sum >= p) lo = mid;
        else hi = mid;
      }
    }
  }
  if (in_head) {
    const uint32_t* cr = crow + (long long)hh * n;
    uint32_t* kr = kept + (q0 + hh) * n;
    for (int j = ht; j < n; j += tph) {
      const uint32_t t = cr[j];
      const bool keep = p >= 1.f ? wr[j] > neg_inf() : (m > neg_inf() && wr[j] > lo);
      kr[j] = keep ? t : NO_TOKEN;
      if (keep && t < (uint32_t)len) atomicOr(&bitmap[t >> 5], 1u << (t & 31));
    }
  }
  __syncthreads();
  // Compaction: thread-contiguous words of the bitmap, ascending.
  const int per = (nwords + blockDim.x - 1) / blockDim.x;
  const int w0 = min(nwords, (int)threadIdx.x * per), w1 = min(nwords, w0 + per);
  int cnt = 0;
  for (int i = w0; i < w1; ++i) cnt += __popc(bitmap[i]);
  int count;
  int pos = block_exclusive_scan(cnt, &count);
  uint32_t* l = lists + (long long)row * width;
  for (int i = w0; i < w1; ++i) {
    uint32_t bits = bitmap[i];
    while (bits) {
      const int bit = __ffs(bits) - 1;
      bits &= bits - 1u;
      l[1 + pos++] = (uint32_t)(i * 32 + bit);
    }
  }
  if (threadIdx.x == 0) l[0] = (uint32_t)count;
}

// ---------------------------------------------------------------------------------------------
// 6. Sparse attention, split over the KV axis. Grid (min(nchunks, ATT_MAX_BLOCKS), b * hkv),
// 4 warps: block x attends the group's query heads over the list chunks x, x + gridDim.x, ...
// (entries [c * CHUNK, (c + 1) * CHUNK) below the count). A token's row is read by
// RowSplit::LPR lanes (16-byte loads), so a warp holds 32 / LPR tokens at a time, two steps in
// flight; online softmax in f32 per lane group, merged over the warp by shuffles and over the
// warps in shared memory. The block writes unnormalised partial o (b*hq, nchunks, D) and
// (max, sum) (b*hq, nchunks, 2). G (1, 2, 4 or 8, at least the group) bounds the query heads
// held in registers, so that small groups keep the occupancy high.
// ---------------------------------------------------------------------------------------------
#define CHUNK 64
#define ATT_WARPS 4
#define ATT_MAX_BLOCKS 16

// One token's online-softmax update of every query head of the group (`valid` false: the row
// only takes part in the shuffles).
template <int EPT, int LPR, int G>
__device__ __forceinline__ void attn_update(const float (&qr)[G][EPT], const float (&kx)[EPT],
                                            const float (&vx)[EPT], bool valid, int group,
                                            float (&o)[G][EPT], float (&m)[G], float (&l)[G]) {
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < group) {
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) s += qr[h][e] * kx[e];
      s = row_sum<LPR>(s);
      if (valid) {
        const float mn = fmaxf(m[h], s);
        const float alpha = __expf(m[h] - mn), pw = __expf(s - mn);
        l[h] = l[h] * alpha + pw;
#pragma unroll
        for (int e = 0; e < EPT; ++e) o[h][e] = o[h][e] * alpha + pw * vx[e];
        m[h] = mn;
      }
    }
  }
}

template <typename T, int D, int G>
__device__ void attn_chunk(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const uint32_t* __restrict__ lists,
                           float* __restrict__ part_o, float* __restrict__ part_ml, int hq, int hkv,
                           int cap, int width, int nchunks, float scale) {
  using S = RowSplit<T, D>;
  constexpr int EPT = S::EPT, LPR = S::LPR, TPW = 32 / LPR, STEP = ATT_WARPS * TPW;
  extern __shared__ float sh[];  // ATT_WARPS * group * (D + 2)
  const int row = blockIdx.y, group = hq / hkv;
  const uint32_t* list = lists + (long long)row * width;
  const int count = min((int)list[0], width - 1);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % LPR, slot = lane / LPR;
  const long long q_row0 = (long long)(row / hkv) * hq + (long long)(row % hkv) * group;
  float qr[G][EPT];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (h < group) {
      load_f<T, EPT>(q + (q_row0 + h) * D + sub * EPT, qr[h]);
#pragma unroll
      for (int e = 0; e < EPT; ++e) qr[h][e] *= scale;
    } else {
#pragma unroll
      for (int e = 0; e < EPT; ++e) qr[h][e] = 0.f;
    }
  }
  const T* kb = k + (long long)row * cap * D + sub * EPT;
  const T* vb = v + (long long)row * cap * D + sub * EPT;
  for (int chunk = blockIdx.x; chunk * CHUNK < count; chunk += gridDim.x) {
    const int start = chunk * CHUNK, end = min(count, start + CHUNK);
    float o[G][EPT], m[G], l[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      m[h] = neg_inf();
      l[h] = 0.f;
#pragma unroll
      for (int e = 0; e < EPT; ++e) o[h][e] = 0.f;
    }
    for (int base = start + warp * TPW; base < end; base += 2 * STEP) {
      const int i0 = base + slot, i1 = i0 + STEP;
      const long long t0 = list[1 + min(i0, end - 1)], t1 = list[1 + min(i1, end - 1)];
      float k0[EPT], v0[EPT], k1[EPT], v1[EPT];
      load_f<T, EPT>(kb + t0 * D, k0);
      load_f<T, EPT>(vb + t0 * D, v0);
      load_f<T, EPT>(kb + t1 * D, k1);
      load_f<T, EPT>(vb + t1 * D, v1);
      attn_update<EPT, LPR, G>(qr, k0, v0, i0 < end, group, o, m, l);
      attn_update<EPT, LPR, G>(qr, k1, v1, i1 < end, group, o, m, l);
    }
    // Merge the TPW token slots of the warp (lanes sub, sub + LPR, ... hold the same channels).
#pragma unroll
    for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
      for (int h = 0; h < G; ++h) {
        if (h < group) {
          const float mo = __shfl_xor_sync(FULL_MASK, m[h], off);
          const float lo = __shfl_xor_sync(FULL_MASK, l[h], off);
          const float mx = fmaxf(m[h], mo);
          const float f1 = m[h] == neg_inf() ? 0.f : __expf(m[h] - mx);
          const float f2 = mo == neg_inf() ? 0.f : __expf(mo - mx);
          l[h] = l[h] * f1 + lo * f2;
#pragma unroll
          for (int e = 0; e < EPT; ++e) {
            const float oo = __shfl_xor_sync(FULL_MASK, o[h][e], off);
            o[h][e] = o[h][e] * f1 + oo * f2;
          }
          m[h] = mx;
        }
      }
    }
    float* mine = sh + warp * group * (D + 2);
    if (slot == 0) {
#pragma unroll
      for (int h = 0; h < G; ++h) {
        if (h < group) {
#pragma unroll
          for (int e = 0; e < EPT; ++e) mine[h * (D + 2) + sub * EPT + e] = o[h][e];
          if (sub == 0) {
            mine[h * (D + 2) + D] = m[h];
            mine[h * (D + 2) + D + 1] = l[h];
          }
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
    __syncthreads();
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
#define PER_G(TN, T, D, G)                                                                       \
  extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)                                   \
      tw_attn_##TN##_d##D##_g##G(const T* q, const T* k, const T* v, const uint32_t* lists,      \
                                 float* part_o, float* part_ml, int hq, int hkv, int cap,        \
                                 int width, int nchunks, float scale) {                          \
    attn_chunk<T, D, G>(q, k, v, lists, part_o, part_ml, hq, hkv, cap, width, nchunks, scale);   \
  }

#define PER_D(TN, T, D)                                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      tw_page_scores_##TN##_d##D(const T* q, const T* pmin, const T* pmax, float* out, int hq,   \
                                 int hkv, int pcap, int np) {                                    \
    page_scores<T, D>(q, pmin, pmax, out, hq, hkv, pcap, np);                                    \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                             \
      tw_quest_select_##TN##_d##D(const T* q, const T* pmin, const T* pmax, uint32_t* out,       \
                                  int hq, int hkv, int pcap, int np, int k, int expand,          \
                                  int valid_len, int sink, int recent) {                         \
    quest_select<T, D>(q, pmin, pmax, out, hq, hkv, pcap, np, k, expand, valid_len, sink,        \
                       recent);                                                                  \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(1024)                                             \
      tw_prune_union_##TN##_d##D(const T* q, const uint8_t* codes, const __half2* scale_min,     \
                                 const uint32_t* cand, uint32_t* kept, uint32_t* lists, int hq,  \
                                 int hkv, int cap, int len, int n, int width, float scale,       \
                                 float p, float eps, int max_iters) {                            \
    prune_union<T, D>(q, codes, scale_min, cand, kept, lists, hq, hkv, cap, len, n, width,       \
                      scale, p, eps, max_iters);                                                 \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(256)                                              \
      tw_estimate_##TN##_d##D(const T* q, const uint8_t* codes, const __half2* scale_min,        \
                              const uint32_t* cand, float* est, int hq, int hkv, int cap,        \
                              int len, int n, float scale) {                                     \
    estimate<T, D>(q, codes, scale_min, cand, est, hq, hkv, cap, len, n, scale);                 \
  }                                                                                              \
  PER_G(TN, T, D, 1) PER_G(TN, T, D, 2) PER_G(TN, T, D, 4) PER_G(TN, T, D, 8)

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
