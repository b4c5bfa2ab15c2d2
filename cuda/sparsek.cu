// SparseK attention kernels (see src/sparsek/cuda.rs for the launch side and the design).
//
// Selection: per (batch, kv head) row of scores u[T]:
// - sk_group_lists + sk_block_lists, or sk_scan_block_lists in one cooperative launch: for every
//   block c of BQ queries, the top-`cap` keys of the prefix [0, e_c), e_c = max(0, c*BQ -
//   window), by (u, j) descending, built by merging sorted lists block after block (O(T * cap /
//   BQ) work per row, no O(T^2)); the blocks of a row are cut into groups whose starting lists
//   come from merging the earlier groups' own lists, so that the groups run in parallel.
// - sk_select: per query (one thread each), the union of its block's list and the <= BQ newer
//   candidates, cut to the top-`cap` (cut = the cap-th largest key), then tau by safeguarded
//   Newton steps on the piecewise-linear budget function from the middle of a bracket read off
//   the sorted list. The block sorts its newer candidates once (64-bit key compares); a query
//   finds its cut by one binary search on the list and its kept candidates as a mask, without a
//   pass over them. Each Newton step costs O(log cap) on the sorted list (binary searches plus
//   f64 prefix sums of its scores), O(log BQ) on the newer candidates and one term per kept
//   candidate strictly inside (x, x + 1).
// Attention, f16 / bf16 with head_dim <= 128: the blocked tensor-core kernels skt_* (see the
// section below). Attention, f32 and head_dim 256 (one warp per query row, f32 math; keys 32 at a
// time: lane-per-key scores, then lanes own head_dim / 32 contiguous dims for the weighted sums):
// - sk_fwd: window keys (weight 1) + the block list scanned until the first key with p = 0 (the
//   list is sorted, so the rest has p = 0) + the newer candidates.
// - sk_bwd_dq: dq per row plus delta = dO.O and r / |S| (r = sum_S g_w; 0 when S is empty).
// - sk_bwd_dkv: one warp per key: tau_i and cut_i are non-decreasing in i, so the queries that
//   attend key j form the interval [j, e_j) (window then selected), taken 32 queries at a time;
//   dk, dv and du accumulate in registers: no atomics, deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "wgmma.cuh"
#include "hopper.cuh"
#include "chunk.cuh"
#include "scan.cuh"

#define BQ 64

// Key order: (u, j) descending; equal scores: the newer key ranks higher.
__device__ __forceinline__ bool gt(float ua, int ja, float ub, int jb) {
  return ua > ub || (ua == ub && ja > jb);
}
// Number of indices r in [0, n) with pred(r), for a prefix predicate (true on [0, count), false
// after), by binary search (one thread).
template <typename P>
__device__ __forceinline__ int count_prefix(int n, P&& pred) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (pred(mid)) lo = mid + 1; else hi = mid;
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
// The blocks are cut into groups of S consecutive blocks, so that the rows' sequential merges
// run in parallel:
// - sk_group_lists (grid (G - 1, rows)): the sorted top-cap of the keys that group g adds,
//   [e_{gS}, e_{(g+1)S}), built block by block (S merges), padded to cap like the block lists;
// - sk_block_lists (grid (G, rows)): group g's starting list, the top-cap of [0, e_{gS}), by
//   merging the g earlier groups' lists (with `prefetch`, the next one copied in with cp.async
//   while one merges), then block by block as before, writing each block's list.
// The longest CTA does G - 1 list merges plus S block merges instead of nb block merges; with
// G = 1 this is the single sequential pass per row. A merge is a merge path: each thread finds
// where its run of outputs starts with one binary search, then merges the run (a block's new
// keys are sorted first by counting each one's rank, blockDim / BQ threads per key). Both take
// blockDim a multiple of BQ, at most 32 * BQ.
// Dynamic smem: (2 * cap + max(cap, BQ) + BQ) * 8 bytes, and with `prefetch` max(cap, BQ) * 8
// more for sk_block_lists (the next group's list; x and y swap, so both hold a block's keys too).

// The running list (a), the merge target (b), a sorted list to merge in (x) and, in
// sk_block_lists, the next one (y), in shared memory.
struct SkListBufs {
  float *au, *bu, *xu, *yu;
  int *aj, *bj, *xj, *yj;
  float* cu;
  int* cj;
  int len;
  __device__ SkListBufs(unsigned char* raw, int cap) {
    au = (float*)raw;
    aj = (int*)(au + cap);
    bu = (float*)(aj + cap);
    bj = (int*)(bu + cap);
    // x holds either a group's list (cap entries) or a block's new keys (BQ entries).
    const int nx = max(cap, BQ);
    xu = (float*)(bj + cap);
    xj = (int*)(xu + nx);
    cu = (float*)(xj + nx);
    cj = (int*)(cu + BQ);
    yu = (float*)(cj + BQ);  // only sk_block_lists allocates y (it swaps with x)
    yj = (int*)(yu + nx);
    len = 0;
  }
  // Merges the sorted list x[0, n) into a (keeping the top cap); every thread calls it.
  __device__ void merge_x(int n, int cap) {
    if (n == 0) return;
    const int tid = threadIdx.x, bs = blockDim.x, m = min(cap, len + n);
    const int per = (m + bs - 1) / bs, d0 = min(m, tid * per), d1 = min(m, d0 + per);
    if (d0 < d1) {
      // The split of the first d0 outputs: a[0, ia) and x[0, d0 - ia).
      const int lo = max(0, d0 - n);
      int ia = lo + count_prefix(min(d0, len) - lo, [&](int r) {
                 const int s = d0 - (lo + r) - 1;
                 return gt(au[lo + r], aj[lo + r], xu[s], xj[s]);
               });
      int ix = d0 - ia;
      for (int d = d0; d < d1; ++d) {
        if (ix >= n || (ia < len && gt(au[ia], aj[ia], xu[ix], xj[ix]))) {
          bu[d] = au[ia];
          bj[d] = aj[ia];
          ++ia;
        } else {
          bu[d] = xu[ix];
          bj[d] = xj[ix];
          ++ix;
        }
      }
    }
    __syncthreads();
    len = m;
    float* tu = au; au = bu; bu = tu;
    int* tj = aj; aj = bj; bj = tj;
  }
  // Adds the n <= BQ keys [e0, e0 + n) of a score row; thread t < n holds its key's score ut.
  __device__ void add_keys(float ut, int e0, int n, int cap) {
    const int tid = threadIdx.x, R = blockDim.x / BQ;
    if (n <= 0) return;
    if (tid < n) { cu[tid] = ut + 0.f; cj[tid] = e0 + tid; }
    __syncthreads();
    // The rank of key s among the n, R threads per key (a power of two, inside one warp).
    const int s = tid / R;
    int rank = 0;
    if (s < n)
      for (int t = tid % R; t < n; t += R) rank += gt(cu[t], cj[t], cu[s], cj[s]);
    for (int o = 1; o < R; o <<= 1) rank += __shfl_xor_sync(0xffffffffu, rank, o);
    if (s < n && tid % R == 0) {
      xu[rank] = cu[s];
      xj[rank] = cj[s];
    }
    __syncthreads();
    merge_x(n, cap);
  }
};

// Score of key e0 + threadIdx.x of row ur for the block [e0, e1) (0 past it).
__device__ __forceinline__ float sk_block_key(const float* ur, int e0, int e1) {
  return e0 + (int)threadIdx.x < e1 ? ur[e0 + threadIdx.x] : 0.f;
}

// The keys [e_c, e_{c+1}) of blocks c in [c0, c1) of row ur added to L one block at a time, the
// next block's scores loaded while one merges; f(c) runs before block c's keys are added.
template <typename F>
__device__ __forceinline__ void sk_add_blocks(SkListBufs& L, const float* ur, int c0, int c1,
                                              int T, int window, int cap, F&& f) {
  int e0 = min(T, block_start(c0, window));
  float un = sk_block_key(ur, e0, min(T, block_start(c0 + 1, window)));
  for (int c = c0; c < c1; ++c) {
    f(c);
    const int e1 = min(T, block_start(c + 1, window));
    const float ut = un;
    if (c + 1 < c1) un = sk_block_key(ur, e1, min(T, block_start(c + 2, window)));
    L.add_keys(ut, e0, e1 - e0, cap);
    e0 = e1;
  }
}

// The lists of group g's blocks of row `row` into (lu_out, lj_out), from the running list L (the
// earlier groups' keys): block c's list is the running list before c's own keys (the group's last
// block adds none).
__device__ __forceinline__ void sk_write_block_lists(SkListBufs& L, const float* ur,
                                                     float* __restrict__ lu_out,
                                                     int* __restrict__ lj_out, int row, int g,
                                                     int S, int T, int window, int cap, int nb) {
  const int c1 = min(nb, (g + 1) * S);
  auto write = [&](int c) {
    const long long base = ((long long)row * nb + c) * cap;
    for (int r = threadIdx.x; r < cap; r += blockDim.x) {
      lu_out[base + r] = r < L.len ? L.au[r] : neg_inf();
      lj_out[base + r] = r < L.len ? L.aj[r] : -1;
    }
  };
  sk_add_blocks(L, ur, g * S, c1 - 1, T, window, cap, write);
  write(c1 - 1);
}

extern "C" __global__ void sk_group_lists(const float* __restrict__ u, float* __restrict__ gu,
                                          int* __restrict__ gj, int* __restrict__ glen, int T,
                                          int window, int cap, int nb, int S) {
  extern __shared__ __align__(16) unsigned char smem[];
  SkListBufs L(smem, cap);
  const int g = blockIdx.x, row = blockIdx.y, G = gridDim.x + 1;
  const float* ur = u + (long long)row * T;
  sk_add_blocks(L, ur, g * S, (g + 1) * S, T, window, cap, [](int) {});
  const long long base = ((long long)row * G + g) * cap;
  for (int r = threadIdx.x; r < cap; r += blockDim.x) {
    gu[base + r] = r < L.len ? L.au[r] : neg_inf();
    gj[base + r] = r < L.len ? L.aj[r] : -1;
  }
  if (threadIdx.x == 0) glen[(long long)row * G + g] = L.len;
}

extern "C" __global__ void sk_block_lists(const float* __restrict__ u,
                                          const float* __restrict__ gu,
                                          const int* __restrict__ gj,
                                          const int* __restrict__ glen, float* __restrict__ lu_out,
                                          int* __restrict__ lj_out, int T, int window, int cap,
                                          int nb, int S, int prefetch) {
  extern __shared__ __align__(16) unsigned char smem[];
  SkListBufs L(smem, cap);
  const int g = blockIdx.x, row = blockIdx.y, G = gridDim.x, tid = threadIdx.x, bs = blockDim.x;
  const float* ur = u + (long long)row * T;
  // Group h's list into (du, dj) with cp.async (all cap entries, padded; a merge reads its
  // length's).
  auto fetch = [&](int h, float* du, int* dj) {
    const long long base = ((long long)row * G + h) * cap;
    for (int r = tid; r < cap; r += bs) {
      cp_async4(du + r, gu + base + r, true);
      cp_async4(dj + r, gj + base + r, true);
    }
    cp_async_commit();
  };
  if (prefetch) {
    // Group h + 1's list copies into y while group h's merges from x.
    if (g > 0) fetch(0, L.yu, L.yj);
    int n = g > 0 ? glen[(long long)row * G] : 0;
    for (int h = 0; h < g; ++h) {
      cp_async_wait<0>();
      __syncthreads();  // group h's list landed in y; the last merge is done with x
      float* tu = L.xu; L.xu = L.yu; L.yu = tu;
      int* tj = L.xj; L.xj = L.yj; L.yj = tj;
      const int nh = n;
      if (h + 1 < g) {
        fetch(h + 1, L.yu, L.yj);
        n = glen[(long long)row * G + h + 1];
      }
      L.merge_x(nh, cap);
    }
  } else {
    for (int h = 0; h < g; ++h) {
      fetch(h, L.xu, L.xj);
      cp_async_wait<0>();
      __syncthreads();
      L.merge_x(glen[(long long)row * G + h], cap);
    }
  }
  sk_write_block_lists(L, ur, lu_out, lj_out, row, g, S, T, window, cap, nb);
}

