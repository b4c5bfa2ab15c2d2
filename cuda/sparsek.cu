// SparseK attention kernels (see src/sparsek/cuda.rs for the launch side and the design).
//
// Selection: per (batch, kv head) row of scores u[T]:
// - sk_block_lists: one CTA per row; for every block c of BQ queries, the top-`cap` keys of the
//   prefix [0, e_c), e_c = max(0, c*BQ - window), by (u, j) descending, built by merging sorted
//   lists block after block (O(T * cap / BQ) work per row, no O(T^2)).
// - sk_select: per query, the union of its block's list and the <= BQ newer candidates, cut to the
//   top-`cap` (cut = the cap-th largest key), then tau by bisection polished with the closed form.
// Attention (one warp per query row, f32 math; keys 32 at a time: lane-per-key scores, then lanes
// own head_dim / 32 contiguous dims for the weighted sums):
// - sk_fwd: window keys (weight 1) + the block list scanned until the first key with p = 0 (the
//   list is sorted, so the rest has p = 0) + the newer candidates.
// - sk_bwd_dq: dq per row plus delta = dO.O, r = sum_S g_w and |S| per row.
// - sk_bwd_dkv: one warp per key: tau_i and cut_i are non-decreasing in i, so the queries that
//   attend key j form the interval [j, e_j) (window then selected), taken 32 queries at a time;
//   dk, dv and du accumulate in registers: no atomics, deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define BQ 64

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Key order: (u, j) descending; equal scores: the newer key ranks higher.
__device__ __forceinline__ bool gt(float ua, int ja, float ub, int jb) {
  return ua > ub || (ua == ub && ja > jb);
}
// Number of entries of a descending list that rank above (u, j).
__device__ __forceinline__ int count_gt(const float* lu, const int* lj, int n, float u, int j) {
  int lo = 0, hi = n;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (gt(lu[mid], lj[mid], u, j)) lo = mid + 1; else hi = mid;
  }
  return lo;
}
// Whether key (u, j) is in the top-cap set whose smallest key is (cu, cj); cj < 0: no cut.
__device__ __forceinline__ bool in_top(float u, int j, float cu, int cj) {
  return cj < 0 || !gt(cu, cj, u, j);
}

__device__ __forceinline__ int block_start(int c, int window) { return max(0, c * BQ - window); }

// ---------------------------------------------------------------------------------------------
// SPARSEK projection of rows of length m (one warp per row): bisection + closed-form polish.
extern "C" __global__ void sk_project_f32(const float* __restrict__ z, float* __restrict__ p,
                                          long long rows, int m, float k) {
  long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const float* zr = z + row * m;
  float* pr = p + row * m;
  if ((float)m <= k) {
    for (int t = lane; t < m; t += 32) pr[t] = 1.f;
    return;
  }
  float mx = neg_inf(), mn = __int_as_float(0x7f800000);
  for (int t = lane; t < m; t += 32) { mx = fmaxf(mx, zr[t]); mn = fminf(mn, zr[t]); }
  mx = warp_max(mx);
  mn = -warp_max(-mn);
  float lo = mn - mx - 1.f, hi = 0.f;  // centred: z - mx
  for (int it = 0; it < 40; ++it) {
    float mid = 0.5f * (lo + hi), f = 0.f;
    for (int t = lane; t < m; t += 32) f += fminf(fmaxf(zr[t] - mx - mid, 0.f), 1.f);
    f = warp_sum(f);
    if (f >= k) lo = mid; else hi = mid;
  }
  float t0 = 0.5f * (lo + hi), ssum = 0.f, ns = 0.f, nu = 0.f;
  for (int t = lane; t < m; t += 32) {
    float x = zr[t] - mx;
    if (x >= t0 + 1.f) nu += 1.f; else if (x > t0) { ns += 1.f; ssum += x; }
  }
  ssum = warp_sum(ssum); ns = warp_sum(ns); nu = warp_sum(nu);
  float tau = ns > 0.f ? (ssum + nu - k) / ns : t0;
  for (int t = lane; t < m; t += 32) pr[t] = fminf(fmaxf(zr[t] - mx - tau, 0.f), 1.f);
}

// ---------------------------------------------------------------------------------------------
// Per-block top-cap lists of the prefix: out lists (rows, nb, cap), padding u = -inf, j = -1.
// One CTA per row; dynamic smem: 2 * cap * 8 + 2 * BQ * 8 bytes.
extern "C" __global__ void sk_block_lists(const float* __restrict__ u, float* __restrict__ lu_out,
                                          int* __restrict__ lj_out, int T, int window, int cap,
                                          int nb) {
  extern __shared__ unsigned char smem[];
  float* au = (float*)smem;
  int* aj = (int*)(au + cap);
  float* bu = (float*)(aj + cap);
  int* bj = (int*)(bu + cap);
  float* cu = (float*)(bj + cap);
  int* cj = (int*)(cu + BQ);
  float* su = (float*)(cj + BQ);
  int* sj = (int*)(su + BQ);
  const int row = blockIdx.x, tid = threadIdx.x, bs = blockDim.x;
  const float* ur = u + (long long)row * T;
  int len = 0;
  for (int c = 0; c < nb; ++c) {
    long long base = ((long long)row * nb + c) * cap;
    for (int r = tid; r < cap; r += bs) {
      lu_out[base + r] = r < len ? au[r] : neg_inf();
      lj_out[base + r] = r < len ? aj[r] : -1;
    }
    int e0 = min(T, block_start(c, window)), e1 = min(T, block_start(c + 1, window));
    int n = e1 - e0;
    if (n <= 0 || c + 1 == nb) continue;
    if (tid < n) { cu[tid] = ur[e0 + tid] + 0.f; cj[tid] = e0 + tid; }
    __syncthreads();
    if (tid < n) {
      int rank = 0;
      for (int s = 0; s < n; ++s) rank += gt(cu[s], cj[s], cu[tid], cj[tid]);
      su[rank] = cu[tid];
      sj[rank] = cj[tid];
    }
    __syncthreads();
    for (int r = tid; r < len; r += bs) {
      int pos = r + count_gt(su, sj, n, au[r], aj[r]);
      if (pos < cap) { bu[pos] = au[r]; bj[pos] = aj[r]; }
    }
    for (int s = tid; s < n; s += bs) {
      int pos = s + count_gt(au, aj, len, su[s], sj[s]);
      if (pos < cap) { bu[pos] = su[s]; bj[pos] = sj[s]; }
    }
    __syncthreads();
    len = min(cap, len + n);
    float* tu = au; au = bu; bu = tu;
    int* tj = aj; aj = bj; bj = tj;
  }
}