// The lists of every block in one cooperative launch (grid (G, rows), all CTAs resident), for
// when they fit the GPU: with a barrier among the G CTAs of a row between the phases, group g's
// starting list (the earlier groups' lists merged) comes from a log-step scan instead of g
// sequential merges, so the longest CTA does S block merges to build its group's list, about
// log2(G) list merges, and S - 1 block merges writing its blocks' lists.
// - gu, gj: [2][rows][G][cap] list buffers (phase 1 publishes the group lists into buffer 1, the
//   scan round r its running lists into buffer r % 2), glen [2][rows][G] their lengths;
// - bar: [rows] arrival counters, zero at launch (barrier number n of a row waits for G * (n + 1)
//   arrivals).
// Hillis-Steele on Y_g = L_{g-1} (Y_0 empty): after the rounds d = 2, 4, ... < G (d = 1 is done
// from the group lists directly: Y_g = L_{g-1} + L_{g-2}), Y_g = L_0 + ... + L_{g-1}.
__device__ __forceinline__ void sk_row_barrier(int* count, int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(count, 1);
    while (*(volatile int*)count < target) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

extern "C" __global__ void sk_scan_block_lists(const float* __restrict__ u, float* gu, int* gj,
                                               int* glen, int* bar, float* __restrict__ lu_out,
                                               int* __restrict__ lj_out, int T, int window,
                                               int cap, int nb, int S) {
  extern __shared__ __align__(16) unsigned char smem[];
  SkListBufs L(smem, cap);
  const int g = blockIdx.x, row = blockIdx.y, G = gridDim.x, rows = gridDim.y;
  const int tid = threadIdx.x, bs = blockDim.x;
  const float* ur = u + (long long)row * T;
  int* count = bar + row;
  int arrivals = 0;
  auto slot = [&](int b, int h) { return ((long long)b * rows + row) * G + h; };
  // The running list into buffer b (padded to cap).
  auto publish = [&](int b) {
    const long long base = slot(b, g) * cap;
    for (int r = tid; r < cap; r += bs) {
      gu[base + r] = r < L.len ? L.au[r] : neg_inf();
      gj[base + r] = r < L.len ? L.aj[r] : -1;
    }
    if (tid == 0) glen[slot(b, g)] = L.len;
  };
  // Merges group h's list of buffer b into the running list (L2 reads: written by other CTAs).
  auto merge_from = [&](int b, int h) {
    const long long base = slot(b, h) * cap;
    const int n = __ldcg(glen + slot(b, h));
    for (int r = tid; r < n; r += bs) {
      L.xu[r] = __ldcg(gu + base + r);
      L.xj[r] = __ldcg(gj + base + r);
    }
    __syncthreads();
    L.merge_x(n, cap);
  };
  // Phase 1: the group's own keys [e_{gS}, e_{(g+1)S}) (the last group's are never read).
  if (g + 1 < G) {
    sk_add_blocks(L, ur, g * S, (g + 1) * S, T, window, cap, [](int) {});
    publish(1);
  }
  sk_row_barrier(count, G * ++arrivals);
  L.len = 0;
  if (g >= 1) merge_from(1, g - 1);
  if (g >= 2) merge_from(1, g - 2);
  int b = 0;
  for (int d = 2; d < G; d *= 2, b ^= 1) {
    publish(b);
    sk_row_barrier(count, G * ++arrivals);
    if (g - d >= 1) merge_from(b, g - d);
  }
  // Phase 3: the group's blocks' lists.
  sk_write_block_lists(L, ur, lu_out, lj_out, row, g, S, T, window, cap, nb);
}

// Exclusive f64 prefix sum r of a list's scores Lu from the table Ph (Ph[m] = the sum of
// Lu[0, 4m)): adds the scores from 4m up to r in order, as the scan that built Ph did.
__device__ __forceinline__ double sk_prefix(const double* Ph, const float* Lu, int r) {
  double s = Ph[r >> 2];
  for (int q = r & ~3; q < r; ++q) s += (double)Lu[q];
  return s;
}

// A 64-bit key of (u, j) in the order of gt: key(a) > key(b) exactly when gt(a, b), for u not
// NaN (-0 and +0 equal, as in gt) and j >= 0. Every such key is > 0, so 0 pads a table.
__device__ __forceinline__ unsigned long long sk_key(float u, int j) {
  const unsigned b = __float_as_uint(u + 0.f);
  const unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ((unsigned long long)o << 32) | (unsigned)j;
}

// Bits [0, n) of a 64-bit mask, 0 <= n <= 64.
__device__ __forceinline__ unsigned long long sk_below(int n) {
  return n >= 64 ? ~0ull : (1ull << n) - 1;
}

// The place of the q-th set bit (from 0) of m, q < popcount(m): halving the window six times.
__device__ __forceinline__ int sk_nth_bit(unsigned long long m, int q) {
  int base = 0;
#pragma unroll
  for (int w = 32; w >= 1; w >>= 1) {
    const int c = __popcll(m & ((1ull << w) - 1));
    if (q >= c) {
      q -= c;
      m >>= w;
      base += w;
    }
  }
  return base;
}

// The bits t of the block's extras' keys Ek[0, BQ) (0 pads) that rank above `key`.
__device__ __forceinline__ unsigned long long sk_extras_above(const unsigned long long* Ek,
                                                             unsigned long long key) {
  unsigned long long mk = 0;
#pragma unroll
  for (int t = 0; t < BQ; t += 2) {
    const ulonglong2 e = *reinterpret_cast<const ulonglong2*>(Ek + t);
    if (e.x > key) mk |= 1ull << t;
    if (e.y > key) mk |= 1ull << (t + 1);
  }
  return mk;
}

// What sk_select finds for one query.
struct SkQuerySel {
  float tau, cut_u;
  int cut_j, nattend;
};

// The selection of one query, by one thread, from its block's tables in shared memory: the
// sorted list (Lu, Lj, len entries; Ph its exclusive f64 prefix sums, sk_prefix) and the block's
// nE newer candidates, the extras, of which the query sees the first n_ext by position: first,
// their position bits; vis, their bits in the extras' order (SEu / SEj: the extras sorted
// descending); gtL[r - rb], the extras above list entry r for r in [rb, rb + BQ].
__device__ __forceinline__ SkQuerySel sk_select_query(
    const float* Lu, const int* Lj, const double* Ph, int len, int n_ext,
    unsigned long long first, unsigned long long vis, const unsigned long long* gtL,
    const float* SEu, const int* SEj, int nE, int rb, int cap, float k) {
  SkQuerySel o{neg_inf(), neg_inf(), -1, 0};
  const int total = len + n_ext;
  // lt: the kept list prefix; m: the extras in sorted order at or above the cut (all without
  // one), so that the kept extras are vis & below(m).
  int lt = len, m = 64;
  if (total > cap) {
    // The cut is the key of rank cap - 1 in the union. A list entry r ranks r + (extras above
    // it), increasing in r; rs, the first r of rank >= cap - 1, lies in [cap - 1 - n_ext,
    // min(len, cap)]. The cut is entry rs if its rank is cap - 1; otherwise it is the extra with
    // rs list entries above it, the (cap - 1 - rs)-th of the visible extras in sorted order.
    const int r0 = max(0, cap - 1 - n_ext), r1 = min(len, cap);
    const int rs = r0 + count_prefix(r1 - r0, [&](int x) {
                     return r0 + x + __popcll(gtL[r0 + x - rb] & first) < cap - 1;
                   });
    if (rs < r1 && rs + __popcll(gtL[rs - rb] & first) == cap - 1) {
      o.cut_u = Lu[rs];
      o.cut_j = Lj[rs];
      lt = rs + 1;
      m = __popcll(gtL[rs - rb]);
    } else {
      const int p = sk_nth_bit(vis, cap - 1 - rs);
      o.cut_u = SEu[p];
      o.cut_j = SEj[p];
      lt = rs;
      m = p + 1;
    }
  }
  if ((float)min(total, cap) > k) {
    // The kept extras (bits in sorted order) and the kept scores' range.
    const unsigned long long ks = vis & sk_below(m);
    float mx = lt > 0 ? Lu[0] : neg_inf(), mn = lt > 0 ? Lu[lt - 1] : pos_inf();
    if (ks != 0) {
      mx = fmaxf(mx, SEu[__ffsll(ks) - 1]);
      mn = fminf(mn, SEu[63 - __clzll(ks)]);
    }
    // f(x) = sum clip(z - x, 0, 1) over the kept scores z (centred: z - mx), with the counts of
    // the saturated (nu) and strictly partial (ns, sum ss) entries at x: the sorted list part
    // from two binary searches and the prefix sums, the extras from two binary searches on their
    // sorted scores (the kept ones counted by mask), the partial ones added one by one.
    float ns, ss, nu, f;
    auto eval = [&](float x) {
      const int a = count_prefix(lt, [&](int r) { return Lu[r] - mx >= x + 1.f; });
      const int bc = count_prefix(lt, [&](int r) { return Lu[r] - mx > x; });
      nu = (float)a;
      ns = (float)(bc - a);
      const double sum = sk_prefix(Ph, Lu, bc) - sk_prefix(Ph, Lu, a);
      ss = (float)(sum - (double)(bc - a) * (double)mx);
      if (ks != 0) {
        const int ea = count_prefix(nE, [&](int p) { return SEu[p] - mx >= x + 1.f; });
        const int eb = count_prefix(nE, [&](int p) { return SEu[p] - mx > x; });
        nu += (float)__popcll(ks & sk_below(ea));
        for (unsigned long long b = ks & sk_below(eb) & ~sk_below(ea); b; b &= b - 1) {
          ns += 1.f;
          ss += SEu[__ffsll(b) - 1] - mx;
        }
      }
      f = nu + ss - x * ns;
    };
    // Safeguarded Newton on the piecewise-linear f: from x, jump to the root of x's linear
    // piece, (ss + nu - k) / ns, when it lies inside the bracket [lo, hi] (f(lo) >= k > f(hi)),
    // else bisect. The last step is the closed form of the root's piece (the polish).
    float lo = mn - mx - 1.f, hi = 0.f;
    // A tighter start: the root lies in [z_(kk) - 1, z_(kk)] (z_(kk): the kk-th largest kept
    // score, kk = k integer), the list's kk-th entry is at most z_(kk) and, with e kept extras,
    // its (kk - e)-th at least z_(kk).
    const int kk = (int)k, e = __popcll(ks);
    if ((float)kk == k && kk <= lt) lo = fmaxf(lo, Lu[kk - 1] - mx - 1.f);
    if ((float)kk == k && kk - e >= 1 && kk - e <= lt) hi = fminf(hi, Lu[kk - e - 1] - mx);
    float x = 0.5f * (lo + hi), t = x;
    for (int it = 0; it < 64; ++it) {
      eval(x);
      if (ns == 0.f && f == k) { t = x; break; }  // flat piece at height k (gap >= 1)
      if (f >= k) lo = x; else hi = x;
      float xn = ns > 0.f ? (ss + nu - k) / ns : 0.5f * (lo + hi);
      t = xn;
      float tol = 1e-6f * fmaxf(1.f, fabsf(x));
      if (ns > 0.f && fabsf(xn - x) <= tol) break;
      if (!(xn > lo && xn < hi)) xn = 0.5f * (lo + hi);
      if (hi - lo <= tol) { t = ns > 0.f ? fminf(fmaxf(t, lo), hi) : x; break; }
      x = xn;
    }
    o.tau = t + mx;
  }
  // The list prefix this query attends: kept (r < lt) and u > tau, a prefix of the sorted list.
  const float tau = o.tau;
  o.nattend = count_prefix(lt, [&](int r) { return Lu[r] > tau; });
  return o;
}

// ---------------------------------------------------------------------------------------------
// Per query: cut (the cap-th largest candidate key, or j = -1), tau (-inf when <= k kept) and the
// length of the prefix of its block's list that it attends (nattend; nlist: the block's maximum).
// Grid (nb, rows), BQ threads: the block's tables built together, then one thread per query
// (sk_select_query). The extras' order relations are 64-bit key compares (sk_key) against the
// extras' keys, one row per thread: gtL (list entries that can be the cut against the extras) and
// each extra's rank among the extras, which places it in the sorted extras (SEu, SEj) and, by an
// OR-scan over positions, gives vis (the visible extras' bits in sorted order) per n_ext.
// Dynamic smem: cap * 8 + (cap / 4 + 1) * 8 bytes (the list, f64 prefix sums of its scores at
// every fourth index), about 7.2 KB per CTA with the static tables at K′ = 512: 24 CTAs per SM,
// which at 24 rows x 128 blocks fit one wave on the H100.
extern "C" __global__ void __launch_bounds__(BQ) sk_select(
    const float* __restrict__ u, const float* __restrict__ lu, const int* __restrict__ lj,
    float* __restrict__ tau_out, float* __restrict__ cut_u_out, int* __restrict__ cut_j_out,
    int* __restrict__ nlist_out, int* __restrict__ nattend_out, int T, int window, int cap,
    float k, int nb) {
  extern __shared__ __align__(16) unsigned char smem[];
  double* Ph = reinterpret_cast<double*>(smem);  // [cap / 4 + 1]
  float* Lu = reinterpret_cast<float*>(Ph + cap / 4 + 1);
  int* Lj = (int*)(Lu + cap);
  // Ek: the extras' keys by position (0 pads); visw[s]: the OR of the sorted-order bits of the
  // extras at positions <= s within s's warp; gtL as in sk_select_query.
  __shared__ __align__(16) unsigned long long Ek[BQ];
  __shared__ unsigned long long visw[BQ], gtL[BQ + 1];
  __shared__ float SEu[BQ];
  __shared__ int SEj[BQ];
  __shared__ int s_len, s_nl;
  const int c = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid & 31;
  if (tid == 0) s_len = s_nl = 0;
  __syncthreads();
  // The list, four loads in flight per thread.
  const long long base = ((long long)row * nb + c) * cap;
  int cnt = 0;
  for (int r0 = tid; r0 < cap; r0 += 4 * BQ) {
    float a[4];
    int b[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int r = r0 + q * BQ;
      if (r < cap) {
        a[q] = lu[base + r];
        b[q] = lj[base + r];
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int r = r0 + q * BQ;
      if (r < cap) {
        Lu[r] = a[q];
        Lj[r] = b[q];
        cnt += b[q] >= 0;
      }
    }
  }
  atomicAdd(&s_len, cnt);
  const int e0 = min(T, block_start(c, window));
  const int eend = min(T, max(e0, c * BQ + BQ - window));
  const int nE = eend - e0;
  const float* ur = u + (long long)row * T;
  const float eu = tid < nE ? ur[e0 + tid] + 0.f : 0.f;
  const unsigned long long ek = tid < nE ? sk_key(eu, e0 + tid) : 0ull;
  Ek[tid] = ek;
  __syncthreads();
  const int len = s_len;
  // Exclusive prefix sums of the list's scores (f64), by warp 0: chunks of a multiple of 4 per
  // lane, then a scan.
  if (warp == 0) {
    const int per = (((len + 31) / 32) + 3) & ~3, r0 = min(len, lane * per),
              r1 = min(len, r0 + per);
    double s = 0.0;
    for (int r = r0; r < r1; ++r) s += Lu[r];
    const double incl = warp_inclusive_scan(s, lane, [](double a, double b) { return a + b; });
    double run = incl - s;
    for (int r = r0; r < r1; ++r) {
      if ((r & 3) == 0) Ph[r >> 2] = run;
      run += Lu[r];
    }
    if (lane == 31 && (len & 3) == 0) Ph[len >> 2] = incl;
  }
  // Each extra's place among the extras, its entry in the sorted tables and its bit in vis.
  unsigned long long bit = 0;
  if (tid < nE) {
    const int pos = __popcll(sk_extras_above(Ek, ek));
    SEu[pos] = eu;
    SEj[pos] = e0 + tid;
    bit = 1ull << pos;
  }
  visw[tid] = warp_inclusive_scan(
      bit, lane, [](unsigned long long a, unsigned long long b) { return a | b; });
  // gtL for the only list entries that can have rank cap - 1 (r in [cap - 1 - BQ, cap - 1]): one
  // row per thread, the last row by warp 1's ballots.
  const int rb = max(0, cap - 1 - BQ);
  if (rb + tid < len) gtL[tid] = sk_extras_above(Ek, sk_key(Lu[rb + tid], Lj[rb + tid]));
  if (warp == 1 && rb + BQ < len) {
    const unsigned long long key = sk_key(Lu[rb + BQ], Lj[rb + BQ]);
    const unsigned lo = __ballot_sync(0xffffffffu, Ek[lane] > key);
    const unsigned hi = __ballot_sync(0xffffffffu, Ek[lane + 32] > key);
    if (lane == 0) gtL[BQ] = ((unsigned long long)hi << 32) | lo;
  }
  __syncthreads();
  // One thread per query.
  const int i = c * BQ + tid;
  if (i < T) {
    const int n_ext = min(nE, max(0, i - window + 1 - e0));
    const unsigned long long vis =
        n_ext == 0 ? 0ull : (n_ext <= 32 ? visw[n_ext - 1] : visw[31] | visw[n_ext - 1]);
    const SkQuerySel s = sk_select_query(Lu, Lj, Ph, len, n_ext, sk_below(n_ext), vis, gtL, SEu,
                                         SEj, nE, rb, cap, k);
    const long long o = (long long)row * T + i;
    tau_out[o] = s.tau;
    cut_u_out[o] = s.cut_u;
    cut_j_out[o] = s.cut_j;
    nattend_out[o] = s.nattend;
    atomicMax(&s_nl, s.nattend);
  }
  __syncthreads();
  if (tid == 0) nlist_out[(long long)row * nb + c] = s_nl;
}

// ---------------------------------------------------------------------------------------------
// Attention. Shared argument list and per-row helpers.
#define SK_PARAMS                                                                               \
  const float *__restrict__ u, const float *__restrict__ lu, const int *__restrict__ lj,       \
      const int *__restrict__ nlist, const int *__restrict__ nattend,                          \
      const float *__restrict__ tau, const float *__restrict__ cut_u,                           \
      const int *__restrict__ cut_j, int B, int Hq, int Hkv, int T, int window, int cap, int nb, \
      float scale
// The SK_PARAMS arguments, passed on.
#define SK_ARGS u, lu, lj, nlist, nattend, tau, cut_u, cut_j, B, Hq, Hkv, T, window, cap, nb, scale
// Arguments of the key-side kernels (element type E): the inputs, the output gradient, the
// forward's LSE, dQ's per-row delta and r / |S|, and the outputs (the f32 accumulator [dK | dV]
// and du, which the list kernel adds to; dK and dV, which the band kernel writes), then SK_PARAMS.
#define SK_DKV_PARAMS                                                                           \
  const E *__restrict__ q, const E *__restrict__ k, const E *__restrict__ v,                   \
      const E *__restrict__ go, const float *__restrict__ lse, const float *__restrict__ delta, \
      const float *__restrict__ rmean, float *__restrict__ dacc,                               \
      float *__restrict__ du, E *__restrict__ dk, E *__restrict__ dv, SK_PARAMS
// The Hopper key-side kernels' arguments: SK_DKV_PARAMS with the rows' strides (SkwStrides)
// before SK_PARAMS.
#define SKW_DKV_PARAMS                                                                          \
  const E *__restrict__ q, const E *__restrict__ k, const E *__restrict__ v,                   \
      const E *__restrict__ go, const float *__restrict__ lse, const float *__restrict__ delta, \
      const float *__restrict__ rmean, float *__restrict__ dacc,                               \
      float *__restrict__ du, E *__restrict__ dk, E *__restrict__ dv, SkwStrides ws, SK_PARAMS

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

// Dot product of two rows of N elements (16-byte vector loads when both are aligned).
template <typename E, int N>
__device__ __forceinline__ float dot_rows(const E* __restrict__ a, const E* __restrict__ b) {
  float s = 0.f;
  constexpr int V = 16 / sizeof(E);
  if (N % V == 0 &&
      ((reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b)) & 15) == 0) {
#pragma unroll
    for (int c = 0; c < N / V; ++c) {
      uint4 x = reinterpret_cast<const uint4*>(a)[c], y = reinterpret_cast<const uint4*>(b)[c];
      const E* ex = reinterpret_cast<const E*>(&x);
      const E* ey = reinterpret_cast<const E*>(&y);
#pragma unroll
      for (int v = 0; v < V; ++v) s += to_f(ex[v]) * to_f(ey[v]);
    }
  } else {
#pragma unroll 8
    for (int d = 0; d < N; ++d) s += to_f(a[d]) * to_f(b[d]);
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
__device__ void sk_fwd(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                       E* __restrict__ out, float* __restrict__ lse, SK_PARAMS) {
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
  const E* kr = k + (long long)bhk * T * D;
  const E* vr = v + (long long)bhk * T * D;
  for_each_key_chunk(i, bhk, u, lu, lj, tau[ti], cut_u[ti], cut_j[ti], T, window, cap, nb, lane,
                     [&](bool ok, int j, float w) {
                       float s = ok ? dot_row<E, D>(qs, kr + (long long)j * D) : neg_inf();
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
                           const E* vj = vr + (long long)jt * D + lane * P;
#pragma unroll
                           for (int d = 0; d < P; ++d) acc[d] += pt * to_f(vj[d]);
                         }
                       }
                     });
  float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int t = 0; t < P; ++t) out[rowq * D + lane * P + t] = from_f<E>(acc[t] * inv);
  if (lane == 0) lse[rowq] = l > 0.f ? m + __logf(l) : neg_inf();
}

// dq (scaled, in the input dtype) per query row, plus delta = dO.O and r / |S| (r = sum over S
// of g_w; 0 when S is empty).
template <typename E, int D>
__device__ void sk_bwd_dq(const E* __restrict__ q, const E* __restrict__ k,
                          const E* __restrict__ v, const E* __restrict__ o,
                          const E* __restrict__ go, const float* __restrict__ lse,
                          E* __restrict__ dq,
                          float* __restrict__ delta, float* __restrict__ rmean, SK_PARAMS) {
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
  const E* kr = k + (long long)bhk * T * D;
  const E* vr = v + (long long)bhk * T * D;
  for_each_key_chunk(i, bhk, u, lu, lj, tau[ti], cut_u[ti], cut_j[ti], T, window, cap, nb, lane,
                     [&](bool ok, int j, float w) {
                       float ds = 0.f;
                       if (ok) {
                         float s = dot_row<E, D>(qs, kr + (long long)j * D);
                         float gvj = dot_row<E, D>(gs, vr + (long long)j * D);
                         float a = __expf(s - lse_i);
                         ds = a * (w * gvj - dl);
                         if (j + window <= i && w < 1.f) { r += a * gvj; ns += 1.f; }
                       }
#pragma unroll 4
                       for (int t = 0; t < 32; ++t) {
                         float dst = __shfl_sync(FULL, ds, t);
                         int jt = __shfl_sync(FULL, j, t);
                         if (dst != 0.f) {
                           const E* kj = kr + (long long)jt * D + lane * P;
#pragma unroll
                           for (int d = 0; d < P; ++d) acc[d] += dst * to_f(kj[d]);
                         }
                       }
                     });
  r = warp_sum(r);
  ns = warp_sum(ns);
#pragma unroll
  for (int t = 0; t < P; ++t) dq[rowq * D + lane * P + t] = from_f<E>(acc[t] * scale);
  if (lane == 0) {
    delta[rowq] = dl;
    rmean[rowq] = ns > 0.f ? r / ns : 0.f;
  }
}

// dk, dv (in the input dtype) and du per key row, over the interval of queries attending it,
// 32 queries at a time (lane-per-query scores, then lanes own head dims).
template <typename E, int D>
__device__ void sk_bwd_dkv(const E* __restrict__ q, const E* __restrict__ k,
                           const E* __restrict__ v, const E* __restrict__ go,
                           const float* __restrict__ lse, const float* __restrict__ delta,
                           const float* __restrict__ rmean,
                           E* __restrict__ dk_out, E* __restrict__ dv_out,
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
    ks[lane * P + t] = to_f(k[rowk * D + lane * P + t]) * scale;
    vs[lane * P + t] = to_f(v[rowk * D + lane * P + t]);
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
        if (cand && w < 1.f) gu += a * gvj - rmean[rowq];
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
    dk_out[rowk * D + lane * P + t] = from_f<E>(dk[t] * scale);
    dv_out[rowk * D + lane * P + t] = from_f<E>(dv[t]);
  }
  if (lane == 0) du[rowk] = gu;
}

// ---------------------------------------------------------------------------------------------
// Blocked tensor-core kernels (f16 / bf16, head_dim <= 128): one CTA of 4 warps per (block of BQ
// queries, batch * q head). tau_i and the cut are non-decreasing in i, so every query of block c
// attends a prefix of the block's sorted list (length nl = the largest per-query prefix) plus the
// band [e_c, c*BQ + BQ) of newer candidates and window keys. Both are walked in tiles of TB keys
// (K, V rows gathered with cp.async, double-buffered: tile t + 1 copies while tile t computes,
// and the positions and scores of tile t + 2 load into registers meanwhile, so the gather's index
// read is off the critical path); the mma tiles apply the per-element weight w_ij (1 in the
// window, clip(u_j - tau_i, 0, 1) for selected candidates, 0 = not attended). The kernels are
// latency-bound: at head_dim <= 64 they are compiled for 3 resident CTAs per SM (168 registers;
// small spills), which ran dQ 8.3 -> 5.3 ms and dK / dV 5.2 + 8.9 -> 4.0 + 7.1 ms at 16k; the
// forward, whose weights are recomputed in its second element-wise pass to fit, 6.0 -> 6.9 ms
// (BENCHMARKS.md, "SparseK: occupancy").
// ---------------------------------------------------------------------------------------------