// ---------------------------------------------------------------------------------------------
// Per query: cut (the cap-th largest candidate key, or j = -1) and tau (-inf when <= k kept).
// Grid (nb, rows), 8 warps; dynamic smem: (cap + BQ) * 8 bytes.
extern "C" __global__ void sk_select(const float* __restrict__ u, const float* __restrict__ lu,
                                     const int* __restrict__ lj, float* __restrict__ tau_out,
                                     float* __restrict__ cut_u_out, int* __restrict__ cut_j_out,
                                     int T, int window, int cap, float k, int nb) {
  extern __shared__ unsigned char smem[];
  float* Lu = (float*)smem;
  int* Lj = (int*)(Lu + cap);
  float* Eu = (float*)(Lj + cap);
  int* Ej = (int*)(Eu + BQ);
  __shared__ int s_len;
  const int c = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid & 31, nwarps = blockDim.x / 32;
  if (tid == 0) s_len = 0;
  __syncthreads();
  long long base = ((long long)row * nb + c) * cap;
  int cnt = 0;
  for (int r = tid; r < cap; r += blockDim.x) {
    Lu[r] = lu[base + r];
    Lj[r] = lj[base + r];
    cnt += Lj[r] >= 0;
  }
  atomicAdd(&s_len, cnt);
  const int e0 = min(T, block_start(c, window));
  const int eend = min(T, max(e0, c * BQ + BQ - window));
  const int nE = eend - e0;
  const float* ur = u + (long long)row * T;
  if (tid < nE) { Eu[tid] = ur[e0 + tid] + 0.f; Ej[tid] = e0 + tid; }
  __syncthreads();
  const int len = s_len;
  for (int qi = warp; qi < BQ; qi += nwarps) {
    int i = c * BQ + qi;
    if (i >= T) break;
    int n_ext = min(nE, max(0, i - window + 1 - e0));
    int total = len + n_ext;
    float cut_u = neg_inf();
    int cut_j = -1;
    if (total > cap) {
      // Find the element of rank cap - 1 among the extras and the tail of the list.
      int found = -1;  // encoded: s (extra) or n_ext + r (list)
      for (int s = lane; s < n_ext; s += 32) {
        int rank = count_gt(Lu, Lj, len, Eu[s], Ej[s]);
        for (int t = 0; t < n_ext; ++t) rank += gt(Eu[t], Ej[t], Eu[s], Ej[s]);
        if (rank == cap - 1) found = s;
      }
      for (int r = max(0, cap - 1 - n_ext) + lane; r < len; r += 32) {
        int rank = r;
        for (int t = 0; t < n_ext; ++t) rank += gt(Eu[t], Ej[t], Lu[r], Lj[r]);
        if (rank == cap - 1) found = n_ext + r;
      }
      unsigned ball = __ballot_sync(0xffffffffu, found >= 0);
      int src = __ffs(ball) - 1;
      found = __shfl_sync(0xffffffffu, found, src < 0 ? 0 : src);
      if (src >= 0) {
        if (found < n_ext) { cut_u = Eu[found]; cut_j = Ej[found]; }
        else { cut_u = Lu[found - n_ext]; cut_j = Lj[found - n_ext]; }
      }
    }
    int m = min(total, cap);
    float tau = neg_inf();
    if ((float)m > k) {
      float mx = neg_inf(), mn = __int_as_float(0x7f800000);
      for (int r = lane; r < len; r += 32)
        if (in_top(Lu[r], Lj[r], cut_u, cut_j)) { mx = fmaxf(mx, Lu[r]); mn = fminf(mn, Lu[r]); }
      for (int s = lane; s < n_ext; s += 32)
        if (in_top(Eu[s], Ej[s], cut_u, cut_j)) { mx = fmaxf(mx, Eu[s]); mn = fminf(mn, Eu[s]); }
      mx = warp_max(mx);
      mn = -warp_max(-mn);
      float lo = mn - mx - 1.f, hi = 0.f;
      for (int it = 0; it < 36; ++it) {
        float mid = 0.5f * (lo + hi), f = 0.f;
        for (int r = lane; r < len; r += 32)
          if (in_top(Lu[r], Lj[r], cut_u, cut_j)) f += fminf(fmaxf(Lu[r] - mx - mid, 0.f), 1.f);
        for (int s = lane; s < n_ext; s += 32)
          if (in_top(Eu[s], Ej[s], cut_u, cut_j)) f += fminf(fmaxf(Eu[s] - mx - mid, 0.f), 1.f);
        f = warp_sum(f);
        if (f >= k) lo = mid; else hi = mid;
      }
      float t0 = 0.5f * (lo + hi), ssum = 0.f, ns = 0.f, nu = 0.f;
      for (int r = lane; r < len + n_ext; r += 32) {
        float x = r < len ? Lu[r] : Eu[r - len];
        int j = r < len ? Lj[r] : Ej[r - len];
        if (!in_top(x, j, cut_u, cut_j)) continue;
        x -= mx;
        if (x >= t0 + 1.f) nu += 1.f; else if (x > t0) { ns += 1.f; ssum += x; }
      }
      ssum = warp_sum(ssum); ns = warp_sum(ns); nu = warp_sum(nu);
      tau = (ns > 0.f ? (ssum + nu - k) / ns : t0) + mx;
    }
    if (lane == 0) {
      long long o = (long long)row * T + i;
      tau_out[o] = tau;
      cut_u_out[o] = cut_u;
      cut_j_out[o] = cut_j;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention. Shared argument list and per-row helpers.
#define SK_PARAMS                                                                               \
  const float *__restrict__ u, const float *__restrict__ lu, const int *__restrict__ lj,       \
      const float *__restrict__ tau, const float *__restrict__ cut_u,                          \
      const int *__restrict__ cut_j, int B, int Hq, int Hkv, int T, int window, int cap, int nb, \
      float scale

#define FULL 0xffffffffu
#define WARPS 8

// Dot product of an f32 vector in shared memory with a row of D elements (16-byte vector loads
// when the row is aligned).
template <typename E, int D>
__device__ __forceinline__ float dot_row(const float* __restrict__ xs, const E* __restrict__ row) {
  float s = 0.f;
  if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
    constexpr int V = 16 / sizeof(E);
    const uint4* r4 = reinterpret_cast<const uint4*>(row);
#pragma unroll
    for (int c = 0; c < D / V; ++c) {
      uint4 x = r4[c];
      const E* e = reinterpret_cast<const E*>(&x);
#pragma unroll
      for (int v = 0; v < V; ++v) s += xs[c * V + v] * to_f(e[v]);
    }
  } else {
#pragma unroll 8
    for (int d = 0; d < D; ++d) s += xs[d] * to_f(row[d]);
  }
  return s;
}

// Enumerates the keys query i attends to, 32 at a time (lane-parallel): f(ok, j, w) is called by
// the whole warp per chunk, lane t holding candidate t (ok = attended, weight w).
template <typename F>
__device__ __forceinline__ void for_each_key_chunk(int i, int bhk, const float* u, const float* lu,
                                                   const int* lj, float tau_i, float cu, int cj,
                                                   int T, int window, int cap, int nb, int lane,
                                                   F&& f) {
  if (window > 0) {
    for (int j0 = max(0, i - window + 1); j0 <= i; j0 += 32) {
      int j = j0 + lane;
      bool ok = j <= i;
      f(ok, ok ? j : 0, 1.f);
    }
  }
  int c = i / BQ;
  const float* lur = lu + ((long long)bhk * nb + c) * cap;
  const int* ljr = lj + ((long long)bhk * nb + c) * cap;
  for (int r0 = 0; r0 < cap; r0 += 32) {
    int r = r0 + lane;
    float uj = r < cap ? lur[r] : neg_inf();
    int j = r < cap ? ljr[r] : -1;
    bool ok = j >= 0 && in_top(uj, j, cu, cj) && uj > tau_i;
    unsigned ball = __ballot_sync(FULL, ok);
    if (ball == 0) break;
    f(ok, ok ? j : 0, ok ? fminf(uj - tau_i, 1.f) : 0.f);
    if (ball != FULL) break;  // sorted list: the first key with p = 0 ends it
  }
  const float* ur = u + (long long)bhk * T;
  for (int j0 = min(T, block_start(c, window)); j0 <= i - window; j0 += 32) {
    int j = j0 + lane;
    float uj = j <= i - window ? ur[j] + 0.f : neg_inf();
    bool ok = j <= i - window && in_top(uj, j, cu, cj) && uj > tau_i;
    f(ok, ok ? j : 0, ok ? fminf(uj - tau_i, 1.f) : 0.f);
  }
}

// Forward: one warp per query row. Per chunk of 32 keys: lane-per-key scores, one online-softmax
// update, then lanes own head dims for P.V.
template <typename E, int D>
__device__ void sk_fwd(const E* __restrict__ q, const E* __restrict__ kv, E* __restrict__ out,
                       float* __restrict__ lse, SK_PARAMS) {
  constexpr int P = D / 32;
  __shared__ float qs_all[WARPS][D];
  int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  long long rowq = (long long)blockIdx.x * WARPS + warp;
  if (rowq >= (long long)B * Hq * T) return;
  int i = rowq % T;
  long long bh = rowq / T;
  int b = bh / Hq, h = bh % Hq;
  int bhk = b * Hkv + h / (Hq / Hkv);
  float* qs = qs_all[warp];
  float acc[P];
#pragma unroll
  for (int t = 0; t < P; ++t) {
    qs[lane * P + t] = to_f(q[rowq * D + lane * P + t]) * scale;
    acc[t] = 0.f;
  }
  __syncwarp();
  long long ti = (long long)bhk * T + i;
  float m = neg_inf(), l = 0.f;
  const E* kvr = kv + (long long)bhk * T * 2 * D;
  for_each_key_chunk(i, bhk, u, lu, lj, tau[ti], cut_u[ti], cut_j[ti], T, window, cap, nb, lane,
                     [&](bool ok, int j, float w) {
                       float s = ok ? dot_row<E, D>(qs, kvr + (long long)j * 2 * D) : neg_inf();
                       float mb = warp_max(s);
                       if (mb == neg_inf()) return;
                       float mn = fmaxf(m, mb), corr = __expf(m - mn);
                       float e = ok ? __expf(s - mn) : 0.f;
                       l = l * corr + warp_sum(e);
                       m = mn;
                       float pw = e * w;
#pragma unroll
                       for (int t = 0; t < P; ++t) acc[t] *= corr;
#pragma unroll 4
                       for (int t = 0; t < 32; ++t) {
                         float pt = __shfl_sync(FULL, pw, t);
                         int jt = __shfl_sync(FULL, j, t);
                         if (pt != 0.f) {
                           const E* vr = kvr + (long long)jt * 2 * D + D + lane * P;
#pragma unroll
                           for (int d = 0; d < P; ++d) acc[d] += pt * to_f(vr[d]);
                         }
                       }
                     });
  float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int t = 0; t < P; ++t) out[rowq * D + lane * P + t] = from_f<E>(acc[t] * inv);
  if (lane == 0) lse[rowq] = l > 0.f ? m + __logf(l) : neg_inf();
}

// dq (f32, scaled) per query row, plus delta = dO.O, r = sum over S of g_w and |S|.
template <typename E, int D>
__device__ void sk_bwd_dq(const E* __restrict__ q, const E* __restrict__ kv,
                          const E* __restrict__ o, const E* __restrict__ go,
                          const float* __restrict__ lse, float* __restrict__ dq,
                          float* __restrict__ delta, float* __restrict__ rsum,
                          float* __restrict__ nsup, SK_PARAMS) {
  constexpr int P = D / 32;
  __shared__ float qs_all[WARPS][D], gs_all[WARPS][D];
  int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  long long rowq = (long long)blockIdx.x * WARPS + warp;
  if (rowq >= (long long)B * Hq * T) return;
  int i = rowq % T;
  long long bh = rowq / T;
  int b = bh / Hq, h = bh % Hq;
  int bhk = b * Hkv + h / (Hq / Hkv);
  float *qs = qs_all[warp], *gs = gs_all[warp];
  float acc[P], dl = 0.f;
#pragma unroll
  for (int t = 0; t < P; ++t) {
    long long x = rowq * D + lane * P + t;
    qs[lane * P + t] = to_f(q[x]) * scale;
    float g = to_f(go[x]);
    gs[lane * P + t] = g;
    dl += g * to_f(o[x]);
    acc[t] = 0.f;
  }
  __syncwarp();
  dl = warp_sum(dl);
  float lse_i = lse[rowq], r = 0.f, ns = 0.f;
  long long ti = (long long)bhk * T + i;
  const E* kvr = kv + (long long)bhk * T * 2 * D;
  for_each_key_chunk(i, bhk, u, lu, lj, tau[ti], cut_u[ti], cut_j[ti], T, window, cap, nb, lane,
                     [&](bool ok, int j, float w) {
                       float ds = 0.f;
                       if (ok) {
                         const E* kj = kvr + (long long)j * 2 * D;
                         float s = dot_row<E, D>(qs, kj), gvj = dot_row<E, D>(gs, kj + D);
                         float a = __expf(s - lse_i);
                         ds = a * (w * gvj - dl);
                         if (j + window <= i && w < 1.f) { r += a * gvj; ns += 1.f; }
                       }
#pragma unroll 4
                       for (int t = 0; t < 32; ++t) {
                         float dst = __shfl_sync(FULL, ds, t);
                         int jt = __shfl_sync(FULL, j, t);
                         if (dst != 0.f) {
                           const E* kr = kvr + (long long)jt * 2 * D + lane * P;
#pragma unroll
                           for (int d = 0; d < P; ++d) acc[d] += dst * to_f(kr[d]);
                         }
                       }
                     });
  r = warp_sum(r);
  ns = warp_sum(ns);
#pragma unroll
  for (int t = 0; t < P; ++t) dq[rowq * D + lane * P + t] = acc[t] * scale;
  if (lane == 0) { delta[rowq] = dl; rsum[rowq] = r; nsup[rowq] = ns; }
}

// dk, dv (f32, packed like kv) and du per key row, over the interval of queries attending it,
// 32 queries at a time (lane-per-query scores, then lanes own head dims).
template <typename E, int D>
__device__ void sk_bwd_dkv(const E* __restrict__ q, const E* __restrict__ kv,
                           const E* __restrict__ go, const float* __restrict__ lse,
                           const float* __restrict__ delta, const float* __restrict__ rsum,
                           const float* __restrict__ nsup, float* __restrict__ dkv,
                           float* __restrict__ du, SK_PARAMS) {
  constexpr int P = D / 32;
  __shared__ float ks_all[WARPS][D], vs_all[WARPS][D];
  int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  long long rowk = (long long)blockIdx.x * WARPS + warp;
  if (rowk >= (long long)B * Hkv * T) return;
  int j = rowk % T;
  int bhk = rowk / T;
  int b = bhk / Hkv, hk = bhk % Hkv, g = Hq / Hkv;
  const float* tr = tau + (long long)bhk * T;
  const float* cur = cut_u + (long long)bhk * T;
  const int* cjr = cut_j + (long long)bhk * T;
  float uj = u[rowk] + 0.f;
  // First query past the selection interval [j + window, e): predicates are monotone in i.
  int lo = j + window, hi = T;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (in_top(uj, j, cur[mid], cjr[mid]) && uj > tr[mid]) lo = mid + 1; else hi = mid;
  }
  const int e = min(lo, T);
  float *ks = ks_all[warp], *vs = vs_all[warp];
  float dk[P], dv[P], gu = 0.f;
#pragma unroll
  for (int t = 0; t < P; ++t) {
    ks[lane * P + t] = to_f(kv[rowk * 2 * D + lane * P + t]) * scale;
    vs[lane * P + t] = to_f(kv[rowk * 2 * D + D + lane * P + t]);
    dk[t] = 0.f;
    dv[t] = 0.f;
  }
  __syncwarp();
  for (int h = hk * g; h < (hk + 1) * g; ++h) {
    long long r0 = ((long long)b * Hq + h) * T;
    for (int i0 = j; i0 < e; i0 += 32) {
      int i = i0 + lane;
      bool ok = i < e;
      long long rowq = r0 + (ok ? i : j);
      float cq = 0.f, cg = 0.f;
      if (ok) {
        bool cand = i >= j + window;
        float w = cand ? fminf(uj - tr[i], 1.f) : 1.f;
        float s = dot_row<E, D>(ks, q + rowq * D), gvj = dot_row<E, D>(vs, go + rowq * D);
        float a = __expf(s - lse[rowq]);
        cq = a * (w * gvj - delta[rowq]);
        cg = a * w;
        if (cand && w < 1.f) gu += a * gvj - rsum[rowq] / nsup[rowq];
      }
#pragma unroll 4
      for (int t = 0; t < 32; ++t) {
        float cqt = __shfl_sync(FULL, cq, t), cgt = __shfl_sync(FULL, cg, t);
        long long rt = __shfl_sync(FULL, rowq, t);
        if (cqt != 0.f || cgt != 0.f) {
          const E* qr = q + rt * D + lane * P;
          const E* gr = go + rt * D + lane * P;
#pragma unroll
          for (int d = 0; d < P; ++d) {
            dk[d] += cqt * to_f(qr[d]);
            dv[d] += cgt * to_f(gr[d]);
          }
        }
      }
    }
  }
  gu = warp_sum(gu);
#pragma unroll
  for (int t = 0; t < P; ++t) {
    dkv[rowk * 2 * D + lane * P + t] = dk[t] * scale;
    dkv[rowk * 2 * D + D + lane * P + t] = dv[t];
  }
  if (lane == 0) du[rowk] = gu;
}