#define TB 64
#define TC_WARPS 4
// Resident CTAs per SM the tensor-core kernels are compiled for: 3 up to head_dim 64 (caps their
// registers at 168; uncapped they used up to 255 and ran 2 CTAs, 12.5% occupancy), 2 above (their
// shared memory allows no more).
#define SKT_MIN_BLOCKS(D) ((D) <= 64 ? 3 : 2)
#define TC_THREADS (TC_WARPS * 32)

// Tile kinds, uniform over a CTA's tile, so that most tiles skip the general weight test:
// - SK_LIST: a list tile; every key is a candidate of every query of the block (it lies before
//   e_c), and query i attends exactly the list prefix [0, nattend_i), weight min(u - tau_i, 1);
// - SK_FULL: a band tile inside the window of every query of the block: weight 1;
// - SK_DIAG: a band tile inside every query's window that some queries precede (the diagonal):
//   weight 1 up to the causal edge;
// - SK_EDGE: a band tile before every query that some windows do not cover (the band's first):
//   weight 1 inside the window, else the selection's weight;
// - SK_BAND: any other band tile: sk_weight.
#define SK_LIST 0
#define SK_FULL 1
#define SK_BAND 2
#define SK_DIAG 3
#define SK_EDGE 4

// The kind of a band tile from whether all its keys precede all its queries (causal) and lie in
// all their windows (in_window).
__device__ __forceinline__ int sk_band_kind(bool causal, bool in_window) {
  return causal ? (in_window ? SK_FULL : SK_EDGE) : (in_window ? SK_DIAG : SK_BAND);
}

// The key tiles of one query block.
struct SkTiles {
  const float* lu;  // the block's list (cap entries)
  const int* lj;
  const float* ur;  // scores of the kv row
  int nl;           // list entries some query of the block attends (a prefix of the list)
  int e0, e1;       // band [e0, e1)
  int ntl, nt;      // list tiles, all tiles

  // Position (-1: none) and score of row r of tile t.
  __device__ __forceinline__ int key(int t, int r, float* uo) const {
    if (t < ntl) {
      int rr = t * TB + r;
      if (rr < nl) { *uo = lu[rr]; return lj[rr]; }
    } else {
      int j = e0 + (t - ntl) * TB + r;
      if (j < e1) { *uo = ur[j] + 0.f; return j; }
    }
    *uo = neg_inf();
    return -1;
  }
  // The kind of tile t for the query block starting at m0.
  __device__ __forceinline__ int kind(int t, int m0, int window) const {
    if (t < ntl) return SK_LIST;
    const int j0 = e0 + (t - ntl) * TB;
    return sk_band_kind(j0 + TB <= e1 && j0 + TB - 1 <= m0, j0 > m0 + BQ - 1 - window);
  }
  // Position only (-1: none).
  __device__ __forceinline__ int key_j(int t, int r) const {
    if (t < ntl) {
      int rr = t * TB + r;
      return rr < nl ? lj[rr] : -1;
    }
    int j = e0 + (t - ntl) * TB + r;
    return j < e1 ? j : -1;
  }
};

// Weight of key (uj, j) for query i (i < 0: padding row): 0 when not attended.
__device__ __forceinline__ float sk_weight(int i, int j, float uj, float tau_i, float cu_i,
                                           int cj_i, int window) {
  if (j < 0 || j > i) return 0.f;
  if (j > i - window) return 1.f;
  if (!(uj > tau_i) || !in_top(uj, j, cu_i, cj_i)) return 0.f;
  return fminf(uj - tau_i, 1.f);
}

template <int K> struct SkKind { static constexpr int value = K; };
// Whether a tile kind's weights read the keys' positions (band tiles but SK_FULL) and scores.
__host__ __device__ constexpr bool sk_needs_j(int kind) {
  return kind != SK_LIST && kind != SK_FULL;
}
__host__ __device__ constexpr bool sk_needs_u(int kind) {
  return kind != SK_FULL && kind != SK_DIAG;
}

// Weight of a key (list index r for SK_LIST, position j, score uj) for query i (attended list
// prefix na, tau, cut (cu, cj)) in a tile of kind KIND.
template <int KIND>
__device__ __forceinline__ float sk_tile_weight(int r, int na, int i, int j, float uj, float tau,
                                                float cu, int cj, int window) {
  if constexpr (KIND == SK_LIST) return r < na ? fminf(uj - tau, 1.f) : 0.f;
  else if constexpr (KIND == SK_FULL) return 1.f;
  else if constexpr (KIND == SK_DIAG) return j >= 0 && j <= i ? 1.f : 0.f;
  else if constexpr (KIND == SK_EDGE)
    return j > i - window ? 1.f
           : uj > tau && in_top(uj, j, cu, cj) ? fminf(uj - tau, 1.f)
                                                 : 0.f;
  else return sk_weight(i, j, uj, tau, cu, cj, window);
}

// Whether a weight enters the SPARSEK backward (key j strictly inside the support of query i).
template <int KIND>
__device__ __forceinline__ bool sk_in_support(float wv, int i, int j, int window) {
  if constexpr (KIND == SK_FULL || KIND == SK_DIAG) return false;
  else return wv > 0.f && wv < 1.f && (KIND == SK_LIST || j <= i - window);
}

// Calls f(SkKind<K>()) for the run-time kind k (one instantiation of the tile code per kind).
template <typename F>
__device__ __forceinline__ void sk_dispatch(int k, F&& f) {
  if (k == SK_LIST) f(SkKind<SK_LIST>());
  else if (k == SK_FULL) f(SkKind<SK_FULL>());
  else if (k == SK_DIAG) f(SkKind<SK_DIAG>());
  else if (k == SK_EDGE) f(SkKind<SK_EDGE>());
  else f(SkKind<SK_BAND>());
}

// Tiles of query block c of kv row bhk (nlist: per block, the list prefix its queries attend).
__device__ __forceinline__ SkTiles sk_tiles(int c, int bhk, const float* u, const float* lu,
                                            const int* lj, const int* nlist, int T, int window,
                                            int cap, int nb) {
  SkTiles tl;
  long long base = ((long long)bhk * nb + c) * cap;
  tl.lu = lu + base;
  tl.lj = lj + base;
  tl.ur = u + (long long)bhk * T;
  tl.nl = nlist[(long long)bhk * nb + c];
  tl.e0 = min(T, block_start(c, window));
  tl.e1 = min(T, c * BQ + BQ);
  tl.ntl = (tl.nl + TB - 1) / TB;
  tl.nt = tl.ntl + (tl.e1 - tl.e0 + TB - 1) / TB;
  return tl;
}

// Gathering a key tile takes three steps, so that tile t + 2's positions and scores load (global
// memory, one round trip) while tile t computes: sk_fetch_key reads them into registers (one
// key per thread of the first TB), sk_store_key puts them into the tile's shared slots, and after
// a barrier sk_issue_kv starts the async copies of the K and V rows into padded shared tiles.
struct SkKey {
  int j;  // -1: none
  float u;
};

__device__ __forceinline__ SkKey sk_fetch_key(const SkTiles& tl, int t) {
  static_assert(TB <= TC_THREADS, "one key per thread");
  SkKey x{-1, neg_inf()};
  if (threadIdx.x < TB) x.j = tl.key(t, threadIdx.x, &x.u);
  return x;
}

__device__ __forceinline__ void sk_store_key(float* sU, int* sJ, SkKey x) {
  if (threadIdx.x < TB) {
    sJ[threadIdx.x] = x.j;
    sU[threadIdx.x] = x.u;
  }
}

template <typename E, int D>
__device__ __forceinline__ void sk_issue_kv(E* sK, E* sV, const int* sJ, const E* kr,
                                            const E* vr) {
  constexpr int CH = D / 8, PER = TB * 2 * CH / TC_THREADS;
  static_assert(TB * 2 * CH % TC_THREADS == 0, "tile chunks per thread");
#pragma unroll
  for (int n = 0; n < PER; ++n) {
    int idx = threadIdx.x + n * TC_THREADS, r = idx / (2 * CH), ch = idx % (2 * CH);
    bool is_k = ch < CH;
    int cc = is_k ? ch : ch - CH, j = sJ[r];
    E* dst = (is_k ? sK : sV) + r * Pad<D>::SD + cc * 8;
    cp_async16(dst, (is_k ? kr : vr) + (long long)(j >= 0 ? j : 0) * D + cc * 8, j >= 0);
  }
}

// Shared-memory layout of the tensor-core kernels: NQ query-side tiles [BQ][SD], then K and V
// [2][TB][SD], then scores and positions [2][TB].
template <typename E, int D, int NQ>
struct SkSmem {
  static constexpr int SD = Pad<D>::SD;
  static constexpr int BYTES = (NQ * BQ + 4 * TB) * SD * (int)sizeof(E) + 2 * TB * 8;
  E *q, *k, *v;
  float* u;
  int* j;
  __device__ SkSmem(unsigned char* raw) {
    q = reinterpret_cast<E*>(raw);
    k = q + NQ * BQ * SD;
    v = k + 2 * TB * SD;
    u = reinterpret_cast<float*>(v + 2 * TB * SD);
    j = reinterpret_cast<int*>(u + 2 * TB);
  }
};

// Per-thread query rows of the query-major kernels (rows gq and gq + 8 of warp `warp`'s 16).
struct SkRows {
  int i[2], na[2];
  float tau[2], cu[2];
  int cj[2];
  __device__ SkRows(int m0, int warp, int bhk, int T, const float* tau_, const float* cut_u,
                    const int* cut_j, const int* nattend) {
    int gq = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int r = m0 + warp * 16 + gq + hf * 8;
      long long ti = (long long)bhk * T + r;
      bool ok = r < T;
      i[hf] = ok ? r : -1;
      tau[hf] = ok ? tau_[ti] : 0.f;
      cu[hf] = ok ? cut_u[ti] : 0.f;
      cj[hf] = ok ? cut_j[ti] : -1;
      na[hf] = ok ? nattend[ti] : 0;
    }
  }
};

// One tile's online-softmax step on scores s (two row halves per thread): weight(nt, e2, hf) is
// the element's weight (0: not attended); s becomes e^(s - m) * w, m (mrow) and the unweighted
// sum l (lrow) are updated, alpha is the factor the output accumulator must be rescaled by.
template <int N8, typename W>
__device__ __forceinline__ void sk_online_softmax(float (*s)[4], float* mrow, float* lrow,
                                                  float* alpha, float sl2, W&& weight) {
#pragma unroll
  for (int nt = 0; nt < N8; ++nt)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float& x = s[nt][hf * 2 + e2];
        x = weight(nt, e2, hf) > 0.f ? x * sl2 : neg_inf();
      }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float mx = mrow[hf];
#pragma unroll
    for (int nt = 0; nt < N8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][hf * 2], s[nt][hf * 2 + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    float msafe = mx == neg_inf() ? 0.f : mx;
    alpha[hf] = fast_exp2(mrow[hf] - msafe);
    mrow[hf] = mx;
    float ls = 0.f;
#pragma unroll
    for (int nt = 0; nt < N8; ++nt)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        float e = fast_exp2(s[nt][hf * 2 + e2] - msafe);
        ls += e;
        s[nt][hf * 2 + e2] = e * weight(nt, e2, hf);  // e = 0 where the weight is 0
      }
    lrow[hf] = lrow[hf] * alpha[hf] + ls;
  }
}

// The forward's epilogue: l summed over the row's four threads, the LSE (log2-domain m) stored,
// the warp's 16 output rows from r0 stored as acc / l (orow: the head's row 0, rows ld apart).
template <typename E, int D>
__device__ __forceinline__ void sk_fwd_epilogue(E* orow, long long ld, float* lse,
                                                const float (*acc)[4], const float* mrow,
                                                const float* lrow, const SkRows& rw,
                                                long long qrow0, int r0, int T) {
  float inv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = lrow[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[hf] = l > 0.f ? 1.f / l : 0.f;
    if ((threadIdx.x & 3) == 0 && rw.i[hf] >= 0)
      lse[qrow0 + rw.i[hf]] = l > 0.f ? mrow[hf] * LN2 + logf(l) : neg_inf();
  }
  store_acc<E, D>(orow, acc, r0, T, inv[0], inv[1], ld);
}

// dS of one element (score s, dP value dp, weight wv) of query i and key j: P (w dP - delta),
// adding P dP to r and 1 to |S| when the key is strictly inside the query's support.
template <int KIND>
__device__ __forceinline__ float sk_grad_score(float s, float dp, float wv, float l2, float dl,
                                               float sl2, int i, int j, int window, float& r,
                                               float& ns) {
  float a = wv > 0.f ? fast_exp2(s * sl2 - l2) : 0.f;
  if (sk_in_support<KIND>(wv, i, j, window)) {
    r += a * dp;
    ns += 1.f;
  }
  return a * (wv * dp - dl);
}

// The per-row sums r and |S| of the warp's rows (over the row's four threads), stored as r / |S|
// (0 when S is empty).
__device__ __forceinline__ void sk_store_support(float* rmean, const float* r,
                                                 const float* ns, const SkRows& rw,
                                                 long long qrow0) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float rs = r[hf], n = ns[hf];
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    rs += __shfl_xor_sync(0xffffffffu, rs, 2);
    n += __shfl_xor_sync(0xffffffffu, n, 1);
    n += __shfl_xor_sync(0xffffffffu, n, 2);
    int i = rw.i[hf];
    if (i >= 0 && (threadIdx.x & 3) == 0) rmean[qrow0 + i] = n > 0.f ? rs / n : 0.f;
  }
}

// Forward (f16 / bf16): online softmax over the tiles, P = e^s weighted by w before P.V.
template <typename E, int D>
__device__ void skt_fwd(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        E* __restrict__ out, float* __restrict__ lse, SK_PARAMS) {
  constexpr int SD = Pad<D>::SD, N8 = TB / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SkSmem<E, D, 1> sm(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, t4 = lane & 3;
  const int c = blockIdx.x, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  const int bhk = b * Hkv + h / (Hq / Hkv), m0 = c * BQ;
  const long long qrow0 = (long long)bh * T;
  const E* kr = k + (long long)bhk * T * D;
  const E* vr = v + (long long)bhk * T * D;
  SkTiles tl = sk_tiles(c, bhk, u, lu, lj, nlist, T, window, cap, nb);
  SkRows rw(m0, warp, bhk, T, tau, cut_u, cut_j, nattend);
  const float sl2 = scale * LOG2E;

  load_tile<E, BQ, D, TC_THREADS>(sm.q, q + qrow0 * D, m0, T);
  if (tl.nt > 0) sk_store_key(sm.u, sm.j, sk_fetch_key(tl, 0));
  __syncthreads();
  if (tl.nt > 0) sk_issue_kv<E, D>(sm.k, sm.v, sm.j, kr, vr);
  SkKey nx{-1, neg_inf()};
  if (tl.nt > 1) nx = sk_fetch_key(tl, 1);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float acc[D / 8][4];
#pragma unroll
  for (int x = 0; x < D / 8; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
  float mrow[2] = {neg_inf(), neg_inf()}, lrow[2] = {0.f, 0.f};
  int buf = 0;
  for (int t = 0; t < tl.nt; ++t) {
    // Tile t + 1's keys into their slots, tile t + 2's into registers; after the barrier tile
    // t's K and V are visible and tile t + 1's copies start (into the buffers tile t - 1 used).
    if (t + 1 < tl.nt) sk_store_key(sm.u + (buf ^ 1) * TB, sm.j + (buf ^ 1) * TB, nx);
    if (t + 2 < tl.nt) nx = sk_fetch_key(tl, t + 2);
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < tl.nt)
      sk_issue_kv<E, D>(sm.k + (buf ^ 1) * TB * SD, sm.v + (buf ^ 1) * TB * SD,
                        sm.j + (buf ^ 1) * TB, kr, vr);
    cp_async_commit();
    const E* cK = sm.k + buf * TB * SD;
    const E* cV = sm.v + buf * TB * SD;
    const float* cU = sm.u + buf * TB;
    const int* cJ = sm.j + buf * TB;
    float s[N8][4];
#pragma unroll
    for (int x = 0; x < N8; ++x) s[x][0] = s[x][1] = s[x][2] = s[x][3] = 0.f;
    // Q fragments from shared memory at every tile (not held in registers: 3 CTAs per SM).
    gemm_abt<E, D, 1, N8, false>(s, nullptr, sm.q, warp * 16, cK, 0);
    sk_dispatch(tl.kind(t, m0, window), [&](auto kd) {
      constexpr int KIND = decltype(kd)::value;
      // The weight of element (nt, e2) of row half hf (recomputed in the second pass instead of
      // kept in registers: fewer registers, more resident CTAs).
      auto weight = [&](int nt, int e2, int hf) {
        int col = nt * 8 + 2 * t4 + e2;
        int j = sk_needs_j(KIND) ? cJ[col] : 0;
        float uj = sk_needs_u(KIND) ? cU[col] : 0.f;
        return sk_tile_weight<KIND>(t * TB + col, rw.na[hf], rw.i[hf], j, uj, rw.tau[hf],
                                    rw.cu[hf], rw.cj[hf], window);
      };
      float alpha[2];
      sk_online_softmax<N8>(s, mrow, lrow, alpha, sl2, weight);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][0] *= alpha[0];
        acc[dt][1] *= alpha[0];
        acc[dt][2] *= alpha[1];
        acc[dt][3] *= alpha[1];
      }
    });
    gemm_pb<E, D, 1, TB / 16>(acc, s, cV, 0);
    __syncthreads();
    buf ^= 1;
  }
  cp_async_wait<0>();
  sk_fwd_epilogue<E, D>(out + qrow0 * D, D, lse, acc, mrow, lrow, rw, qrow0, m0 + warp * 16, T);
}

// Backward, query-major (f16 / bf16): dq (scaled, in the input dtype: every row belongs to one
// CTA), delta = dO.O and r / |S| (r = sum_S g_w).
// Zeroes this CTA's share of the f32 buffer p[0, n) (n a multiple of 4, p 16-byte aligned) with
// 16-byte stores by threads tid of nthreads: the dQ kernels clear the key-side accumulator for
// the list kernel's atomics (n = 0: nothing), hidden under their math instead of a pass of its own.
__device__ __forceinline__ void sk_zero_share(float* p, long long n, int tid, int nthreads) {
  const long long n4 = n / 4, ncta = (long long)gridDim.x * gridDim.y;
  const long long per = (n4 + ncta - 1) / ncta;
  const long long x0 = ((long long)blockIdx.y * gridDim.x + blockIdx.x) * per;
  const long long x1 = min(n4, x0 + per);
  for (long long x = x0 + tid; x < x1; x += nthreads)
    reinterpret_cast<float4*>(p)[x] = make_float4(0.f, 0.f, 0.f, 0.f);
}

template <typename E, int D>
__device__ void skt_bwd_dq(const E* __restrict__ q, const E* __restrict__ k,
                           const E* __restrict__ v, const E* __restrict__ o,
                           const E* __restrict__ go, const float* __restrict__ lse,
                           E* __restrict__ dq,
                           float* __restrict__ delta, float* __restrict__ rmean,
                           float* __restrict__ dacc, long long nacc,
                           SK_PARAMS) {
  constexpr int SD = Pad<D>::SD, N8 = TB / 8;
  sk_zero_share(dacc, nacc, threadIdx.x, TC_THREADS);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float s_delta[BQ];
  SkSmem<E, D, 2> sm(smem_raw);
  E* sG = sm.q + BQ * SD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  const int c = blockIdx.x, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  const int bhk = b * Hkv + h / (Hq / Hkv), m0 = c * BQ;
  const long long qrow0 = (long long)bh * T;
  const E* kr = k + (long long)bhk * T * D;
  const E* vr = v + (long long)bhk * T * D;
  SkTiles tl = sk_tiles(c, bhk, u, lu, lj, nlist, T, window, cap, nb);
  SkRows rw(m0, warp, bhk, T, tau, cut_u, cut_j, nattend);
  const float sl2 = scale * LOG2E;

  load_tile<E, BQ, D, TC_THREADS>(sm.q, q + qrow0 * D, m0, T);
  load_tile<E, BQ, D, TC_THREADS>(sG, go + qrow0 * D, m0, T);
  if (tl.nt > 0) sk_store_key(sm.u, sm.j, sk_fetch_key(tl, 0));
  __syncthreads();
  if (tl.nt > 0) sk_issue_kv<E, D>(sm.k, sm.v, sm.j, kr, vr);
  SkKey nx{-1, neg_inf()};
  if (tl.nt > 1) nx = sk_fetch_key(tl, 1);
  cp_async_commit();
  // delta = dO.O: each warp its 16 rows, two lanes per row (half a row each), every load of the
  // warp issued at once.
  static_assert(BQ == TC_WARPS * 16, "16 rows per warp");
  {
    const int rr = warp * 16 + (lane >> 1), i = m0 + rr, half = (lane & 1) * (D / 2);
    float x = i < T ? dot_rows<E, D / 2>(o + (qrow0 + i) * D + half, go + (qrow0 + i) * D + half)
                    : 0.f;
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    if ((lane & 1) == 0) {
      s_delta[rr] = x;
      if (i < T) delta[qrow0 + i] = x;
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  float l2[2], dl[2], r[2] = {0.f, 0.f}, ns[2] = {0.f, 0.f};
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    int rr = warp * 16 + gq + hf * 8;
    l2[hf] = rw.i[hf] >= 0 ? lse[qrow0 + rw.i[hf]] * LOG2E : 0.f;
    dl[hf] = s_delta[rr];
  }
  float acc[D / 8][4];
#pragma unroll
  for (int x = 0; x < D / 8; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
  int buf = 0;
  for (int t = 0; t < tl.nt; ++t) {
    // Tile t + 1's keys into their slots, tile t + 2's into registers; after the barrier tile
    // t's K and V are visible and tile t + 1's copies start (into the buffers tile t - 1 used).
    if (t + 1 < tl.nt) sk_store_key(sm.u + (buf ^ 1) * TB, sm.j + (buf ^ 1) * TB, nx);
    if (t + 2 < tl.nt) nx = sk_fetch_key(tl, t + 2);
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < tl.nt)
      sk_issue_kv<E, D>(sm.k + (buf ^ 1) * TB * SD, sm.v + (buf ^ 1) * TB * SD,
                        sm.j + (buf ^ 1) * TB, kr, vr);
    cp_async_commit();
    const E* cK = sm.k + buf * TB * SD;
    const E* cV = sm.v + buf * TB * SD;
    const float* cU = sm.u + buf * TB;
    const int* cJ = sm.j + buf * TB;
    float s[N8][4], dp[N8][4];
#pragma unroll
    for (int x = 0; x < N8; ++x)
      s[x][0] = s[x][1] = s[x][2] = s[x][3] = dp[x][0] = dp[x][1] = dp[x][2] = dp[x][3] = 0.f;
    // Q and dO fragments from shared memory at every tile (not held in registers: fewer
    // registers, more resident CTAs).
    gemm_abt<E, D, 1, N8, false>(s, nullptr, sm.q, warp * 16, cK, 0);
    gemm_abt<E, D, 1, N8, false>(dp, nullptr, sG, warp * 16, cV, 0);
    sk_dispatch(tl.kind(t, m0, window), [&](auto kd) {
      constexpr int KIND = decltype(kd)::value;
#pragma unroll
      for (int nt = 0; nt < N8; ++nt)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {
          int col = nt * 8 + 2 * t4 + e2;
          int j = sk_needs_j(KIND) ? cJ[col] : 0;
          float uj = sk_needs_u(KIND) ? cU[col] : 0.f;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            int x = hf * 2 + e2;
            float wv = sk_tile_weight<KIND>(t * TB + col, rw.na[hf], rw.i[hf], j, uj, rw.tau[hf],
                                            rw.cu[hf], rw.cj[hf], window);
            s[nt][x] = sk_grad_score<KIND>(s[nt][x], dp[nt][x], wv, l2[hf], dl[hf], sl2, rw.i[hf],
                                           j, window, r[hf], ns[hf]);
          }
        }
    });
    gemm_pb<E, D, 1, TB / 16>(acc, s, cK, 0);
    __syncthreads();
    buf ^= 1;
  }
  cp_async_wait<0>();
  sk_store_support(rmean, r, ns, rw, qrow0);
  store_acc<E, D>(dq + qrow0 * D, acc, m0 + warp * 16, T, scale, scale);
}

// Backward, key side (f16 / bf16). dK, dV and du are split by where the keys come from:
// - skt_bwd_dkv (runs first): one CTA per (query block, batch * q head) walks the block's list
//   tiles and adds to the f32 accumulator [dK | dV] and to du with vector atomics (list keys are
//   shared by many query blocks and heads; not bitwise deterministic); the dQ kernel before it
//   zeroed the accumulator (sk_zero_share);
// - skt_bwd_dkv_band (runs last): one CTA per (block of TB keys, batch * kv head) walks the query
//   blocks whose band [e_c, c*BQ + BQ) holds some of its keys, for every query head of the group,
//   accumulates in registers, then adds the list part and writes dK, dV in the input dtype and du
//   (sk_finish_dkv): every key row is written (key j is in the band of its own block).
// Both recompute S^T = K Q^T and dP^T = V dO^T per (16 keys of a warp, BQ queries) step.

// Per-query data of one query block for the key-side backward.
struct SkQStats {
  float tau[BQ], cu[BQ], l2[BQ], dl[BQ], rn[BQ];
  int cj[BQ], i[BQ], na[BQ];
};

// One query's entry of SkQStats: query i (rows qrow0 + i, krow0 + i; padding past T).
struct SkQStat {
  float tau, cu, l2, dl, rn;
  int cj, i, na;
  __device__ __forceinline__ void put(SkQStats& st, int n) const {
    st.i[n] = i;
    st.tau[n] = tau;
    st.cu[n] = cu;
    st.cj[n] = cj;
    st.na[n] = na;
    st.l2[n] = l2;
    st.dl[n] = dl;
    st.rn[n] = rn;
  }
};

__device__ __forceinline__ SkQStat sk_fetch_qstat(int i, long long krow0, long long qrow0, int T,
                                                  const float* tau, const float* cut_u,
                                                  const int* cut_j, const int* nattend,
                                                  const float* lse, const float* delta,
                                                  const float* rmean) {
  SkQStat x{0.f, 0.f, 0.f, 0.f, 0.f, -1, -1, 0};
  if (i < T) {
    const long long ti = krow0 + i, qi = qrow0 + i;
    x.i = i;
    x.tau = tau[ti];
    x.cu = cut_u[ti];
    x.cj = cut_j[ti];
    x.na = nattend[ti];
    x.l2 = lse[qi] * LOG2E;
    x.dl = delta[qi];
    x.rn = rmean[qi];
  }
  return x;
}

// Fills `st` for the query block starting at m0 (rows of q-head row qrow0, kv-head row krow0).
__device__ __forceinline__ void sk_load_qstats(SkQStats& st, int m0, long long krow0,
                                               long long qrow0, int T, const float* tau,
                                               const float* cut_u, const int* cut_j,
                                               const int* nattend, const float* lse,
                                               const float* delta, const float* rmean) {
  for (int n = threadIdx.x; n < BQ; n += TC_THREADS)
    sk_fetch_qstat(m0 + n, krow0, qrow0, T, tau, cut_u, cut_j, nattend, lse, delta, rmean)
        .put(st, n);
}

// The element-wise part of a key-side step: S^T (s) and dP^T (dpt) of this thread's two key rows
// (positions jk, -1: skip; scores uk; list indices rk for SK_LIST) against the BQ queries of `st`
// (C fragments, rows gq and gq + 8 of the warp's 16, column n = nt * 8 + 2 t4 + e2) become
// P^T w (s) and dS^T (dpt), and the score gradient of the keys strictly inside a query's support
// is added to gu.
template <int KIND>
__device__ __forceinline__ void sk_dkv_grads(float (*s)[4], float (*dpt)[4], float* gu,
                                             const SkQStats& st, const int* jk, const float* uk,
                                             const int* rk, float sl2, int window) {
  const int t4 = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      int n = nt * 8 + 2 * t4 + e2, i = st.i[n];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        int x = hf * 2 + e2;
        float wv = jk[hf] < 0 ? 0.f
                              : sk_tile_weight<KIND>(rk[hf], st.na[n], i, jk[hf], uk[hf],
                                                     st.tau[n], st.cu[n], st.cj[n], window);
        float a = wv > 0.f ? fast_exp2(s[nt][x] * sl2 - st.l2[n]) : 0.f;
        float dpv = dpt[nt][x];
        if (sk_in_support<KIND>(wv, i, jk[hf], window)) gu[hf] += a * dpv - st.rn[n];
        s[nt][x] = a * wv;
        dpt[nt][x] = a * (wv * dpv - st.dl[n]);
      }
    }
}

// One step for the warp's 16 keys (rows warp * 16 .. of cK / cV) against the BQ queries of sQ /
// sG (sk_dkv_grads' arguments): adds dV += (a w)^T dO to adv, dK += dS^T Q (unscaled) to adk and
// the score gradient to gu.
template <typename E, int D, int KIND>
__device__ __forceinline__ void skt_dkv_step(float (*adv)[4], float (*adk)[4], float* gu,
                                             const E* cK, const E* cV, const E* sQ, const E* sG,
                                             const SkQStats& st, const int* jk, const float* uk,
                                             const int* rk, float sl2, int window) {
  constexpr int N8 = BQ / 8;
  const int warp = threadIdx.x / 32;
  float s[N8][4], dpt[N8][4];
#pragma unroll
  for (int x = 0; x < N8; ++x)
    s[x][0] = s[x][1] = s[x][2] = s[x][3] = dpt[x][0] = dpt[x][1] = dpt[x][2] = dpt[x][3] = 0.f;
  gemm_abt<E, D, 1, N8, false>(s, nullptr, cK, warp * 16, sQ, 0);
  gemm_abt<E, D, 1, N8, false>(dpt, nullptr, cV, warp * 16, sG, 0);
  sk_dkv_grads<KIND>(s, dpt, gu, st, jk, uk, rk, sl2, window);
  gemm_pb<E, D, 1, BQ / 16>(adv, s, sG, 0);
  gemm_pb<E, D, 1, BQ / 16>(adk, dpt, sQ, 0);
}

// The quad-reduced score gradient of the thread's two key rows (valid in every lane of the quad).
__device__ __forceinline__ float quad_sum(float g) {
  g += __shfl_xor_sync(0xffffffffu, g, 1);
  g += __shfl_xor_sync(0xffffffffu, g, 2);
  return g;
}

// Finishes this thread's two key rows (positions jk, -1: none; C fragments adv, adk; score
// gradients gu) after the list kernel: dK = scale * adk + the list's dK part, dV likewise, written
// in the input dtype (dkr, dvr: the kv head's row 0, rows ld apart), and du += the rows' score
// gradients. list_part(kv, j, col) reads the list's float2 at key j, columns col, col + 1 of dK
// (kv = 0) or dV (kv = 1). fold(j, du_j) runs in every lane of the quad of each written key row,
// du_j (the row's final score gradient) valid in lane t4 = 0.
template <typename E, int D, typename ListPart, typename Fold>
__device__ __forceinline__ void sk_finish_dkv(ListPart&& list_part, float* du, E* dkr, E* dvr,
                                              long long ld, long long krow0, const int* jk,
                                              const float (*adv)[4], const float (*adk)[4],
                                              const float* gu, float scale, Fold&& fold) {
  const int t4 = threadIdx.x & 3;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float gs = quad_sum(gu[hf]);
    int j = jk[hf];
    if (j < 0) continue;
    float duj = 0.f;
    if (t4 == 0) {
      duj = du[krow0 + j] + gs;
      du[krow0 + j] = duj;
    }
    fold(j, duj);
    const long long o = j * ld + 2 * t4;
    float2 lk[D / 8], lv[D / 8];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      lk[dt] = list_part(0, j, dt * 8 + 2 * t4);
      lv[dt] = list_part(1, j, dt * 8 + 2 * t4);
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dkr + o + dt * 8) = pack2<E>(
          adk[dt][hf * 2] * scale + lk[dt].x, adk[dt][hf * 2 + 1] * scale + lk[dt].y);
      *reinterpret_cast<uint32_t*>(dvr + o + dt * 8) =
          pack2<E>(adv[dt][hf * 2] + lv[dt].x, adv[dt][hf * 2 + 1] + lv[dt].y);
    }
  }
}

// Zeroes two sets of NF C fragments (the key-side dK and dV accumulators).
template <int NF>
__device__ __forceinline__ void sk_zero_frags(float (*a)[4], float (*b)[4]) {
#pragma unroll
  for (int x = 0; x < NF; ++x)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[x][e] = b[x][e] = 0.f;
}

// The key block of a band kernel's CTA (blockIdx.x: TB keys from j0; blockIdx.y: batch * kv
// head) and its steps: the query blocks whose band holds some of its keys (c >= kb and
// c * BQ - window < j0 + TB), for every query head of the kv head's group (step p: head p / nc,
// block c_lo + p % nc). jk, uk: this thread's two key rows (warp * 16 + gq + 8 hf; -1 past T)
// and their scores.
struct SkBandCta {
  int kb, T, j0, c_lo, nc, np;
  long long krow0, nkd, qrow0;  // qrow0: the first row of the group's first query head
  int jk[2];
  float uk[2];
  __device__ SkBandCta(const float* u, int B, int Hq, int Hkv, int T_, int D, int window, int nb)
      : T(T_) {
    const int bhk = blockIdx.y, warp = threadIdx.x / 32, gq = (threadIdx.x & 31) >> 2;
    const int g = Hq / Hkv;
    kb = blockIdx.x;
    krow0 = (long long)bhk * T;
    nkd = (long long)B * Hkv * T * D;
    qrow0 = ((long long)(bhk / Hkv) * Hq + (bhk % Hkv) * g) * T;
    j0 = kb * TB;
    c_lo = kb;
    nc = min(nb - 1, (j0 + TB - 1 + window) / BQ) - c_lo + 1;
    np = g * nc;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int j = j0 + warp * 16 + gq + hf * 8;
      jk[hf] = j < T ? j : -1;
      uk[hf] = j < T ? u[krow0 + j] + 0.f : neg_inf();
    }
  }
  // First row of step p's query head.
  __device__ __forceinline__ long long qrow(int p) const { return qrow0 + (long long)(p / nc) * T; }
  __device__ __forceinline__ int block(int p) const { return c_lo + p % nc; }
  // The thread's keys inside block c's band [e_c, c * BQ + BQ) (-1 otherwise: the older ones come
  // from its list), and the step's tile kind from whether every key of the block lies before
  // every query of block c and inside its window (SK_FULL: weight 1, no test and no score
  // gradient; padding queries have zero Q and dO rows).
  __device__ __forceinline__ int band_keys(int c, int window, int* jb) const {
    const int e0 = block_start(c, window), e1 = min(T, c * BQ + BQ);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) jb[hf] = jk[hf] >= e0 && jk[hf] < e1 ? jk[hf] : -1;
    return sk_band_kind(c > kb, j0 > c * BQ + BQ - 1 - window);
  }
};

template <typename E, int D>
__device__ void skt_bwd_dkv_band(SK_DKV_PARAMS) {
  constexpr int SD = Pad<D>::SD;
  static_assert(TB == BQ, "key blocks and query blocks have the same size");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ SkQStats st;
  E* sK = reinterpret_cast<E*>(smem_raw);
  E* sV = sK + TB * SD;
  E* sQ = sV + TB * SD;   // [2][BQ][SD]
  E* sG = sQ + 2 * BQ * SD;  // [2][BQ][SD]
  const SkBandCta kc(u, B, Hq, Hkv, T, D, window, nb);
  const float sl2 = scale * LOG2E;
  load_tile<E, TB, D, TC_THREADS>(sK, k + kc.krow0 * D, kc.j0, T);
  load_tile<E, TB, D, TC_THREADS>(sV, v + kc.krow0 * D, kc.j0, T);
  auto load_q = [&](int p, int buf) {
    const int m0 = kc.block(p) * BQ;
    load_tile<E, BQ, D, TC_THREADS>(sQ + buf * BQ * SD, q + kc.qrow(p) * D, m0, T);
    load_tile<E, BQ, D, TC_THREADS>(sG + buf * BQ * SD, go + kc.qrow(p) * D, m0, T);
  };
  load_q(0, 0);
  cp_async_commit();
  float adv[D / 8][4], adk[D / 8][4], gu[2] = {0.f, 0.f};
#pragma unroll
  for (int x = 0; x < D / 8; ++x)
    adv[x][0] = adv[x][1] = adv[x][2] = adv[x][3] = adk[x][0] = adk[x][1] = adk[x][2] =
        adk[x][3] = 0.f;
  int buf = 0;
  for (int p = 0; p < kc.np; ++p) {
    if (p + 1 < kc.np) load_q(p + 1, buf ^ 1);
    cp_async_commit();
    const int c = kc.block(p);
    sk_load_qstats(st, c * BQ, kc.krow0, kc.qrow(p), T, tau, cut_u, cut_j, nattend, lse, delta,
                   rmean);
    cp_async_wait<1>();
    __syncthreads();
    int jb[2];
    const int kind = kc.band_keys(c, window, jb);
    const E *cQ = sQ + buf * BQ * SD, *cG = sG + buf * BQ * SD;
    sk_dispatch(kind, [&](auto kd) {
      skt_dkv_step<E, D, decltype(kd)::value>(adv, adk, gu, sK, sV, cQ, cG, st, jb, kc.uk, jb, sl2,
                                             window);
    });
    __syncthreads();
    buf ^= 1;
  }
  cp_async_wait<0>();
  auto list_part = [&](int kv, int j, int col) {
    return *reinterpret_cast<const float2*>(dacc + kv * kc.nkd + (kc.krow0 + j) * D + col);
  };
  sk_finish_dkv<E, D>(list_part, du, dk + kc.krow0 * D, dv + kc.krow0 * D, D, kc.krow0, kc.jk, adv,
                      adk, gu, scale, [](int, float) {});
}