#define SK_ARGS u, lu, lj, tau, cut_u, cut_j, B, Hq, Hkv, T, window, cap, nb, scale
#define SK_INSTANTIATE(TY, NAME, D)                                                             \
  extern "C" __global__ void sk_fwd_##NAME##_d##D(const TY* q, const TY* kv, TY* out,           \
                                                  float* lse, SK_PARAMS) {                      \
    sk_fwd<TY, D>(q, kv, out, lse, SK_ARGS);                                                    \
  }                                                                                             \
  extern "C" __global__ void sk_bwd_dq_##NAME##_d##D(                                           \
      const TY* q, const TY* kv, const TY* o, const TY* go, const float* lse, float* dq,        \
      float* delta, float* rsum, float* nsup, SK_PARAMS) {                                      \
    sk_bwd_dq<TY, D>(q, kv, o, go, lse, dq, delta, rsum, nsup, SK_ARGS);                        \
  }                                                                                             \
  extern "C" __global__ void sk_bwd_dkv_##NAME##_d##D(                                          \
      const TY* q, const TY* kv, const TY* go, const float* lse, const float* delta,            \
      const float* rsum, const float* nsup, float* dkv, float* du, SK_PARAMS) {                 \
    sk_bwd_dkv<TY, D>(q, kv, go, lse, delta, rsum, nsup, dkv, du, SK_ARGS);                     \
  }

#define SK_ALL_D(TY, NAME)                                                                      \
  SK_INSTANTIATE(TY, NAME, 32)                                                                  \
  SK_INSTANTIATE(TY, NAME, 64)                                                                  \
  SK_INSTANTIATE(TY, NAME, 96)                                                                  \
  SK_INSTANTIATE(TY, NAME, 128)                                                                 \
  SK_INSTANTIATE(TY, NAME, 256)

SK_ALL_D(float, f32)
SK_ALL_D(__half, f16)
SK_ALL_D(__nv_bfloat16, bf16)