// Adds the key-side accumulators of this thread's two key rows (positions jk, -1: none; C
// fragments adv, adk of D columns; score gradients gu) to the f32 accumulator [dK | dV] (dK
// scaled) and to du, with vector atomics.
template <int D>
__device__ __forceinline__ void sk_add_dkv(float* dacc, float* du, long long nkd, long long krow0,
                                           const int* jk, const float (*adv)[4],
                                           const float (*adk)[4], const float* gu, float scale) {
  const int t4 = threadIdx.x & 3;
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    const float(*acc)[4] = pass == 0 ? adv : adk;
    float mul = pass == 0 ? 1.f : scale;
    long long off = pass == 0 ? nkd : 0;
    // Quad pairs swap halves so that each thread adds 4 consecutive floats of one key row:
    // even t4 row gq, odd t4 row gq + 8, columns 4 * (t4 / 2) .. + 4 of each 8-column chunk.
    const int odd = t4 & 1, jr = jk[odd];
    float* dr = dacc + off + (krow0 + (jr >= 0 ? jr : 0)) * D + 4 * (t4 >> 1);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      float a0 = acc[dt][0] * mul, a1 = acc[dt][1] * mul, b0 = acc[dt][2] * mul,
            b1 = acc[dt][3] * mul;
      float r0 = __shfl_xor_sync(0xffffffffu, odd ? a0 : b0, 1);
      float r1 = __shfl_xor_sync(0xffffffffu, odd ? a1 : b1, 1);
      if (jr >= 0) {
        if (odd) red_add4(dr + dt * 8, r0, r1, b0, b1);
        else red_add4(dr + dt * 8, a0, a1, r0, r1);
      }
    }
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float gs = quad_sum(gu[hf]);
    if (t4 == 0 && jk[hf] >= 0 && gs != 0.f) atomicAdd(du + krow0 + jk[hf], gs);
  }
}

template <typename E, int D>
__device__ void skt_bwd_dkv(SK_DKV_PARAMS) {
  constexpr int SD = Pad<D>::SD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ SkQStats st;
  SkSmem<E, D, 2> sm(smem_raw);
  E* sG = sm.q + BQ * SD;
  const int warp = threadIdx.x / 32, gq = (threadIdx.x & 31) >> 2;
  const int c = blockIdx.x, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  const int bhk = b * Hkv + h / (Hq / Hkv), m0 = c * BQ;
  const long long qrow0 = (long long)bh * T, krow0 = (long long)bhk * T;
  const long long nkd = (long long)B * Hkv * T * D;
  const E* kr = k + krow0 * D;
  const E* vr = v + krow0 * D;
  SkTiles tl = sk_tiles(c, bhk, u, lu, lj, nlist, T, window, cap, nb);
  if (tl.ntl == 0) return;  // the band is skt_bwd_dkv_band's
  const float sl2 = scale * LOG2E;

  load_tile<E, BQ, D, TC_THREADS>(sm.q, q + qrow0 * D, m0, T);
  load_tile<E, BQ, D, TC_THREADS>(sG, go + qrow0 * D, m0, T);
  if (tl.ntl > 0) sk_store_key(sm.u, sm.j, sk_fetch_key(tl, 0));
  __syncthreads();
  if (tl.ntl > 0) sk_issue_kv<E, D>(sm.k, sm.v, sm.j, kr, vr);
  SkKey nx{-1, neg_inf()};
  if (tl.ntl > 1) nx = sk_fetch_key(tl, 1);
  cp_async_commit();
  sk_load_qstats(st, m0, krow0, qrow0, T, tau, cut_u, cut_j, nattend, lse, delta, rmean);
  int buf = 0;
  for (int t = 0; t < tl.ntl; ++t) {
    // Tile t + 1's keys into their slots, tile t + 2's into registers; after the barrier tile
    // t's K and V are visible and tile t + 1's copies start (into the buffers tile t - 1 used).
    if (t + 1 < tl.ntl) sk_store_key(sm.u + (buf ^ 1) * TB, sm.j + (buf ^ 1) * TB, nx);
    if (t + 2 < tl.ntl) nx = sk_fetch_key(tl, t + 2);
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < tl.ntl)
      sk_issue_kv<E, D>(sm.k + (buf ^ 1) * TB * SD, sm.v + (buf ^ 1) * TB * SD,
                        sm.j + (buf ^ 1) * TB, kr, vr);
    cp_async_commit();
    const float* cU = sm.u + buf * TB;
    const int* cJ = sm.j + buf * TB;
    int jk[2], rk[2];
    float uk[2], gu[2] = {0.f, 0.f};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      rk[hf] = t * TB + warp * 16 + gq + hf * 8;
      jk[hf] = cJ[warp * 16 + gq + hf * 8];
      uk[hf] = cU[warp * 16 + gq + hf * 8];
    }
    float adv[D / 8][4], adk[D / 8][4];
#pragma unroll
    for (int x = 0; x < D / 8; ++x)
      adv[x][0] = adv[x][1] = adv[x][2] = adv[x][3] = adk[x][0] = adk[x][1] = adk[x][2] =
          adk[x][3] = 0.f;
    skt_dkv_step<E, D, SK_LIST>(adv, adk, gu, sm.k + buf * TB * SD, sm.v + buf * TB * SD, sm.q,
                                sG, st, jk, uk, rk, sl2, window);
    sk_add_dkv<D>(dacc, du, nkd, krow0, jk, adv, adk, gu, scale);
    __syncthreads();
    buf ^= 1;
  }
  cp_async_wait<0>();
}

// dK, dV (f32 [dk | dv], n elements each, n a multiple of 4) to the input dtype.
// ---------------------------------------------------------------------------------------------
// Hopper (sm_90a) forward and dQ (f16 / bf16, head_dim 64 and 128): the same tile walk as skt_fwd
// and skt_bwd_dq, with warpgroup MMA and warp specialisation (as flash_attn.cu's fwd_wgmma). One
// CTA of two warpgroups per (block of BQ queries, batch * q head):
// - the producer warpgroup copies the positions of the block's list into shared memory, then
//   gathers tile t's K and V rows with cp.async into stage t % S of 128-byte-swizzled shared
//   tiles, the keys' scores with the V rows; "full" mbarriers complete when a stage has landed,
//   "empty" ones when the consumer's four warps have finished reading it;
// - the consumer warpgroup holds the block's 64 query rows (Q, and dO for dQ) in shared memory
//   and runs S = Q K^T (and dP = dO V^T) from shared memory, then O += (P * w) V (dQ += dS K) with
//   the left operand from registers. The forward issues S of tile t + 1 together with P V of tile
//   t, so the weights and softmax of t + 1 overlap the tensor cores' P V.
// Weights, masks and per-row statistics are those of the mma.sync kernels. Built for every target
// (empty bodies before sm_90a); the host launches them only on compute capability 9.0.
// ---------------------------------------------------------------------------------------------

#define SKW_THREADS 256
// Registers: the launch gives every thread 65536 / (SKW_THREADS * MINB) (MINB resident CTAs per
// SM, rounded down to a multiple of 8); the producer warpgroup gives back all but
// SKW_PRODUCER_REGS, the consumer takes them (at most 240).
#define SKW_PRODUCER_REGS 24
__host__ __device__ constexpr int skw_consumer_regs(int minb) {
  return (2 * (65536 / (SKW_THREADS * minb) / 8 * 8) - SKW_PRODUCER_REGS) / 8 * 8 > 240
             ? 240
             : (2 * (65536 / (SKW_THREADS * minb) / 8 * 8) - SKW_PRODUCER_REGS) / 8 * 8;
}

// Shared memory of the Hopper kernels: NQ query-side tiles [BQ][D] (Q, dO), S stages of K and V
// tiles [TB][D] (all 128-byte swizzled, 1024-byte aligned: the host adds 1 KB of slack), the
// stages' key scores [S][TB], the stages' mbarriers, then the positions of the block's list
// [cap rounded up to a multiple of 4].
template <typename E, int D, int NQ, int S>
struct SkwSmem {
  E *q, *k, *v;
  float* u;
  uint64_t *full_k, *full_v, *empty_k, *empty_v;
  int* lj;
  __device__ SkwSmem(unsigned char* raw) {
    q = reinterpret_cast<E*>(raw + ((1024 - (smem_addr(raw) & 1023)) & 1023));
    k = q + NQ * BQ * D;
    v = k + S * TB * D;
    u = reinterpret_cast<float*>(v + S * TB * D);
    full_k = reinterpret_cast<uint64_t*>(u + S * TB);
    full_v = full_k + S;
    empty_k = full_v + S;
    empty_v = empty_k + S;
    lj = reinterpret_cast<int*>(empty_v + S);
  }
  // Thread 0: every stage's barriers (full: the producer's 128 threads; empty: 4 consumer warps).
  __device__ void init() const {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    if (threadIdx.x == 0)
#pragma unroll
      for (int i = 0; i < S; ++i) {
        mbar_init(full_k + i, 128);
        mbar_init(full_v + i, 128);
        mbar_init(empty_k + i, 4);
        mbar_init(empty_v + i, 4);
      }
#endif
  }
};

// The producer warpgroup (threads 0..127). First the positions of the block's attended list
// prefix into shared memory (so that no tile waits on a global index read), then per tile t its K
// rows into stage t % S (full_k), its V rows and the keys' scores (full_v), each stage reused
// once the consumer released it. A thread copies 16-byte chunk cc of the tile's rows r0, r0 + RS,
// ... (the same swizzle for all of them), gathering list tiles by position and band tiles
// contiguously; missing keys are zero-filled (their weight is 0).
template <typename E, int D, int NQ, int S>
__device__ void skw_produce(const SkwSmem<E, D, NQ, S>& sm, const SkTiles& tl, const E* kr,
                            const E* vr, long long kst) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int CH = D / 8, RS = 128 / CH, NR = TB / RS;
  static_assert(RS % 8 == 0 && TB % RS == 0, "skw_produce: tile shape");
  const int tid = threadIdx.x, r0 = tid / CH, cc = tid % CH;
  const int soff = (cc / 8) * TB * 64 + r0 * 64 + ((cc % 8) ^ (r0 & 7)) * 8;
  for (int x = tid; x < tl.nl; x += 128) cp_async4(sm.lj + x, tl.lj + x, true);
  cp_async_commit();
  cp_async_wait<0>();
  named_bar_sync(2, 128);
  for (int t = 0; t < tl.nt; ++t) {
    int jr[NR];
#pragma unroll
    for (int m = 0; m < NR; ++m) {
      int r = r0 + m * RS;
      if (t < tl.ntl) {
        int rr = t * TB + r;
        jr[m] = rr < tl.nl ? sm.lj[rr] : -1;
      } else {
        int j = tl.e0 + (t - tl.ntl) * TB + r;
        jr[m] = j < tl.e1 ? j : -1;
      }
    }
    const int st = t % S;
    const uint32_t parity = ((t / S) & 1) ^ 1;
    if (t >= S) mbar_wait(sm.empty_k + st, parity);
    E* dk = sm.k + st * TB * D + soff;
#pragma unroll
    for (int m = 0; m < NR; ++m)
      cp_async16(dk + m * RS * 64, kr + max(jr[m], 0) * kst + cc * 8, jr[m] >= 0);
    mbar_arrive_cp_async(sm.full_k + st);
    if (t >= S) mbar_wait(sm.empty_v + st, parity);
    E* dv = sm.v + st * TB * D + soff;
#pragma unroll
    for (int m = 0; m < NR; ++m)
      cp_async16(dv + m * RS * 64, vr + max(jr[m], 0) * kst + cc * 8, jr[m] >= 0);
    if (tid < TB) {
      bool ok;
      const float* src;
      if (t < tl.ntl) {
        int rr = t * TB + tid;
        ok = rr < tl.nl;
        src = tl.lu + (ok ? rr : 0);
      } else {
        int j = tl.e0 + (t - tl.ntl) * TB + tid;
        ok = j < tl.e1;
        src = tl.ur + (ok ? j : 0);
      }
      cp_async4(sm.u + st * TB + tid, src, ok);
    }
    mbar_arrive_cp_async(sm.full_v + st);
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The weight of element (nt, e2) of row half hf of tile t (kind KIND; scores cU of the stage).
template <int KIND>
__device__ __forceinline__ float skw_weight(const SkTiles& tl, const SkRows& rw, const float* cU,
                                            int t, int nt, int e2, int hf, int window) {
  int col = nt * 8 + 2 * (threadIdx.x & 3) + e2;
  int j = sk_needs_j(KIND) ? tl.e0 + (t - tl.ntl) * TB + col : 0;
  float uj = sk_needs_u(KIND) ? cU[col] : 0.f;
  return sk_tile_weight<KIND>(t * TB + col, rw.na[hf], rw.i[hf], j, uj, rw.tau[hf], rw.cu[hf],
                              rw.cj[hf], window);
}

// Where the Hopper kernels find the rows of their element tensors: row t of (batch b, head h) of
// a tensor X starts at X + b * s[0] + h * s[1] + t * s[2] (elements), with s = q for q and dq,
// kv for k, v, dk and dv, o for the output and its gradient. Contiguous (b, h, T, D) tensors have
// s = (h * T * D, T * D, D); heads packed in projection rows of width W, (b, T, W), have
// (T * W, D, W). (The f32 statistics and accumulators stay contiguous, indexed by qrow0 / krow0.)
// A SparseK scorer folded into the packed projection (skw_bwd_dkv_band writes its gradient):
// lin points at the scorer's first column of the gradient's rows (strides of the kv rows), whose
// width columns are the Hkv heads' scores' linear parts, then zeros; rho are the raw slopes (Hkv,
// positions offset + j) and drho their gradient, zeroed before. lin = null: no scorer.
template <typename E>
struct SkScorerFold {
  E* lin;
  const float* rho;
  float* drho;
  int width, offset;
};

struct SkwStrides {
  long long q[3], kv[3], o[3];
  __device__ __forceinline__ long long q_off(int b, int h) const { return b * q[0] + h * q[1]; }
  __device__ __forceinline__ long long kv_off(int b, int h) const { return b * kv[0] + h * kv[1]; }
  __device__ __forceinline__ long long o_off(int b, int h) const { return b * o[0] + h * o[1]; }
};

// What a Hopper kernel's CTA works on: query block c of (batch, q head) bh, its kv row bhk and
// that row's K and V (rows kst apart), the offsets of the query head's rows in q / dq (qoff) and
// in the output / its gradient (ooff), and the block's tiles.
template <typename E, int D>
struct SkwCta {
  int c, bhk, m0;
  long long qrow0, qoff, ooff, kst;
  const E *kr, *vr;
  SkTiles tl;
  __device__ SkwCta(const E* k, const E* v, const SkwStrides& ws, SK_PARAMS) {
    c = blockIdx.x;
    const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
    bhk = b * Hkv + hk;
    m0 = c * BQ;
    qrow0 = (long long)bh * T;
    qoff = ws.q_off(b, h);
    ooff = ws.o_off(b, h);
    kst = ws.kv[2];
    kr = k + ws.kv_off(b, hk);
    vr = v + ws.kv_off(b, hk);
    tl = sk_tiles(c, bhk, u, lu, lj, nlist, T, window, cap, nb);
  }
};

// Splits the CTA: the producer warpgroup streams the tiles, then zeroes the CTA's share of
// zero[0, nzero) (sk_zero_share) and returns true (the caller returns); the consumer warpgroup
// takes its registers and gets false.
template <typename E, int D, int NQ, int S, int MINB>
__device__ __forceinline__ bool skw_split_producer(const SkwSmem<E, D, NQ, S>& sm,
                                                   const SkwCta<E, D>& cta,
                                                   float* zero = nullptr, long long nzero = 0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  sm.init();
  __syncthreads();
  if (threadIdx.x < 128) {
    setmaxnreg_dec<SKW_PRODUCER_REGS>();
    skw_produce<E, D, NQ, S>(sm, cta.tl, cta.kr, cta.vr, cta.kst);
    sk_zero_share(zero, nzero, threadIdx.x, 128);
    return true;
  }
  setmaxnreg_inc<skw_consumer_regs(MINB)>();
#endif
  return false;
}

// Issues acc = A B^T for the consumer's 64 rows A (sA, [BQ][D]) and a stage's 64 keys B (sB,
// [TB][D]), both swizzled in shared memory (one commit group is the caller's).
template <typename E, int D>
__device__ __forceinline__ void skw_issue_abt(float (*acc)[4], const E* sA, const E* sB) {
  const uint64_t da = sw128_desc(sA, 16), db = sw128_desc(sB, 16);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_ss<E, TB>(acc, sw128_desc_add(da, ((kk / 4) * BQ * 64 + (kk % 4) * 16) * sizeof(E)),
                    sw128_desc_add(db, ((kk / 4) * TB * 64 + (kk % 4) * 16) * sizeof(E)), kk > 0);
}

// Issues acc += P B for P in registers (pa: the A fragments of a 64 x TB tile) and a stage's 64
// rows B (sB, [TB][D], read MN-major), then commits.
template <typename E, int D>
__device__ __forceinline__ void skw_issue_pb(float (*acc)[4], const uint32_t (*pa)[4],
                                             const E* sB) {
  const uint64_t db = sw128_desc(sB, TB * 128);
#pragma unroll
  for (int kk = 0; kk < TB / 16; ++kk)
    wgmma_rs_tb<E, D>(acc, pa[kk], sw128_desc_add(db, kk * 16 * 64 * sizeof(E)));
  wgmma_commit();
}

// The C fragments of a 64 x TB tile (s) as the A fragments of the next product (two adjacent
// n-tiles make one k-step, as in mma.sync's gemm_pb).
template <typename E>
__device__ __forceinline__ void skw_pack_a(uint32_t (*pa)[4], const float (*s)[4]) {
#pragma unroll
  for (int kk = 0; kk < TB / 16; ++kk) {
    pa[kk][0] = pack2<E>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<E>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<E>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<E>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

template <typename E, int D, int S, int MINB>
__device__ void skw_fwd(const E* __restrict__ q, const E* __restrict__ k, const E* __restrict__ v,
                        E* __restrict__ out, float* __restrict__ lse, SkwStrides ws, SK_PARAMS) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int N8 = TB / 8, DT = D / 8;
  static_assert(D % 64 == 0, "skw_fwd: head_dim 64 or 128");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SkwSmem<E, D, 1, S> sm(smem_raw);
  const SkwCta<E, D> cta(k, v, ws, SK_ARGS);
  if (skw_split_producer<E, D, 1, S, MINB>(sm, cta)) return;
  const SkTiles& tl = cta.tl;
  const int m0 = cta.m0, bhk = cta.bhk;
  const long long qrow0 = cta.qrow0;
  const int tid = threadIdx.x - 128, warp = tid / 32, lane = tid & 31;
  load_tile_sw128<E, BQ, D, 128>(sm.q, q + cta.qoff, m0, T, tid, ws.q[2]);
  cp_async_commit();
  const SkRows rw(m0, warp, bhk, T, tau, cut_u, cut_j, nattend);
  const float sl2 = scale * LOG2E;

  float acc[DT][4];
#pragma unroll
  for (int x = 0; x < DT; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
  float mrow[2] = {neg_inf(), neg_inf()}, lrow[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
  float s[N8][4];
  uint32_t pa[TB / 16][4];
  auto issue_qk = [&](const E* cK) {
    skw_issue_abt<E, D>(s, sm.q, cK);
    wgmma_commit();
  };
  auto issue_pv = [&](const E* cV) { skw_issue_pb<E, D>(acc, pa, cV); };
  auto wait_full = [&](uint64_t* bar, int i) { mbar_wait(bar + i % S, (i / S) & 1); };
  auto release = [&](uint64_t* bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  // Tile t (the i-th visited) after its S = Q K^T: weights, online softmax (alpha: the rescale
  // of O, applied by rescale_to_pa once the previous P V completed), s = e^(s - m) * w.
  auto softmax = [&](int t, int i) {
    wgmma_fence_regs<N8>(s);
    const int kind = tl.kind(t, m0, window);
    if (sk_needs_u(kind)) wait_full(sm.full_v, i);  // the stage's key scores
    const float* cU = sm.u + (i % S) * TB;
    sk_dispatch(kind, [&](auto kd) {
      constexpr int KIND = decltype(kd)::value;
      // The weights stay in registers for the second pass (recomputing them there, each a
      // shared-memory read of the key's score and the weight test, cost 3 ms at B4 H48 16k).
      float w[N8][4];
#pragma unroll
      for (int nt = 0; nt < N8; ++nt)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf)
            w[nt][hf * 2 + e2] = skw_weight<KIND>(tl, rw, cU, t, nt, e2, hf, window);
      sk_online_softmax<N8>(s, mrow, lrow, alpha, sl2,
                            [&](int nt, int e2, int hf) { return w[nt][hf * 2 + e2]; });
    });
  };
  auto rescale_to_pa = [&]() {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }
    skw_pack_a<E>(pa, s);
    wgmma_fence_regs<DT>(acc);
    wgmma_fence_regs_a<TB / 16>(pa);
  };

  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync(1, 128);  // the Q rows are in shared memory
  // Every block has at least one tile (its band holds its own keys). No wgmma is issued
  // conditionally inside the loop (a branch between wgmmas makes ptxas serialise them).
  wait_full(sm.full_k, 0);
  fence_proxy_async();
  wgmma_fence();
  issue_qk(sm.k);
  wgmma_wait<0>();
  release(sm.empty_k);
  softmax(0, 0);
  rescale_to_pa();  // O is still zero
  int i = 0;
  for (; i + 1 < tl.nt; ++i) {
    const int sk = (i + 1) % S, sv = i % S;
    wait_full(sm.full_k, i + 1);
    wait_full(sm.full_v, i);
    fence_proxy_async();
    wgmma_fence();
    issue_qk(sm.k + sk * TB * D);
    issue_pv(sm.v + sv * TB * D);
    wgmma_wait<1>();
    release(sm.empty_k + sk);
    softmax(i + 1, i + 1);
    wgmma_wait<0>();
    release(sm.empty_v + sv);
    wgmma_fence_regs<DT>(acc);
    wgmma_fence_regs_a<TB / 16>(pa);
    rescale_to_pa();
  }
  wait_full(sm.full_v, i);
  fence_proxy_async();
  wgmma_fence();
  issue_pv(sm.v + (i % S) * TB * D);
  wgmma_wait<0>();
  wgmma_fence_regs<DT>(acc);

  sk_fwd_epilogue<E, D>(out + cta.ooff, ws.o[2], lse, acc, mrow, lrow, rw, qrow0, m0 + warp * 16, T);
#endif
}

// dQ (scaled, in the input dtype), delta = dO.O and r / |S| per row, as skt_bwd_dq.
// Per tile: S = Q K^T and dP = dO V^T, then dS = P (w dP - delta) and dQ += dS K, the next tile's
// S and dP issued ahead of this tile's dQ.
template <typename E, int D, int S, int MINB>
__device__ void skw_bwd_dq(const E* __restrict__ q, const E* __restrict__ k,
                           const E* __restrict__ v, const E* __restrict__ o,
                           const E* __restrict__ go, const float* __restrict__ lse,
                           E* __restrict__ dq, float* __restrict__ delta,
                           float* __restrict__ rmean,
                           float* __restrict__ dacc, long long nacc, SkwStrides ws,
                           SK_PARAMS) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int N8 = TB / 8, DT = D / 8;
  static_assert(D % 64 == 0, "skw_bwd_dq: head_dim 64 or 128");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SkwSmem<E, D, 2, S> sm(smem_raw);
  E* sG = sm.q + BQ * D;
  const SkwCta<E, D> cta(k, v, ws, SK_ARGS);
  if (skw_split_producer<E, D, 2, S, MINB>(sm, cta, dacc, nacc)) return;
  const SkTiles& tl = cta.tl;
  const int m0 = cta.m0, bhk = cta.bhk;
  const long long qrow0 = cta.qrow0, ost = ws.o[2];
  const int tid = threadIdx.x - 128, warp = tid / 32, lane = tid & 31, gq = lane >> 2;
  load_tile_sw128<E, BQ, D, 128>(sm.q, q + cta.qoff, m0, T, tid, ws.q[2]);
  load_tile_sw128<E, BQ, D, 128>(sG, go + cta.ooff, m0, T, tid, ost);
  cp_async_commit();
  const SkRows rw(m0, warp, bhk, T, tau, cut_u, cut_j, nattend);
  const float sl2 = scale * LOG2E;
  // delta = dO.O of the warp's 16 rows, two lanes per row; the lane of (row, half) keeps it for
  // the rows its fragments hold.
  float dl[2], l2[2];
  {
    const int rr = warp * 16 + (lane >> 1), i = m0 + rr, half = (lane & 1) * (D / 2);
    const long long oi = cta.ooff + i * ost + half;
    float x = i < T ? dot_rows<E, D / 2>(o + oi, go + oi) : 0.f;
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    if ((lane & 1) == 0 && i < T) delta[qrow0 + i] = x;
    // Row gq + 8 hf of the warp is held by lanes 2 (gq + 8 hf) and 2 (gq + 8 hf) + 1.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      dl[hf] = __shfl_sync(0xffffffffu, x, 2 * (gq + 8 * hf));
      l2[hf] = rw.i[hf] >= 0 ? lse[qrow0 + rw.i[hf]] * LOG2E : 0.f;
    }
  }
  float acc[DT][4], r[2] = {0.f, 0.f}, ns[2] = {0.f, 0.f};
#pragma unroll
  for (int x = 0; x < DT; ++x) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
  float s[N8][4], dp[N8][4];
  uint32_t pa[TB / 16][4];
  auto wait_full = [&](uint64_t* bar, int i) { mbar_wait(bar + i % S, (i / S) & 1); };

  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync(1, 128);  // the Q and dO rows are in shared memory
  // S = Q K^T and dP = dO V^T of tile t (one commit group).
  auto issue_sdp = [&](int t) {
    const E* cK = sm.k + (t % S) * TB * D;
    const E* cV = sm.v + (t % S) * TB * D;
    wait_full(sm.full_k, t);
    wait_full(sm.full_v, t);
    fence_proxy_async();
    wgmma_fence();
    skw_issue_abt<E, D>(s, sm.q, cK);
    skw_issue_abt<E, D>(dp, sG, cV);
    wgmma_commit();
  };
  // dS = P (w dP - delta) of tile t into s (its S and dP complete), with r and |S|.
  auto grad_scores = [&](int t) {
    wgmma_fence_regs<N8>(s);
    wgmma_fence_regs<N8>(dp);
    const float* cU = sm.u + (t % S) * TB;
    sk_dispatch(tl.kind(t, m0, window), [&](auto kd) {
      constexpr int KIND = decltype(kd)::value;
#pragma unroll
      for (int nt = 0; nt < N8; ++nt)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int x = hf * 2 + e2;
            float wv = skw_weight<KIND>(tl, rw, cU, t, nt, e2, hf, window);
            int j = sk_needs_j(KIND) ? tl.e0 + (t - tl.ntl) * TB + nt * 8 + 2 * (lane & 3) + e2
                                     : 0;
            s[nt][x] = sk_grad_score<KIND>(s[nt][x], dp[nt][x], wv, l2[hf], dl[hf], sl2, rw.i[hf],
                                           j, window, r[hf], ns[hf]);
          }
    });
  };
  // dS to the A fragments of dQ += dS K (the previous tile's dQ complete).
  auto to_pa = [&]() {
    skw_pack_a<E>(pa, s);
    wgmma_fence_regs<DT>(acc);
    wgmma_fence_regs_a<TB / 16>(pa);
  };
  auto issue_dq = [&](int t) {
    wgmma_fence();
    skw_issue_pb<E, D>(acc, pa, sm.k + (t % S) * TB * D);
  };
  // Software-pipelined: S and dP of tile t + 1 are issued before dQ of tile t, so dS of t + 1 is
  // computed while the tensor cores run dQ of t. No wgmma is issued conditionally inside the loop.
  issue_sdp(0);
  wgmma_wait<0>();
  grad_scores(0);
  to_pa();
  int t = 0;
  for (; t + 1 < tl.nt; ++t) {
    issue_sdp(t + 1);
    issue_dq(t);
    wgmma_wait<1>();  // S and dP of tile t + 1 (committed first) complete
    grad_scores(t + 1);
    wgmma_wait<0>();
    if (lane == 0) {
      mbar_arrive(sm.empty_k + t % S);
      mbar_arrive(sm.empty_v + t % S);
    }
    to_pa();
  }
  issue_dq(t);
  wgmma_wait<0>();
  wgmma_fence_regs<DT>(acc);
  sk_store_support(rmean, r, ns, rw, qrow0);
  store_acc<E, D>(dq + cta.qoff, acc, m0 + warp * 16, T, scale, scale, ws.q[2]);
#endif
}

// ---------------------------------------------------------------------------------------------
// Hopper band part of dK, dV and du (f16 / bf16, head_dim 64 and 128), replacing
// skt_bwd_dkv_band on compute capability 9.0: the same walk (one warpgroup per block of TB keys
// and batch * kv head, over the query blocks whose band holds them, every query head of the
// group), with S^T, dP^T, dV and dK on warpgroup MMA (the keys as M, as in flash_attn.cu's
// bwd_wgmma) and the element-wise step of the mma.sync kernel. Q and dO tiles are double-buffered
// with cp.async; a step's query statistics are read into registers during the previous step.
template <typename E, int D>
__device__ void skw_bwd_dkv_band(SKW_DKV_PARAMS, SkScorerFold<E> fl) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int N8 = BQ / 8, DT = D / 8;
  static_assert(D % 64 == 0 && TB == BQ, "skw_bwd_dkv_band: head_dim 64 or 128");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sK = reinterpret_cast<E*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  E* sV = sK + TB * D;
  E* sQ = sV + TB * D;       // [2][BQ * D]
  E* sG = sQ + 2 * BQ * D;   // [2][BQ * D]
  SkQStats* st = reinterpret_cast<SkQStats*>(sG + 2 * BQ * D);  // [2]
  float* sAcc = reinterpret_cast<float*>(st + 2);  // [TB][D]: the list's dK rows
  const int tid = threadIdx.x;
  const SkBandCta kc(u, B, Hq, Hkv, T, D, window, nb);
  // The list kernel's dK / dV rows of the CTA's keys, staged during the last step for the finish
  // (f32, 16-byte chunks XOR-swizzled by row): dK in sAcc, dV rows [0, TB / 2) and [TB / 2, TB) in
  // the free Q and dO buffers fb.
  auto acc_row = [&](int kv, int r, int fb) {
    return kv == 0 ? sAcc + r * D
                   : reinterpret_cast<float*>((r < TB / 2 ? sQ : sG) + fb * BQ * D) +
                         (r % (TB / 2)) * D;
  };
  auto stage_acc = [&](int fb) {
    for (int x = tid; x < TB * D / 2; x += 128) {
      const int kv = x / (TB * D / 4), r = x / (D / 4) % TB, c4 = x % (D / 4), j = kc.j0 + r;
      cp_async16(acc_row(kv, r, fb) + (c4 ^ (r & 7)) * 4,
                 dacc + kv * kc.nkd + (kc.krow0 + min(j, T - 1)) * D + c4 * 4, j < T);
    }
    cp_async_commit();
  };
  const float sl2 = scale * LOG2E;
  // The kv head's rows in k, v, dk, dv; step p's query head (p / nc of the group) in q and dO.
  const int b = blockIdx.y / Hkv, hk = blockIdx.y % Hkv;
  const long long kvoff = ws.kv_off(b, hk);
  load_tile_sw128<E, TB, D, 128>(sK, k + kvoff, kc.j0, T, tid, ws.kv[2]);
  load_tile_sw128<E, TB, D, 128>(sV, v + kvoff, kc.j0, T, tid, ws.kv[2]);
  auto load_q = [&](int p, int buf) {
    const int m0 = kc.block(p) * BQ, h = hk * (Hq / Hkv) + p / kc.nc;
    load_tile_sw128<E, BQ, D, 128>(sQ + buf * BQ * D, q + ws.q_off(b, h), m0, T, tid, ws.q[2]);
    load_tile_sw128<E, BQ, D, 128>(sG + buf * BQ * D, go + ws.o_off(b, h), m0, T, tid, ws.o[2]);
    cp_async_commit();
  };
  auto fetch = [&](int p) {
    return sk_fetch_qstat(kc.block(p) * BQ + tid, kc.krow0, kc.qrow(p), T, tau, cut_u, cut_j,
                          nattend, lse, delta, rmean);
  };
  load_q(0, 0);
  if (tid < BQ) fetch(0).put(st[0], tid);
  float adk[DT][4], adv[DT][4], gu[2] = {0.f, 0.f};
  sk_zero_frags<DT>(adk, adv);
  float s[N8][4], dp[N8][4];
  uint32_t pa[BQ / 16][4], da[BQ / 16][4];
  int buf = 0;
  for (int p = 0; p < kc.np; ++p) {
    // Step p's Q, dO and statistics are visible; every warp is done with step p - 1's buffers.
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    SkQStat nx;
    if (p + 1 < kc.np) {
      load_q(p + 1, buf ^ 1);
      if (tid < BQ) nx = fetch(p + 1);
    } else {
      stage_acc(buf ^ 1);
    }
    const E* cQ = sQ + buf * BQ * D;
    const E* cG = sG + buf * BQ * D;
    wgmma_fence();
    skw_issue_abt<E, D>(s, sK, cQ);
    skw_issue_abt<E, D>(dp, sV, cG);
    wgmma_commit();
    int jb[2];
    const int kind = kc.band_keys(kc.block(p), window, jb);
    wgmma_wait<0>();
    wgmma_fence_regs<N8>(s);
    wgmma_fence_regs<N8>(dp);
    sk_dispatch(kind, [&](auto kd) {
      sk_dkv_grads<decltype(kd)::value>(s, dp, gu, st[buf], jb, kc.uk, jb, sl2, window);
    });
    skw_pack_a<E>(pa, s);
    skw_pack_a<E>(da, dp);
    wgmma_fence_regs_a<BQ / 16>(pa);
    wgmma_fence_regs_a<BQ / 16>(da);
    wgmma_fence();
    skw_issue_pb<E, D>(adv, pa, cG);
    skw_issue_pb<E, D>(adk, da, cQ);
    if (p + 1 < kc.np && tid < BQ) nx.put(st[buf ^ 1], tid);
    wgmma_wait<0>();
    wgmma_fence_regs<DT>(adv);
    wgmma_fence_regs<DT>(adk);
    buf ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();
  // buf is the staging buffers' index again (flipped once more after the last step).
  auto list_part = [&](int kv, int j, int col) {
    const int r = j - kc.j0;
    return *reinterpret_cast<const float2*>(acc_row(kv, r, buf) + ((col / 4) ^ (r & 7)) * 4 +
                                            (col & 3));
  };
  // The folded scorer (fl.lin set): this head's column of each key row gets du_j, the columns
  // after the heads' are zeroed (kv head h's CTAs take every Hkv-th group of 4), and the raw
  // slope's gradient gets sum_j du_j (offset + j) sigmoid(rho) (a warp's sum, one atomic).
  float dslope = 0.f;
  auto fold = [&](int j, float duj) {
    if (fl.lin == nullptr) return;
    E* row = fl.lin + b * ws.kv[0] + (long long)j * ws.kv[2];
    const int t4 = tid & 3;
    if (t4 == 0) {
      row[hk] = from_f<E>(duj);
      dslope += duj * (float)(fl.offset + j);
    }
    for (int c = Hkv + hk * 4 + t4; c < fl.width; c += 4 * Hkv) row[c] = from_f<E>(0.f);
  };
  sk_finish_dkv<E, D>(list_part, du, dk + kvoff, dv + kvoff, ws.kv[2], kc.krow0, kc.jk, adv, adk,
                      gu, scale, fold);
  if (fl.lin != nullptr) {
    for (int o = 16; o > 0; o >>= 1) dslope += __shfl_xor_sync(FULL, dslope, o);
    if ((tid & 31) == 0 && dslope != 0.f)
      atomicAdd(fl.drho + hk, dslope / (1.f + expf(-fl.rho[hk])));
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Hopper list part of dK, dV and du (f16 / bf16, head_dim 64 and 128), replacing skt_bwd_dkv on
// compute capability 9.0. One warpgroup per (group of G consecutive query blocks, batch * q head):
// the lists of consecutive blocks share most of their keys, so the CTA walks the union of the G
// blocks' attended list prefixes once, accumulating each key tile's dK, dV over the G blocks in
// registers (warpgroup MMA, the keys as the M side) before one vector-atomic add: G times fewer
// atomics than a walk per block.
// - The union: block g's list is the top-cap of the prefix [0, e_g); an old key (position < e_0)
//   of a later block's list is in block 0's list (fewer keys rank above it in the shorter prefix),
//   at its index there less the new keys above it (a scan over the CTA); a new key
//   (e_0 <= j < e_{G-1}) has slot cap + j - e_0.
//   Each slot gets the mask of the blocks whose attended prefix holds it; the slots are sorted by
//   mask (first block, then last block: the masks are intervals when tau is monotone), so that a
//   tile of 64 union keys runs only for the blocks of its mask's union.
// - Weights: sk_weight for keys older than the block's band start e_g (newer keys are the band
//   kernel's), which for a list key is exactly the forward's list weight; its tests fold into one
//   threshold per query (SkListQuery).
// - Steps (tile, block): with PIPE the next step's S^T, dP^T are issued before this step's dV,
//   dK (more registers: head_dim 128, one CTA per SM anyway); without, one step at a time, which
//   at head_dim 64 fits three CTAs per SM (G = 2) and is faster there.
// Shared memory: G query tiles Q and dO (128-byte swizzled), two K / V tile buffers (the union's
// construction uses them as scratch first), the G blocks' SkListQuery records, the union
// (positions, scores, masks), the tiles' masks and the list of steps.
// Per-query data of the list kernel, one 32-byte record per query: key (u, j) is attended when
// u > th or (u == th and j >= tj), with th, tj folded from tau and the cut (the cut only matters
// when it lies above tau); th = +inf for padding queries.
struct __align__(16) SkListQuery {
  float th, tau, l2, dl, rn;
  int tj;
  float pad[2];
};

template <int G>
__host__ __device__ constexpr int skw_list_slots(int cap) { return cap + (G - 1) * BQ; }

template <typename E, int D, int G, bool PIPE>
__device__ void skw_bwd_dkv_list(SKW_DKV_PARAMS) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int N8 = BQ / 8, DT = D / 8;
  static_assert(D % 64 == 0 && G >= 1 && G <= 8, "skw_bwd_dkv_list: head_dim 64 or 128");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  E* sQ = reinterpret_cast<E*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  E* sG = sQ + G * BQ * D;
  E* sK = sG + G * BQ * D;  // [2][TB * D]
  E* sV = sK + 2 * TB * D;  // [2][TB * D]
  SkListQuery* sq = reinterpret_cast<SkListQuery*>(sV + 2 * TB * D);  // [G * BQ]
  const int ni = skw_list_slots<G>(cap);
  int* uj = reinterpret_cast<int*>(sq + G * BQ);         // [ni] union positions
  float* uu = reinterpret_cast<float*>(uj + ni);         // [ni] union scores
  uint8_t* um = reinterpret_cast<uint8_t*>(uu + ni);     // [ni] union masks
  uint8_t* tmask = um + ni;                              // [ni / TB + 1] tile masks
  uint16_t* steps = reinterpret_cast<uint16_t*>(           // [(ni / TB + 1) * G] steps
      tmask + (ni / TB + 2) / 2 * 2);
  // Scratch of the union's construction (in the K / V buffers): block 0's list, the slot masks.
  float* sLu = reinterpret_cast<float*>(sK);
  int* sLj = reinterpret_cast<int*>(sLu + cap);
  int* mark = sLj + cap;
  __shared__ int s_off[1 << G], s_nu, s_nsteps;

  const int tid = threadIdx.x, warp = tid / 32, gq = (tid & 31) >> 2;
  const int c0 = blockIdx.x * G, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  const int bhk = b * Hkv + h / (Hq / Hkv), gl = min(G, nb - c0);
  const long long qrow0 = (long long)bh * T, krow0 = (long long)bhk * T;
  const long long nkd = (long long)B * Hkv * T * D, lrow = (long long)bhk * nb;
  const long long kst = ws.kv[2];
  const E* kr = k + ws.kv_off(b, h / (Hq / Hkv));
  const E* vr = v + ws.kv_off(b, h / (Hq / Hkv));
  const float* ur = u + krow0;
  const float sl2 = scale * LOG2E;
  const int e_first = min(T, block_start(c0, window));

  bool any = false;
  for (int g = 0; g < gl; ++g) any |= nlist[lrow + c0 + g] > 0;
  if (!any) return;  // only band keys (the band kernel's)

  for (int g = 0; g < gl; ++g) {
    load_tile_sw128<E, BQ, D, 128>(sQ + g * BQ * D, q + ws.q_off(b, h), (c0 + g) * BQ, T, tid,
                                   ws.q[2]);
    load_tile_sw128<E, BQ, D, 128>(sG + g * BQ * D, go + ws.o_off(b, h), (c0 + g) * BQ, T, tid,
                                   ws.o[2]);
  }
  cp_async_commit();
  for (int n = tid; n < G * BQ; n += 128) {
    const int i = (c0 + n / BQ) * BQ + n % BQ;
    const bool ok = n / BQ < gl && i < T;
    const long long ti = krow0 + i, qi = qrow0 + i;
    SkListQuery x{pos_inf(), 0.f, 0.f, 0.f, 0.f, INT_MAX, {0.f, 0.f}};
    if (ok) {
      const float ta = tau[ti], cu = cut_u[ti];
      const int cj = cut_j[ti];
      const bool by_tau = cj < 0 || ta >= cu;
      x.th = by_tau ? ta : cu;
      x.tj = by_tau ? INT_MAX : cj;
      x.tau = ta;
      x.l2 = lse[qi] * LOG2E;
      x.dl = delta[qi];
      x.rn = rmean[qi];
    }
    sq[n] = x;
  }

  // The union: block 0's list into shared memory, every block's attended prefix marks its slots.
  const float* lu0 = lu + (lrow + c0) * cap;
  const int* lj0 = lj + (lrow + c0) * cap;
  for (int r = tid; r < cap; r += 128) {
    sLu[r] = lu0[r];
    sLj[r] = lj0[r];
  }
  for (int x = tid; x < ni; x += 128) mark[x] = 0;
  if (tid < (1 << G)) s_off[tid] = 0;
  __syncthreads();
  // Block g's list is the top cap of a longer prefix than block 0's, so an entry r with a key
  // older than e_first is block 0's entry r - (entries above it with keys from e_first on): a
  // count per thread over a contiguous run of entries, then a scan over the CTA.
  for (int g = 0; g < gl; ++g) {
    const long long base = (lrow + c0 + g) * cap;
    const int nl = nlist[lrow + c0 + g];
    const int per = (nl + 127) / 128, r0 = min(nl, tid * per), r1 = min(nl, r0 + per);
    int newer = 0;
    for (int r = r0; r < r1; ++r) newer += lj[base + r] >= e_first;
    newer = block_exclusive_scan(newer, nullptr);  // keys from e_first above entry r0
    for (int r = r0; r < r1; ++r) {
      const int j = lj[base + r];
      if (j < 0) continue;
      const int x = g == 0 ? r : j < e_first ? r - newer : cap + j - e_first;
      newer += j >= e_first;
      atomicOr(mark + x, 1 << g);
    }
  }
  __syncthreads();
  for (int x = tid; x < ni; x += 128)
    if (mark[x]) atomicAdd(s_off + mark[x], 1);
  __syncthreads();
  if (tid == 0) {
    // Bins in the order of (first block, last block) of the mask, exclusive offsets.
    int pos = 0;
    for (int a = 0; a < G; ++a)
      for (int z = a; z < G; ++z)
        for (int m = 1; m < (1 << G); ++m)
          if (__ffs(m) - 1 == a && 31 - __clz(m) == z) {
            const int n = s_off[m];
            s_off[m] = pos;
            pos += n;
          }
    s_nu = pos;
  }
  __syncthreads();
  const int nu = s_nu, nt = (nu + TB - 1) / TB;
  for (int x = tid; x < ni; x += 128) {
    const int m = mark[x];
    if (!m) continue;
    const int p = atomicAdd(s_off + m, 1);
    const int j = x < cap ? sLj[x] : e_first + x - cap;
    uj[p] = j;
    uu[p] = x < cap ? sLu[x] : ur[j] + 0.f;
    um[p] = (uint8_t)m;
  }
  __syncthreads();
  for (int t = tid; t < nt; t += 128) {
    int m = 0;
    for (int r = t * TB; r < min(nu, t * TB + TB); ++r) m |= um[r];
    tmask[t] = (uint8_t)m;
  }
  __syncthreads();
  if (tid == 0) {  // the steps: (tile, block) for the blocks of each tile's mask
    int n = 0;
    for (int t = 0; t < nt; ++t)
      for (int m = tmask[t]; m; m &= m - 1) steps[n++] = (uint16_t)(t << 4 | (__ffs(m) - 1));
    s_nsteps = n;
  }
  // Tile t's K and V rows into buffer t & 1 (zero rows past the union).
  auto gather = [&](int t) {
    constexpr int CH = D / 8, RS = 128 / CH, NR = TB / RS;
    const int r0 = tid / CH, cc = tid % CH;
    const int soff = (cc / 8) * TB * 64 + r0 * 64 + ((cc % 8) ^ (r0 & 7)) * 8;
    E* dk = sK + (t & 1) * TB * D + soff;
    E* dv = sV + (t & 1) * TB * D + soff;
#pragma unroll
    for (int m = 0; m < NR; ++m) {
      const int rr = t * TB + r0 + m * RS, j = rr < nu ? uj[rr] : -1;
      cp_async16(dk + m * RS * 64, kr + max(j, 0) * kst + cc * 8, j >= 0);
      cp_async16(dv + m * RS * 64, vr + max(j, 0) * kst + cc * 8, j >= 0);
    }
    cp_async_commit();
  };
  __syncthreads();  // the scratch is dead, the tile masks are visible
  gather(0);
  if (PIPE && nt > 1) gather(1);

  float adk[DT][4], adv[DT][4], gu[2] = {0.f, 0.f}, gs[2];
  sk_zero_frags<DT>(adk, adv);
  float s[N8][4], dp[N8][4];
  uint32_t pa[BQ / 16][4], da[BQ / 16][4];
  int jk[2];  // the current tile's positions of this thread's two key rows
  auto keys = [&](int t, int* j, float* uo) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int rr = t * TB + warp * 16 + gq + hf * 8;
      j[hf] = rr < nu ? uj[rr] : -1;
      uo[hf] = rr < nu ? uu[rr] : 0.f;
    }
  };
  // S^T = K Q^T and dP^T = V dO^T of step (tile t, block g), one commit group.
  auto issue_sdp = [&](int t, int g) {
    wgmma_fence();
    skw_issue_abt<E, D>(s, sK + (t & 1) * TB * D, sQ + g * BQ * D);
    skw_issue_abt<E, D>(dp, sV + (t & 1) * TB * D, sG + g * BQ * D);
    wgmma_commit();
  };
  // P^T w and dS^T of step (t, g) into s, dp (its S^T and dP^T complete), its score gradient
  // into gs (sk_dkv_grads' arithmetic). The weight is sk_weight for the list keys, its tests
  // folded into th, tj; keys of the block's band (-inf here) are the band kernel's.
  auto grads = [&](int t, int g) {
    wgmma_fence_regs<N8>(s);
    wgmma_fence_regs<N8>(dp);
    gs[0] = gs[1] = 0.f;
    int j[2];
    float uk[2];
    keys(t, j, uk);
    const int eg = min(T, block_start(c0 + g, window));
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (j[hf] < 0 || j[hf] >= eg) uk[hf] = neg_inf();
    const SkListQuery* cq = sq + g * BQ + 2 * (tid & 3);
#pragma unroll
    for (int nt = 0; nt < N8; ++nt)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const SkListQuery c = cq[nt * 8 + e2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = hf * 2 + e2;
          // on implies u > tau (th >= tau), so w > 0 exactly when on.
          const bool on = uk[hf] > c.th || (uk[hf] == c.th && j[hf] >= c.tj);
          const float d = uk[hf] - c.tau;
          const float w = on ? fminf(d, 1.f) : 0.f;
          const float a = on ? fast_exp2(s[nt][x] * sl2 - c.l2) : 0.f;
          const float dpv = dp[nt][x];
          gs[hf] += on && d < 1.f ? a * dpv - c.rn : 0.f;
          s[nt][x] = a * w;
          dp[nt][x] = a * (w * dpv - c.dl);
        }
      }
  };
  // The step's P^T w and dS^T as the A fragments of dV, dK (the previous dV, dK complete).
  auto to_a = [&]() {
    skw_pack_a<E>(pa, s);
    skw_pack_a<E>(da, dp);
    wgmma_fence_regs_a<BQ / 16>(pa);
    wgmma_fence_regs_a<BQ / 16>(da);
  };
  // dV += P^T dO and dK += dS^T Q of block g (two commit groups).
  auto issue_pb = [&](int g) {
    wgmma_fence();
    skw_issue_pb<E, D>(adv, pa, sG + g * BQ * D);
    skw_issue_pb<E, D>(adk, da, sQ + g * BQ * D);
  };

  const int ns = s_nsteps;
  if (ns == 0) return;
  float uk0[2];
  auto flush = [&]() {
    sk_add_dkv<D>(dacc, du, nkd, krow0, jk, adv, adk, gu, scale);
    sk_zero_frags<DT>(adk, adv);
    gu[0] = gu[1] = 0.f;
  };
  auto acc_done = [&]() {
    wgmma_wait<0>();
    wgmma_fence_regs<DT>(adv);
    wgmma_fence_regs<DT>(adk);
  };
  if constexpr (PIPE) {
    cp_async_wait<1>();  // Q, dO and tile 0 landed (tile 1 may be in flight)
    if (nt == 1) cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    // Software-pipelined over the steps (tile t, block g) of the list: S^T and dP^T of the next
    // step are issued before dV, dK of this one, so the next step's element-wise work overlaps
    // them on the tensor cores. No wgmma is issued conditionally inside the loop.
    int t = steps[0] >> 4, g = steps[0] & 15;
    keys(t, jk, uk0);
    issue_sdp(t, g);
    wgmma_wait<0>();
    grads(t, g);
    to_a();
    gu[0] = gs[0];
    gu[1] = gs[1];
    for (int n = 0; n + 1 < ns; ++n) {
      const int tn = steps[n + 1] >> 4, gn = steps[n + 1] & 15;
      if (tn != t) {
        // Tile tn's rows landed; every warp is done with tile t's buffer (its S^T and dP^T
        // complete), which tile tn + 1 takes.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (tn + 1 < nt) gather(tn + 1);
      }
      issue_sdp(tn, gn);
      issue_pb(g);
      wgmma_wait<2>();
      grads(tn, gn);
      acc_done();
      if (tn != t) {
        flush();
        keys(tn, jk, uk0);
      }
      to_a();
      gu[0] += gs[0];
      gu[1] += gs[1];
      t = tn;
      g = gn;
    }
    issue_pb(g);
    acc_done();
  } else {
    // One step at a time; tile t + 1's rows are gathered while tile t's steps run.
    int tprev = -1;
    for (int n = 0; n < ns; ++n) {
      const int t = steps[n] >> 4, g = steps[n] & 15;
      if (t != tprev) {
        if (tprev >= 0) flush();
        // Tile t's rows landed; every warp is done with tile t - 1's buffer, which t + 1 takes.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (t + 1 < nt) gather(t + 1);
        keys(t, jk, uk0);
        tprev = t;
      }
      issue_sdp(t, g);
      wgmma_wait<0>();
      grads(t, g);
      to_a();
      issue_pb(g);
      acc_done();
      gu[0] += gs[0];
      gu[1] += gs[1];
    }
  }
  flush();
#endif
}

// Hopper kernels: tag _s{stages}_m{CTAs per SM} (`HOPPER_FWD`, `HOPPER_DQ` in cuda.rs).
#define SKW_FWD(TY, NAME, D, S, MINB)                                                           \
  extern "C" __global__ void __launch_bounds__(SKW_THREADS, MINB)                               \
      skw_fwd_##NAME##_d##D##_s##S##_m##MINB(const TY* q, const TY* k, const TY* v, TY* out,    \
                                             float* lse, SkwStrides ws, SK_PARAMS) {            \
    skw_fwd<TY, D, S, MINB>(q, k, v, out, lse, ws, SK_ARGS);                                    \
  }
#define SKW_DQ(TY, NAME, D, S, MINB)                                                            \
  extern "C" __global__ void __launch_bounds__(SKW_THREADS, MINB)                               \
      skw_bwd_dq_##NAME##_d##D##_s##S##_m##MINB(                                                \
          const TY* q, const TY* k, const TY* v, const TY* o, const TY* go, const float* lse,   \
          TY* dq, float* delta, float* rmean, float* dacc, long long nacc,                      \
          SkwStrides ws, SK_PARAMS) {                                                           \
    skw_bwd_dq<TY, D, S, MINB>(q, k, v, o, go, lse, dq, delta, rmean, dacc, nacc, ws,           \
                               SK_ARGS);                                                        \
  }
// The Hopper list dK / dV kernel, G query blocks per CTA (`list_dkv` in cuda.rs).
#define SKW_LIST(TY, NAME, D, G, MINB, PIPE, TAG)                                               \
  extern "C" __global__ void __launch_bounds__(128, MINB)                                       \
      skw_bwd_dkv_list_##NAME##_d##D##_g##G##_m##MINB##TAG(                                     \
      const TY* q, const TY* k, const TY* v, const TY* go, const float* lse,                    \
      const float* delta, const float* rmean, float* dacc, float* du,                           \
      TY* dk, TY* dv, SkwStrides ws, SK_PARAMS) {                                               \
    skw_bwd_dkv_list<TY, D, G, PIPE>(q, k, v, go, lse, delta, rmean, dacc, du, dk, dv, ws,      \
        SK_ARGS);                                                                               \
  }
// The Hopper band dK / dV kernel (`band_dkv` in cuda.rs).
#define SKW_BAND(TY, NAME, D, MINB)                                                             \
  extern "C" __global__ void __launch_bounds__(128, MINB) skw_bwd_dkv_band_##NAME##_d##D(       \
      const TY* q, const TY* k, const TY* v, const TY* go, const float* lse,                    \
      const float* delta, const float* rmean, float* dacc, float* du,                           \
      TY* dk, TY* dv, SkwStrides ws, SK_PARAMS, SkScorerFold<TY> fl) {                          \
    skw_bwd_dkv_band<TY, D>(q, k, v, go, lse, delta, rmean, dacc, du, dk, dv, ws, SK_ARGS, fl); \
  }
#define SKW_ALL(TY, NAME)                                                                       \
  SKW_BAND(TY, NAME, 64, 3)                                                                     \
  SKW_BAND(TY, NAME, 128, 1)                                                                    \
  SKW_LIST(TY, NAME, 64, 2, 3, false, )                                                         \
  SKW_LIST(TY, NAME, 128, 2, 1, true, _p)                                                       \
  SKW_FWD(TY, NAME, 64, 3, 3)                                                                   \
  SKW_FWD(TY, NAME, 64, 4, 2)                                                                   \
  SKW_DQ(TY, NAME, 64, 4, 2)                                                                    \
  SKW_DQ(TY, NAME, 64, 3, 3)                                                                    \
  SKW_FWD(TY, NAME, 128, 4, 1)                                                                  \
  SKW_DQ(TY, NAME, 128, 4, 1)

#define SKT_INSTANTIATE(TY, NAME, D)                                                            \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, SKT_MIN_BLOCKS(D)) skt_fwd_##NAME##_d##D(               \
      const TY* q, const TY* k, const TY* v, TY* out, float* lse, SK_PARAMS) {                  \
    skt_fwd<TY, D>(q, k, v, out, lse, SK_ARGS);                                                 \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, SKT_MIN_BLOCKS(D)) skt_bwd_dq_##NAME##_d##D(            \
      const TY* q, const TY* k, const TY* v, const TY* o, const TY* go, const float* lse,       \
      TY* dq, float* delta, float* rmean, float* dacc, long long nacc,                          \
      SK_PARAMS) {                                                                              \
    skt_bwd_dq<TY, D>(q, k, v, o, go, lse, dq, delta, rmean, dacc, nacc, SK_ARGS);              \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, SKT_MIN_BLOCKS(D)) skt_bwd_dkv_band_##NAME##_d##D(      \
      const TY* q, const TY* k, const TY* v, const TY* go, const float* lse,                    \
      const float* delta, const float* rmean, float* dacc, float* du,                           \
      TY* dk, TY* dv, SK_PARAMS) {                                                              \
    skt_bwd_dkv_band<TY, D>(q, k, v, go, lse, delta, rmean, dacc, du, dk, dv,                   \
        SK_ARGS);                                                                               \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(TC_THREADS, SKT_MIN_BLOCKS(D)) skt_bwd_dkv_##NAME##_d##D(           \
      const TY* q, const TY* k, const TY* v, const TY* go, const float* lse,                    \
      const float* delta, const float* rmean, float* dacc, float* du,                           \
      TY* dk, TY* dv, SK_PARAMS) {                                                              \
    skt_bwd_dkv<TY, D>(q, k, v, go, lse, delta, rmean, dacc, du, dk, dv,                        \
        SK_ARGS);                                                                               \
  }


#define SK_INSTANTIATE(TY, NAME, D)                                                             \
  extern "C" __global__ void sk_fwd_##NAME##_d##D(const TY* q, const TY* k, const TY* v,        \
                                                  TY* out, float* lse, SK_PARAMS) {             \
    sk_fwd<TY, D>(q, k, v, out, lse, SK_ARGS);                                                  \
  }                                                                                             \
  extern "C" __global__ void sk_bwd_dq_##NAME##_d##D(                                           \
      const TY* q, const TY* k, const TY* v, const TY* o, const TY* go, const float* lse,       \
      TY* dq, float* delta, float* rmean, SK_PARAMS) {                                          \
    sk_bwd_dq<TY, D>(q, k, v, o, go, lse, dq, delta, rmean, SK_ARGS);                           \
  }                                                                                             \
  extern "C" __global__ void sk_bwd_dkv_##NAME##_d##D(                                          \
      const TY* q, const TY* k, const TY* v, const TY* go, const float* lse,                    \
      const float* delta, const float* rmean, TY* dk, TY* dv, float* du,                        \
      SK_PARAMS) {                                                                              \
    sk_bwd_dkv<TY, D>(q, k, v, go, lse, delta, rmean, dk, dv, du, SK_ARGS);                     \
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

#define SKT_ALL_D(TY, NAME)                                                                     \
  SKT_INSTANTIATE(TY, NAME, 32)                                                                 \
  SKT_INSTANTIATE(TY, NAME, 64)                                                                 \
  SKT_INSTANTIATE(TY, NAME, 96)                                                                 \
  SKT_INSTANTIATE(TY, NAME, 128)

SKT_ALL_D(__half, f16)
SKT_ALL_D(__nv_bfloat16, bf16)
SKW_ALL(__half, f16)
SKW_ALL(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Key scorer (src/sparsek/scorer.rs): u[b, h, j] = x[b, j, :] . w[h, :] + delta[h] * (offset + j)
// in f32, x (B * T rows of C) in E, w (H, C) and delta (H) f32, u (B, H, T) f32; heads 8 at a time.
// Each kernel takes SK_SCORE_ROWS rows of x per CTA; the forward and dx keep w in shared memory
// when it fits in SK_SCORE_W_SMEM bytes (else they read it through the L1 cache).
#define SK_SCORE_HEADS 8
#define SK_SCORE_ROWS 64
#define SK_SCORE_W_SMEM (32 * 1024)

// Four consecutive elements of x or dx move as one Chunk (8 bytes in f16 / bf16, 16 in f32); a
// lane's four columns of w are one 16-byte read, consecutive lanes reading consecutive 16 bytes
// (no shared-memory bank conflicts). Whether the kernels can: C a multiple of 4 and the pointers
// 16-byte aligned (null ones are).
__device__ __forceinline__ bool sk_score_vec(int C, const void* a, const void* b, const void* c) {
  return C % 4 == 0 && aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(c, 16);
}
// w (H, C) for a scorer kernel: copied into shared memory ws by the CTA when it fits in
// SK_SCORE_W_SMEM bytes (the launch gives that much), else w itself. Ends with a barrier.
__device__ __forceinline__ const float* sk_score_stage_w(const float* w, float* ws, int H, int C) {
  const bool shared = H * C * 4 <= SK_SCORE_W_SMEM;
  if (shared)
    for (int i = threadIdx.x; i < H * C; i += blockDim.x) ws[i] = w[i];
  __syncthreads();
  return shared ? ws : w;
}

// du (B, H, T) of head h at row `row` (= b * T + j) of x.
__device__ __forceinline__ float sk_du_at(const float* __restrict__ du, long long row, int h,
                                          int T, int H) {
  return du[((row / T) * H + h) * T + row % T];
}

// dpos[h] += scale(h) * sum of du_at(r, h) * (offset + j) over a CTA's rows [r0, r0 + nr) of x
// (du_at(r, h): du of row r0 + r), one warp per head, atomics.
template <typename G, typename S>
__device__ __forceinline__ void sk_score_dpos(G du_at, S scale, float* __restrict__ dpos,
                                              long long r0, int nr, int T, int H, int offset) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  for (int h = warp; h < H; h += blockDim.x / 32) {
    float s = 0.f;
    for (int r = lane; r < nr; r += 32) s += du_at(r, h) * (float)(offset + (r0 + r) % T);
    s = warp_sum(s);
    if (lane == 0) atomicAdd(dpos + h, scale(h) * s);
  }
}

// Forward: one warp per row of x, a lane per 4 consecutive columns at a time (element by element
// when sk_score_vec fails). Shared memory: H * C floats when w fits.
template <typename E>
__device__ void sk_score_fwd(const E* __restrict__ x, const float* __restrict__ w,
                             const float* __restrict__ delta, float* __restrict__ u, int B, int T,
                             int C, int H, int offset) {
  constexpr int V = 4;
  extern __shared__ float fws[];  // [H][C] when it fits
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  const float* wr = sk_score_stage_w(w, fws, H, C);
  const bool vec = sk_score_vec(C, x, w, nullptr);
  const long long n = (long long)B * T, r0 = (long long)blockIdx.x * SK_SCORE_ROWS;
  const long long r1 = min(n, r0 + SK_SCORE_ROWS);
  for (long long row = r0 + warp; row < r1; row += nw) {
    const E* xr = x + row * C;
    const int b = (int)(row / T), j = (int)(row % T);
    for (int h0 = 0; h0 < H; h0 += SK_SCORE_HEADS) {
      float acc[SK_SCORE_HEADS];
#pragma unroll
      for (int h = 0; h < SK_SCORE_HEADS; ++h) acc[h] = 0.f;
      for (int c0 = lane * V; c0 < C; c0 += 32 * V) {
        const int nv = min(V, C - c0);
        Chunk<E, V> in;
        if (vec) in = ld_chunk<E, V>(xr + c0);
        float xv[V];
#pragma unroll
        for (int v = 0; v < V; ++v) xv[v] = v < nv ? to_f(vec ? in.e[v] : xr[c0 + v]) : 0.f;
#pragma unroll
        for (int h = 0; h < SK_SCORE_HEADS; ++h) {
          if (h0 + h >= H) break;
          const float* wh = wr + (h0 + h) * C + c0;
          if (vec) {
            const float4 wv = *reinterpret_cast<const float4*>(wh);
            acc[h] += xv[0] * wv.x + xv[1] * wv.y + xv[2] * wv.z + xv[3] * wv.w;
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v)
              if (v < nv) acc[h] += xv[v] * wh[v];
          }
        }
      }
#pragma unroll
      for (int h = 0; h < SK_SCORE_HEADS; ++h) {
        if (h0 + h >= H) break;
        const float s = warp_sum(acc[h]);
        if (lane == 0)
          u[((long long)b * H + h0 + h) * T + j] = s + delta[h0 + h] * (float)(offset + j);
      }
    }
  }
}

// Backward for du (B, H, T) f32, in two kernels:
// - sk_score_bwd_dx: dx = du^T w (+ dx_in when given) in E: a CTA per SK_SCORE_ROWS rows of x,
//   their du and (when it fits in SK_SCORE_W_SMEM bytes) w in shared memory, a thread per 4
//   consecutive columns of a row at a time (element by element when sk_score_vec fails). Shared
//   memory: SK_SCORE_ROWS * H (+ H * C) floats;
// - sk_score_bwd_dw: dw (H, C) and dpos (H) f32, zeroed by the caller, get the sums du x and
//   du * (offset + j) of one CTA's SK_SCORE_ROWS rows of x (threads over the columns) with
//   atomics. Shared memory: SK_SCORE_ROWS * H floats.
template <typename E>
__device__ void sk_score_bwd_dx(const float* __restrict__ w, const float* __restrict__ du,
                                const E* __restrict__ dx_in, E* __restrict__ dx, int B, int T,
                                int C, int H) {
  constexpr int V = 4;
  extern __shared__ float dxs[];  // [SK_SCORE_ROWS][H] du, then [H][C] w when it fits
  const long long n = (long long)B * T, r0 = (long long)blockIdx.x * SK_SCORE_ROWS;
  const int nr = (int)min((long long)SK_SCORE_ROWS, n - r0);
  const int tid = threadIdx.x, bs = blockDim.x;
  for (int i = tid; i < nr * H; i += bs) {
    const int h = i / nr, r = i % nr;
    dxs[r * H + h] = sk_du_at(du, r0 + r, h, T, H);
  }
  const float* wr = sk_score_stage_w(w, dxs + SK_SCORE_ROWS * H, H, C);
  const int nch = (C + V - 1) / V;
  const bool vec = sk_score_vec(C, w, dx, dx_in);
  for (int x = tid; x < nr * nch; x += bs) {
    const int r = x / nch, c0 = (x % nch) * V, nv = min(V, C - c0);
    const long long off = (r0 + r) * C + c0;
    float g[V];
    Chunk<E, V> in;
    if (dx_in != nullptr && vec) in = ld_chunk<E, V>(dx_in + off);
#pragma unroll
    for (int v = 0; v < V; ++v)
      g[v] = dx_in == nullptr || v >= nv ? 0.f : to_f(vec ? in.e[v] : dx_in[off + v]);
    for (int h = 0; h < H; ++h) {
      const float d = dxs[r * H + h];
      const float* wh = wr + h * C + c0;
      if (vec) {
        const float4 wv = *reinterpret_cast<const float4*>(wh);
        g[0] += d * wv.x;
        g[1] += d * wv.y;
        g[2] += d * wv.z;
        g[3] += d * wv.w;
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v)
          if (v < nv) g[v] += d * wh[v];
      }
    }
    if (vec) {
      Chunk<E, V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) out.e[v] = from_f<E>(g[v]);
      st_chunk<E, V>(dx + off, out);
    } else {
      for (int v = 0; v < nv; ++v) dx[off + v] = from_f<E>(g[v]);
    }
  }
}

template <typename E>
__device__ void sk_score_bwd_dw(const E* __restrict__ x, const float* __restrict__ du,
                                float* __restrict__ dw, float* __restrict__ dpos, int B, int T,
                                int C, int H, int offset) {
  extern __shared__ float dus[];  // [SK_SCORE_ROWS][H]
  const long long n = (long long)B * T, r0 = (long long)blockIdx.x * SK_SCORE_ROWS;
  const int nr = (int)min((long long)SK_SCORE_ROWS, n - r0);
  const int tid = threadIdx.x, bs = blockDim.x;
  for (int i = tid; i < nr * H; i += bs) {
    const int h = i / nr, r = i % nr;
    dus[r * H + h] = sk_du_at(du, r0 + r, h, T, H);
  }
  __syncthreads();
  sk_score_dpos([&](int r, int h) { return dus[r * H + h]; }, [](int) { return 1.f; }, dpos, r0,
                nr, T, H, offset);
  for (int c = tid; c < C; c += bs) {
    for (int h0 = 0; h0 < H; h0 += SK_SCORE_HEADS) {
      float acc[SK_SCORE_HEADS];
#pragma unroll
      for (int h = 0; h < SK_SCORE_HEADS; ++h) acc[h] = 0.f;
#pragma unroll 8
      for (int r = 0; r < nr; ++r) {
        const float xv = to_f(x[(r0 + r) * C + c]);
#pragma unroll
        for (int h = 0; h < SK_SCORE_HEADS; ++h)
          if (h0 + h < H) acc[h] += dus[r * H + h0 + h] * xv;
      }
#pragma unroll
      for (int h = 0; h < SK_SCORE_HEADS; ++h)
        if (h0 + h < H) atomicAdd(dw + (h0 + h) * C + c, acc[h]);
    }
  }
}

// Scores from their linear part computed elsewhere (a projection with the scorer's weight rows
// folded in), with the slopes delta = softplus(rho) of the raw slopes rho:
// - sk_score_cols: u (B, H, T) f32 = lin[(b * T + j) * ld + h] + delta[h] * (offset + j), one
//   thread per element of u;
// - sk_score_cols_bwd: dlin (B * T rows ld apart, W columns) in E = du (B, H, T) transposed in
//   the first H columns, zeros after them (ld > W: columns of a wider tensor, written in place),
//   and drho (H) f32, zeroed by the caller, += sum du * (offset + j) * sigmoid(rho) over a CTA's
//   SK_SCORE_ROWS rows (a warp per head, atomics).
__device__ __forceinline__ float sk_softplus(float r) { return r > 20.f ? r : log1pf(expf(r)); }

template <typename E>
__device__ void sk_score_cols(const E* __restrict__ lin, const float* __restrict__ rho,
                              float* __restrict__ u, int B, int T, int H, int ld, int offset) {
  const long long n = (long long)B * H * T;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const int j = (int)(i % T), h = (int)((i / T) % H);
    const long long b = i / ((long long)T * H);
    u[i] = to_f(lin[(b * T + j) * ld + h]) + sk_softplus(rho[h]) * (float)(offset + j);
  }
}

template <typename E>
__device__ void sk_score_cols_bwd(const float* __restrict__ du, const float* __restrict__ rho,
                                  E* __restrict__ dlin, float* __restrict__ drho, int B, int T,
                                  int H, int W, int ld, int offset) {
  const long long n = (long long)B * T, r0 = (long long)blockIdx.x * SK_SCORE_ROWS;
  const int nr = (int)min((long long)SK_SCORE_ROWS, n - r0);
  for (int i = threadIdx.x; i < nr * W; i += blockDim.x) {
    const int c = i % W;
    const long long row = r0 + i / W;
    dlin[row * ld + c] = from_f<E>(c < H ? sk_du_at(du, row, c, T, H) : 0.f);
  }
  // d(softplus(rho)) / d(rho) = sigmoid(rho).
  sk_score_dpos([&](int r, int h) { return sk_du_at(du, r0 + r, h, T, H); },
                [&](int h) { return 1.f / (1.f + expf(-rho[h])); }, drho, r0, nr, T, H, offset);
}

#define SK_SCORE(TY, NAME)                                                                      \
  extern "C" __global__ void sk_score_fwd_##NAME(const TY* x, const float* w, const float* delta, \
                                                 float* u, int B, int T, int C, int H,          \
                                                 int offset) {                                  \
    sk_score_fwd<TY>(x, w, delta, u, B, T, C, H, offset);                                       \
  }                                                                                             \
  extern "C" __global__ void sk_score_bwd_dx_##NAME(const float* w, const float* du,            \
                                                    const TY* dx_in, TY* dx, int B, int T,      \
                                                    int C, int H) {                             \
    sk_score_bwd_dx<TY>(w, du, dx_in, dx, B, T, C, H);                                          \
  }                                                                                             \
  extern "C" __global__ void sk_score_bwd_dw_##NAME(const TY* x, const float* du, float* dw,    \
                                                    float* dpos, int B, int T, int C, int H,    \
                                                    int offset) {                               \
    sk_score_bwd_dw<TY>(x, du, dw, dpos, B, T, C, H, offset);                                   \
  }                                                                                             \
  extern "C" __global__ void sk_score_cols_##NAME(const TY* lin, const float* rho, float* u,    \
                                                  int B, int T, int H, int ld, int offset) {    \
    sk_score_cols<TY>(lin, rho, u, B, T, H, ld, offset);                                        \
  }                                                                                             \
  extern "C" __global__ void sk_score_cols_bwd_##NAME(const float* du, const float* rho,        \
                                                      TY* dlin, float* drho, int B, int T,      \
                                                      int H, int W, int ld, int offset) {       \
    sk_score_cols_bwd<TY>(du, rho, dlin, drho, B, T, H, W, ld, offset);                         \
  }

SK_SCORE(float, f32)
SK_SCORE(__half, f16)
SK_SCORE(__nv_bfloat16, bf16)
