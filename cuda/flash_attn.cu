// Flash attention kernels (forward + backward) for dense (full / causal) and sparse causal
// visibility. Layout: q, o (b, hq, nq, d); k, v (b, hkv, nk, d), row-major, contiguous.
//
// Two families:
// - tensor-core kernels (f16 / bf16): mma.sync m16n8k16 with f32 accumulation, ldmatrix,
//   cp.async double buffering, tiles padded by 16 bytes per row (conflict-free ldmatrix); on
//   sm_90a the forward at head dims 64 and 128 also has a Hopper kernel (`fwd_wgmma`: warpgroup
//   MMA on 128-byte-swizzled shared tiles, a producer warpgroup feeding consumer warpgroups
//   through mbarriers, software-pipelined), which the host picks on the H100;
// - simple kernels (any dtype, one warp per row, CUDA-core f32 FMA): the f32 path (exact f32
//   arithmetic, no TF32) and the fallback for shapes the tensor-core kernels do not cover.
//
// Visibility modes: 0 full, 1 causal (row i sees j <= i + nk - nq), 2 sparse (q_pos >= k_pos, or >
// when strict, and equal buckets), 3 sink + band per kv head on blocks of 64 (MoA; nq == nk; the
// `sb_*` functions below give its key / query ranges and element test). Sparse tile skipping uses per-tile metadata (int4: x = max query
// position / min key position of the tile's real rows, y = min bucket, z = max bucket, w = min query /
// max key position, or a sentinel when the tile holds a padding row) built by `flash_tile_meta`;
// tile pairs that `tile_full` proves fully visible skip the element mask.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "wgmma.cuh"
#include "hopper.cuh"

#define INT_MAX_ 2147483647
#define INT_MIN_ (-2147483647 - 1)

// ---------------------------------------------------------------------------------------------
// Visibility
// ---------------------------------------------------------------------------------------------

struct Vis {
  int mode;  // 0 full, 1 causal, 2 sparse, 3 sink + band
  int off;   // nk - nq (causal)
  int strict;
  int has_bkt;
  const int* q_pos;  // (b, hq, nq)
  const int* k_pos;  // (b, hkv, nk)
  const int* q_bkt;
  const int* k_bkt;
  const int* spans;  // (hkv, 2): sink blocks, band blocks (mode 3)
};

__device__ __forceinline__ bool sparse_sees(int qp, int qb, int kp, int kb, int strict) {
  return (strict ? qp > kp : qp >= kp) && qb == kb;
}

// ---- Sink + band (mode 3). Query i (block qb = i / 64) sees key j (block kb = j / 64) iff j <= i
// and (kb < sink or kb > qb - band), with (sink, band) = spans[hk] in blocks of SB_BLOCK tokens.
// Tiles of any size: the range functions work in rows, the callers round to their tiles.
#define SB_BLOCK 64

// (sink, band) blocks of kv head hk (negative values count as 0); (0, 0) in other modes.
__device__ __forceinline__ int2 sb_span(const Vis& v, int hk) {
  if (v.mode != 3) return make_int2(0, 0);
  return make_int2(max(0, v.spans[2 * hk]), max(0, v.spans[2 * hk + 1]));
}

__device__ __forceinline__ bool sb_sees(int i, int j, int2 sb) {
  int qb = i / SB_BLOCK, kb = j / SB_BLOCK;
  return j <= i && (kb < sb.x || kb + sb.y > qb);
}

// Keys that query rows [r0, r1) may see: [0, x) (the sink), then [y, z) (the band), x <= y; rows,
// not clipped to nk.
__device__ __forceinline__ int3 sb_keys(int r0, int r1, int2 sb) {
  int qf = r0 / SB_BLOCK, ql = (r1 - 1) / SB_BLOCK;
  int sink_end = min(sb.x, ql + 1);
  int end = sb.y > 0 ? ql + 1 : sink_end;
  int band = max(sink_end, qf - sb.y + 1);
  return make_int3(sink_end * SB_BLOCK, band * SB_BLOCK, end * SB_BLOCK);
}

// Query rows [x, y) that may see any of the keys [c0, c1), clipped to nq.
__device__ __forceinline__ int2 sb_queries(int c0, int c1, int2 sb, int nq) {
  int kf = c0 / SB_BLOCK, kl = (c1 - 1) / SB_BLOCK;
  int hi = kf < sb.x ? nq : (sb.y > 0 ? min(nq, (kl + sb.y) * SB_BLOCK) : 0);
  return make_int2(min(c0, hi), hi);
}

// Does every query of rows [r0, r1) see every key of [c0, c1)? (No element mask needed.)
__device__ __forceinline__ bool sb_tile_full(int r0, int r1, int c0, int c1, int2 sb) {
  for (int qb = r0 / SB_BLOCK; qb <= (r1 - 1) / SB_BLOCK; ++qb)
    for (int kb = c0 / SB_BLOCK; kb <= (c1 - 1) / SB_BLOCK; ++kb)
      if (!(kb < qb && (kb < sb.x || kb + sb.y > qb))) return false;
  return true;
}

// Does query row i (flat row qr of (b, hq, nq)) see key j (flat row kr of (b, hkv, nk))? `sb` is
// the kv head's sb_span.
__device__ __forceinline__ bool sees(const Vis& v, long long qr, int i, long long kr, int j,
                                     int2 sb) {
  if (v.mode == 0) return true;
  if (v.mode == 1) return j <= i + v.off;
  if (v.mode == 3) return sb_sees(i, j, sb);
  int qb = v.has_bkt ? v.q_bkt[qr] : 0;
  int kb = v.has_bkt ? v.k_bkt[kr] : 0;
  return sparse_sees(v.q_pos[qr], qb, v.k_pos[kr], kb, v.strict);
}

// Can a query tile (meta q) see anything of a key tile (meta k)?
__device__ __forceinline__ bool tile_pass(int4 q, int4 k, int strict) {
  bool causal = strict ? q.x > k.x : q.x >= k.x;
  return causal && k.z >= q.y && k.y <= q.z;
}

// Does every query row of tile q see every key of tile k? (Both tiles free of padding rows, one
// bucket for all of them, every query position at or after every key position.)
__device__ __forceinline__ bool tile_full(int4 q, int4 k, int strict) {
  bool causal = strict ? q.w > k.w : q.w >= k.w;
  return causal && q.y == q.z && k.y == k.z && q.y == k.y;
}

// First index in [t, end) whose tile passes `tile_pass(q, meta[idx])`, or `end`; warp-parallel
// ballot scan (every warp computes the same, uniform answer). Used for sparse mode: it visits
// exactly the tiles of [j_start, causal_end) that pass the per-tile test when the layout is
// sorted, and stays correct for any layout.
__device__ __forceinline__ int next_pass_k(int t, int end, int4 q, const int4* kmeta, int strict) {
  int lane = threadIdx.x & 31;
  for (int base = t; base < end; base += 32) {
    int tt = base + lane;
    bool pass = tt < end && tile_pass(q, kmeta[tt], strict);
    unsigned bal = __ballot_sync(0xffffffffu, pass);
    if (bal) return base + __ffs(bal) - 1;
  }
  return end;
}

// Per-tile metadata of positions (and buckets). `rows` = b*h rows of length n, tiles of `tile`.
// Query tiles: x = max position over real rows (pos != -1), INT_MIN if none.
// Key tiles:   x = min position over real rows (pos != INT_MAX), INT_MAX if none.
// y, z = min, max bucket over real rows (0 without buckets), (INT_MAX, INT_MIN) if none.
// Query tiles: w = min position, INT_MIN if a row is padding. Key tiles: w = max position, INT_MAX
// if a row is padding.
// One warp per tile: coalesced loads, lane l reading rows l, l + 32, ..., then warp reductions.
__device__ __forceinline__ int warp_min_i(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ int warp_max_i(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

extern "C" __global__ void flash_tile_meta(const int* pos, const int* bkt, int4* meta, int rows,
                                           int n, int tile, int is_query, int has_bkt) {
  int ntiles = (n + tile - 1) / tile;
  long long idx = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // uniform per warp
  if (idx >= (long long)rows * ntiles) return;
  int lane = threadIdx.x & 31;
  long long r = idx / ntiles;
  int t = (int)(idx % ntiles);
  int x = is_query ? INT_MIN_ : INT_MAX_;
  int w = is_query ? INT_MAX_ : INT_MIN_;
  bool pad = false;
  int lo = INT_MAX_, hi = INT_MIN_;
  int end = min(n, (t + 1) * tile);
  for (int i = t * tile + lane; i < end; i += 32) {
    int p = pos[r * n + i];
    bool real = is_query ? p != -1 : p != INT_MAX_;
    pad = pad || !real;
    if (!real) continue;
    x = is_query ? max(x, p) : min(x, p);
    w = is_query ? min(w, p) : max(w, p);
    int b = has_bkt ? bkt[r * n + i] : 0;
    lo = min(lo, b);
    hi = max(hi, b);
  }
  x = is_query ? warp_max_i(x) : warp_min_i(x);
  w = is_query ? warp_min_i(w) : warp_max_i(w);
  lo = warp_min_i(lo);
  hi = warp_max_i(hi);
  pad = __any_sync(0xffffffffu, pad);
  if (pad) w = is_query ? INT_MIN_ : INT_MAX_;
  if (lane == 0) meta[idx] = make_int4(x, lo, hi, w);
}

// Fills n bytes with 0xFF (NaN in f32 / f16 / bf16): debug poisoning of outputs.
extern "C" __global__ void flash_poison(unsigned char* p, unsigned long long n) {
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) p[i] = 0xFF;
}

// ---------------------------------------------------------------------------------------------
// Simple kernels: one warp per row, lane l holds elements l, l+32, ... (f32 math, expf)
// ---------------------------------------------------------------------------------------------

// Forward, one warp per query row; mirrors the CPU kernel's online softmax.
template <typename T, int D>
__device__ void fwd_simple(const T* q, const T* k, const T* v, T* o, float* lse, Vis vis, int b,
                           int hq, int hkv, int nq, int nk, float scale) {
  constexpr int E = D / 32;
  int lane = threadIdx.x & 31;
  long long qr = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (qr >= (long long)b * hq * nq) return;
  long long bh = qr / nq;
  int i = (int)(qr % nq);
  int h = (int)(bh % hq);
  long long kr0 = (bh / hq * hkv + h / (hq / hkv)) * nk;
  int2 sb = sb_span(vis, h / (hq / hkv));
  float qv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] = to_f(q[qr * D + lane + 32 * e]);
    acc[e] = 0.f;
  }
  int kend = vis.mode == 1 || vis.mode == 3 ? max(0, min(nk, i + vis.off + 1)) : nk;
  int3 kr = vis.mode == 3 ? sb_keys(i, i + 1, sb) : make_int3(nk, nk, nk);
  float m = neg_inf(), l = 0.f;
  for (int j = 0; j < kend; ++j) {
    if (j == kr.x) j = kr.y;  // sink-band: jump over the gap
    if (j >= kend) break;
    if (!sees(vis, qr, i, kr0 + j, j, sb)) continue;
    const T* kj = k + (kr0 + j) * D;
    const T* vj = v + (kr0 + j) * D;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) s = fmaf(qv[e], to_f(kj[lane + 32 * e]), s);
    s = warp_sum(s) * scale;
    if (s > m) {
      float alpha = expf(m - s);
      l = l * alpha + 1.f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = acc[e] * alpha + to_f(vj[lane + 32 * e]);
      m = s;
    } else {
      float p = expf(s - m);
      l += p;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = fmaf(p, to_f(vj[lane + 32 * e]), acc[e]);
    }
  }
  float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) o[qr * D + lane + 32 * e] = from_f<T>(acc[e] * inv);
  if (lane == 0) lse[qr] = l > 0.f ? m + logf(l) : neg_inf();
}

// Delta_i = rowsum(dO_i * O_i) in f32, one warp per row.
template <typename T>
__device__ void bwd_delta(const T* o, const T* go, float* delta, long long rows, int d) {
  int lane = threadIdx.x & 31;
  long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  float s = 0.f;
  for (int c = lane; c < d; c += 32) s = fmaf(to_f(o[r * d + c]), to_f(go[r * d + c]), s);
  s = warp_sum(s);
  if (lane == 0) delta[r] = s;
}

// Delta_i = rowsum(dO_i * O_i) in f32 with 16-byte loads: 8 lanes per row (rows of d * sizeof(T)
// bytes, a multiple of 16, and 16-byte aligned o, go), 4 rows per warp.
template <typename T>
__device__ void bwd_delta_vec(const T* o, const T* go, float* delta, long long rows, int d) {
  constexpr int E = 16 / sizeof(T);  // elements per vector
  int g = threadIdx.x & 7;
  long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 8;
  float s = 0.f;
  if (r < rows) {
    const uint4* ov = reinterpret_cast<const uint4*>(o + r * d);
    const uint4* gv = reinterpret_cast<const uint4*>(go + r * d);
    for (int c = g; c < d / E; c += 8) {
      uint4 a = ov[c], b = gv[c];
      const T* ae = reinterpret_cast<const T*>(&a);
      const T* be = reinterpret_cast<const T*>(&b);
#pragma unroll
      for (int e = 0; e < E; ++e) s = fmaf(to_f(ae[e]), to_f(be[e]), s);
    }
  }
  s += __shfl_xor_sync(0xffffffffu, s, 4);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  if (r < rows && g == 0) delta[r] = s;
}

// dQ, one warp per query row.
template <typename T, int D>
__device__ void bwd_simple_dq(const T* q, const T* k, const T* v, const T* go, const float* lse,
                              const float* delta, T* dq, Vis vis, int b, int hq, int hkv, int nq,
                              int nk, float scale) {
  constexpr int E = D / 32;
  int lane = threadIdx.x & 31;
  long long qr = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (qr >= (long long)b * hq * nq) return;
  long long bh = qr / nq;
  int i = (int)(qr % nq);
  int h = (int)(bh % hq);
  long long kr0 = (bh / hq * hkv + h / (hq / hkv)) * nk;
  int2 sb = sb_span(vis, h / (hq / hkv));
  float qv[E], gv[E], acc[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    qv[e] = to_f(q[qr * D + lane + 32 * e]);
    gv[e] = to_f(go[qr * D + lane + 32 * e]);
    acc[e] = 0.f;
  }
  float L = lse[qr], dl = delta[qr];
  int kend = vis.mode == 1 || vis.mode == 3 ? max(0, min(nk, i + vis.off + 1)) : nk;
  int3 kr = vis.mode == 3 ? sb_keys(i, i + 1, sb) : make_int3(nk, nk, nk);
  if (L == neg_inf()) kend = 0;  // stranded row: zero gradient
  for (int j = 0; j < kend; ++j) {
    if (j == kr.x) j = kr.y;  // sink-band: jump over the gap
    if (j >= kend) break;
    if (!sees(vis, qr, i, kr0 + j, j, sb)) continue;
    const T* kj = k + (kr0 + j) * D;
    const T* vj = v + (kr0 + j) * D;
    float s = 0.f, dp = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      s = fmaf(qv[e], to_f(kj[lane + 32 * e]), s);
      dp = fmaf(gv[e], to_f(vj[lane + 32 * e]), dp);
    }
    s = warp_sum(s) * scale;
    dp = warp_sum(dp);
    float p = expf(s - L);
    float ds = p * (dp - dl) * scale;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = fmaf(ds, to_f(kj[lane + 32 * e]), acc[e]);
  }
#pragma unroll
  for (int e = 0; e < E; ++e) dq[qr * D + lane + 32 * e] = from_f<T>(acc[e]);
}

// dK, dV, one warp per key row, looping over the group's query heads and rows.
template <typename T, int D>
__device__ void bwd_simple_dkv(const T* q, const T* k, const T* v, const T* go, const float* lse,
                               const float* delta, T* dk, T* dv, Vis vis, int b, int hq, int hkv,
                               int nq, int nk, float scale) {
  constexpr int E = D / 32;
  int lane = threadIdx.x & 31;
  long long kr = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (kr >= (long long)b * hkv * nk) return;
  long long bhk = kr / nk;
  int j = (int)(kr % nk);
  int bi = (int)(bhk / hkv), hk = (int)(bhk % hkv), group = hq / hkv;
  float kv[E], vv[E], adk[E], adv[E];
#pragma unroll
  for (int e = 0; e < E; ++e) {
    kv[e] = to_f(k[kr * D + lane + 32 * e]);
    vv[e] = to_f(v[kr * D + lane + 32 * e]);
    adk[e] = 0.f;
    adv[e] = 0.f;
  }
  int2 sb = sb_span(vis, hk);
  int2 ir = vis.mode == 3 ? sb_queries(j, j + 1, sb, nq) : make_int2(0, nq);
  int i0 = vis.mode == 1 ? max(0, j - vis.off) : ir.x;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int i = i0; i < ir.y; ++i) {
      long long qr = ((long long)bi * hq + h) * nq + i;
      float L = lse[qr];
      if (L == neg_inf() || !sees(vis, qr, i, kr, j, sb)) continue;
      const T* qi = q + qr * D;
      const T* gi = go + qr * D;
      float s = 0.f, dp = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        s = fmaf(to_f(qi[lane + 32 * e]), kv[e], s);
        dp = fmaf(to_f(gi[lane + 32 * e]), vv[e], dp);
      }
      s = warp_sum(s) * scale;
      dp = warp_sum(dp);
      float p = expf(s - L);
      float ds = p * (dp - delta[qr]) * scale;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        adv[e] = fmaf(p, to_f(gi[lane + 32 * e]), adv[e]);
        adk[e] = fmaf(ds, to_f(qi[lane + 32 * e]), adk[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    dk[kr * D + lane + 32 * e] = from_f<T>(adk[e]);
    dv[kr * D + lane + 32 * e] = from_f<T>(adv[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core forward, shared parts: the key tiles a query tile visits, its rows' masks, the
// online softmax on score fragments and the epilogue. Both forward kernels (mma.sync below, and
// wgmma on sm_90a further down) hold scores and the output accumulator in mma.sync's m16n8
// C-fragment layout: per warp 16 * MR rows, s[mr * N8 + n][4], acc[mr * D/8 + dt][4].
// ---------------------------------------------------------------------------------------------

// Key tiles of BN keys that the query rows [m0, m1) visit, in order: `first()`, then `next(t + 1)`
// until `end`. Full: all; causal: up to the diagonal; sparse: those whose per-tile metadata passes;
// sink-band: the sink tiles [0, gap), then the band tiles [band, end). Sparse mode reads the
// key-tile metadata 32 tiles at a time (one load per lane, two warp ballots: the tiles that pass
// `tile_pass` and those `tile_full` proves fully visible), so a step waits on no global load to
// find its successor; `next` must be called with non-decreasing t by every lane of the warp.
template <int MODE>
struct FwdKeyTiles {
  int gap, band, end, strict;
  int4 qm;
  const int4* km;
  int wbase;       // mode 2: first key tile of the ballot words below
  unsigned wpass;  // mode 2: bit i = key tile wbase + i passes tile_pass
  unsigned wfull;  // mode 2: bit i = key tile wbase + i is fully visible (tile_full)

  __device__ __forceinline__ FwdKeyTiles(const Vis& vis, int2 sb, int m0, int m1, int bn, int nkt,
                                         int4 qm_, const int4* km_)
      : strict(vis.strict), qm(qm_), km(km_), wbase(-32), wpass(0u), wfull(0u) {
    end = nkt;
    if constexpr (MODE == 1) {
      int last = m1 - 1 + vis.off;  // last key the last row sees
      end = last < 0 ? 0 : min(nkt, last / bn + 1);
    }
    gap = band = end;
    if constexpr (MODE == 3) {
      int3 kr = sb_keys(m0, m1, sb);
      gap = (kr.x + bn - 1) / bn;
      band = kr.y / bn;
      end = min(nkt, (kr.z + bn - 1) / bn);
    }
  }
  // Mode 2: the ballot words of key tiles [base, base + 32).
  __device__ __forceinline__ void load_word(int base) {
    int tt = base + (threadIdx.x & 31);
    bool pass = false, full = false;
    if (tt < end) {
      int4 k = km[tt];
      pass = tile_pass(qm, k, strict);
      full = pass && tile_full(qm, k, strict);
    }
    wpass = __ballot_sync(0xffffffffu, pass);
    wfull = __ballot_sync(0xffffffffu, full);
    wbase = base;
  }
  __device__ __forceinline__ int next(int t) {
    if constexpr (MODE == 2) {
      while (t < end) {
        if (t >= wbase + 32) load_word(t & ~31);
        unsigned m = wpass >> (t - wbase);
        if (m) return t + __ffs(m) - 1;
        t = wbase + 32;
      }
      return end;
    }
    if constexpr (MODE == 3) return t >= gap && t < band ? band : t;
    return t;
  }
  __device__ __forceinline__ int first() { return next(0); }
  // Mode 2: whether key tile t, the last answer of `next`, is fully visible to the query tile (no
  // element mask needed). False in other modes.
  __device__ __forceinline__ bool full(int t) const {
    return MODE == 2 && ((wfull >> (t - wbase)) & 1u);
  }
};

// Sparse mode: the positions `pos` (then, when `has_bkt`, the buckets `bkt`) of rows [r0, r0 + N)
// of the head whose first flat row is row0, copied asynchronously to s[0, N) (and s[N, 2 * N)) by
// NT threads (this one is number tid); rows past n read as 0 (the masks test the row bound
// themselves).
template <int N, int NT>
__device__ __forceinline__ void load_pos_bkt(int* s, const int* pos, const int* bkt, int has_bkt,
                                             long long row0, int r0, int n, int tid) {
  int m = has_bkt ? 2 * N : N;
  for (int c = tid; c < m; c += NT) {
    int j = r0 + c % N;
    bool ok = j < n;
    cp_async4(s + c, (c < N ? pos : bkt) + (ok ? row0 + j : 0), ok);
  }
}

// A thread's query rows (gq and gq + 8 of each of its warp's MR row tiles from w0) and, in sparse
// mode, their positions and buckets.
template <int MODE, int MR>
struct FwdRows {
  int i[MR][2], qp[MR][2], qb[MR][2];

  __device__ __forceinline__ FwdRows(const Vis& vis, long long qrow0, int w0, int nq) {
    int gq = (threadIdx.x & 31) >> 2;
#pragma unroll
    for (int mr = 0; mr < MR; ++mr)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        int r = w0 + mr * 16 + gq + hf * 8;
        i[mr][hf] = r;
        qp[mr][hf] = INT_MIN_;
        qb[mr][hf] = -1;
        if (MODE == 2 && r < nq) {
          qp[mr][hf] = vis.q_pos[qrow0 + r];
          qb[mr][hf] = vis.has_bkt ? vis.q_bkt[qrow0 + r] : 0;
        }
      }
  }
};

// Sets the invisible scores of key tile t (keys [n0, n0 + 8 * N8)) of the warp's rows [w0, w0 +
// 16 * MR) to `masked`; skipped when the whole tile pair is visible (sparse mode: `full`, from
// `FwdKeyTiles::full`). Sparse mode reads the tile's key positions and buckets from `kvis`
// (`load_pos_bkt`).
template <int MODE, int MR, int N8>
__device__ __forceinline__ void fwd_mask(float (*s)[4], const Vis& vis, const FwdRows<MODE, MR>& rows,
                                         bool full, const int* kvis, int t, int w0, int nk, int2 sb,
                                         float masked) {
  constexpr int BN = 8 * N8;
  int t4 = threadIdx.x & 3, n0 = t * BN;
  bool need_mask = n0 + BN > nk || (MODE == 1 && n0 + BN - 1 > w0 + vis.off) ||
                   (MODE == 2 && !full) ||
                   (MODE == 3 && !sb_tile_full(w0, w0 + 16 * MR, n0, n0 + BN, sb));
  if (!need_mask) return;
#pragma unroll
  for (int nt = 0; nt < N8; ++nt) {
    int c = nt * 8 + 2 * t4;
    int2 kp = make_int2(0, 0), kb = make_int2(0, 0);
    if constexpr (MODE == 2) {
      kp = *reinterpret_cast<const int2*>(kvis + c);
      if (vis.has_bkt) kb = *reinterpret_cast<const int2*>(kvis + BN + c);
    }
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      int j = n0 + c + e2;
#pragma unroll
      for (int mr = 0; mr < MR; ++mr)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          bool ok = j < nk;
          if constexpr (MODE == 1) ok = ok && j <= rows.i[mr][hf] + vis.off;
          if constexpr (MODE == 2)
            ok = ok && sparse_sees(rows.qp[mr][hf], rows.qb[mr][hf], e2 ? kp.y : kp.x,
                                   e2 ? kb.y : kb.x, vis.strict);
          if constexpr (MODE == 3) ok = ok && sb_sees(rows.i[mr][hf], j, sb);
          float& x = s[mr * N8 + nt][hf * 2 + e2];
          x = ok ? x : masked;
        }
    }
  }
}

// Online softmax (log2 domain) of one key tile's raw scores s (turned into probabilities in place)
// for rows gq and gq + 8 of each of the MR row tiles: updates the running max (of the scores times
// sl2 = scale * log2 e) and sum, and returns in alpha the factor the output accumulator must be
// rescaled by (`fwd_rescale`).
template <int MR, int N8>
__device__ __forceinline__ void fwd_softmax(float (*s)[4], float (*mrow)[2], float (*lrow)[2],
                                            float (*alpha)[2], float sl2) {
#pragma unroll
  for (int mr = 0; mr < MR; ++mr)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float(*sm)[4] = s + mr * N8;
      float mx = mrow[mr][hf];
#pragma unroll
      for (int nt = 0; nt < N8; ++nt) {
        sm[nt][hf * 2] *= sl2;
        sm[nt][hf * 2 + 1] *= sl2;
        mx = fmaxf(mx, fmaxf(sm[nt][hf * 2], sm[nt][hf * 2 + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      float msafe = mx == neg_inf() ? 0.f : mx;
      alpha[mr][hf] = fast_exp2(mrow[mr][hf] - msafe);
      mrow[mr][hf] = mx;
      float ls = 0.f;
#pragma unroll
      for (int nt = 0; nt < N8; ++nt) {
        sm[nt][hf * 2] = fast_exp2(sm[nt][hf * 2] - msafe);
        sm[nt][hf * 2 + 1] = fast_exp2(sm[nt][hf * 2 + 1] - msafe);
        ls += sm[nt][hf * 2] + sm[nt][hf * 2 + 1];
      }
      lrow[mr][hf] = lrow[mr][hf] * alpha[mr][hf] + ls;
    }
}

// Rescales the output accumulator (DT fragments per row tile) by `fwd_softmax`'s alpha.
template <int MR, int DT>
__device__ __forceinline__ void fwd_rescale(float (*acc)[4], const float (*alpha)[2]) {
#pragma unroll
  for (int mr = 0; mr < MR; ++mr)
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      acc[mr * DT + dt][0] *= alpha[mr][0];
      acc[mr * DT + dt][1] *= alpha[mr][0];
      acc[mr * DT + dt][2] *= alpha[mr][1];
      acc[mr * DT + dt][3] *= alpha[mr][1];
    }
}

// Writes the normalised output rows [w0, w0 + 16 * MR) and their LSE (natural log; -inf for rows
// that saw no key).
template <typename T, int D, int MODE, int MR>
__device__ __forceinline__ void fwd_epilogue(T* o, float* lse, const float (*acc)[4],
                                             const float (*mrow)[2], const float (*lrow)[2],
                                             const FwdRows<MODE, MR>& rows, long long qrow0, int w0,
                                             int nq) {
  constexpr int DT = D / 8;
  int t4 = threadIdx.x & 3;
#pragma unroll
  for (int mr = 0; mr < MR; ++mr) {
    float inv[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = lrow[mr][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      inv[hf] = l > 0.f ? 1.f / l : 0.f;
      if (t4 == 0 && rows.i[mr][hf] < nq)
        lse[qrow0 + rows.i[mr][hf]] = l > 0.f ? mrow[mr][hf] * LN2 + logf(l) : neg_inf();
    }
    store_acc<T, D>(o + qrow0 * D, acc + mr * DT, w0 + mr * 16, nq, inv[0], inv[1]);
  }
}

// The query tile and kv head of one forward CTA (grid: query tiles of BM rows x b*hq) and what its
// key loop needs; shared by both tensor-core forward kernels.
template <int MODE>
struct FwdCta {
  int mt, bh, hk, m0;
  long long qrow0, krow0;  // first flat row of the query head in q / o, of the kv head in k / v
  int2 sb;
  float sl2;     // scale * log2 e
  float masked;  // masked raw score: -inf once scaled, whatever the sign of the scale
  FwdKeyTiles<MODE> tiles;

  __device__ __forceinline__ FwdCta(const Vis& vis, const int4* qmeta, const int4* kmeta, int hq,
                                    int hkv, int nq, int nk, float scale, int bm, int bn)
      // Causal and sparse: the heaviest query tiles (the last ones; in sparse mode, the trailing
      // padding tiles of compacted rows end at once) start first, for a shorter tail.
      : mt(MODE == 1 || MODE == 2 ? gridDim.x - 1 - blockIdx.x : blockIdx.x),
        bh(blockIdx.y),
        hk(bh % hq / (hq / hkv)),
        m0(mt * bm),
        qrow0((long long)bh * nq),
        krow0(((long long)(bh / hq) * hkv + hk) * nk),
        sb(sb_span(vis, hk)),
        sl2(scale * LOG2E),
        masked(sl2 >= 0.f ? neg_inf() : pos_inf()),
        tiles(vis, sb, m0, min(nq, m0 + bm), bn, (nk + bn - 1) / bn,
              MODE == 2 ? qmeta[(long long)bh * gridDim.x + mt] : make_int4(0, 0, 0, 0),
              kmeta + ((long long)(bh / hq) * hkv + hk) * ((nk + bn - 1) / bn)) {}
};

// ---------------------------------------------------------------------------------------------
// Tensor-core forward (mma.sync, any sm_80+): one CTA per (query tile of BM = 16 * MR * NW rows,
// b*hq); each warp owns 16 * MR rows (MR row tiles sharing every K / V fragment it loads) and all
// BN columns of the score tile. K/V tiles double-buffered with cp.async. One kernel per
// visibility mode MODE.
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int NW, int MR, int BN, int MODE>
__device__ void fwd_mma(const T* q, const T* k, const T* v, T* o, float* lse, Vis vis,
                        const int4* qmeta, const int4* kmeta, int hq, int hkv, int nq, int nk,
                        float scale) {
  constexpr int WR = 16 * MR, BM = WR * NW, SD = Pad<D>::SD, NT = NW * 32, N8 = BN / 8;
  constexpr int DT = D / 8, KD = D / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * SD;       // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;   // [2][BN][SD]
  int* sKv = reinterpret_cast<int*>(sV + 2 * BN * SD);  // [2][2 * BN] key positions, buckets (mode 2)

  int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  // (Folding the scale into the exponent's FFMA measured slower at D = 64 on the H100 and no
  // faster at D = 128.)
  const FwdCta<MODE> cta(vis, qmeta, kmeta, hq, hkv, nq, nk, scale, BM, BN);
  FwdKeyTiles<MODE> tiles = cta.tiles;
  int w0 = cta.m0 + warp * WR;
  long long qrow0 = cta.qrow0;
  const T* gk = k + cta.krow0 * D;
  const T* gv = v + cta.krow0 * D;
  const FwdRows<MODE, MR> rows(vis, qrow0, w0, nq);

  load_tile<T, BM, D, NT>(sQ, q + qrow0 * D, cta.m0, nq);
  int t = tiles.first();
  if (t < tiles.end) {
    load_tile<T, BN, D, NT>(sK, gk, t * BN, nk);
    load_tile<T, BN, D, NT>(sV, gv, t * BN, nk);
    if constexpr (MODE == 2) load_pos_bkt<BN, NT>(sKv, vis.k_pos, vis.k_bkt, vis.has_bkt, cta.krow0, t * BN, nk,
                                  threadIdx.x);
  }
  cp_async_commit();

  // For small enough MR * D the warp's Q fragments stay in registers for the whole key loop.
  constexpr bool QREG = MR * D <= 128;
  uint32_t qf[QREG ? MR * KD : 1][4];
  if constexpr (QREG) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mr = 0; mr < MR; ++mr)
#pragma unroll
      for (int kk = 0; kk < KD; ++kk)
        ldsm_x4(qf[mr * KD + kk],
                sQ + (warp * WR + mr * 16 + (lane & 15)) * SD + kk * 16 + (lane >> 4) * 8);
  }

  float acc[MR * DT][4];
#pragma unroll
  for (int i = 0; i < MR * DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float mrow[MR][2], lrow[MR][2];
#pragma unroll
  for (int mr = 0; mr < MR; ++mr) mrow[mr][0] = mrow[mr][1] = neg_inf(), lrow[mr][0] = lrow[mr][1] = 0.f;

  int buf = 0;
  while (t < tiles.end) {
    bool full = tiles.full(t);
    int tn = tiles.next(t + 1);
    if (tn < tiles.end) {
      load_tile<T, BN, D, NT>(sK + (buf ^ 1) * BN * SD, gk, tn * BN, nk);
      load_tile<T, BN, D, NT>(sV + (buf ^ 1) * BN * SD, gv, tn * BN, nk);
      if constexpr (MODE == 2)
        load_pos_bkt<BN, NT>(sKv + (buf ^ 1) * 2 * BN, vis.k_pos, vis.k_bkt, vis.has_bkt,
                             cta.krow0, tn * BN, nk, threadIdx.x);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* cK = sK + buf * BN * SD;
    const T* cV = sV + buf * BN * SD;
    float s[MR * N8][4];
#pragma unroll
    for (int i = 0; i < MR * N8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    gemm_abt<T, D, MR, N8, QREG>(s, qf, sQ, warp * WR, cK, 0);
    fwd_mask<MODE, MR, N8>(s, vis, rows, full, sKv + buf * 2 * BN, t, w0, nk, cta.sb, cta.masked);
    float alpha[MR][2];
    fwd_softmax<MR, N8>(s, mrow, lrow, alpha, cta.sl2);
    fwd_rescale<MR, DT>(acc, alpha);
    gemm_pb<T, D, MR, BN / 16>(acc, s, cV, 0);
    __syncthreads();  // the buffer is refilled by the next iteration
    t = tn;
    buf ^= 1;
  }
  cp_async_wait<0>();
  fwd_epilogue<T, D, MODE, MR>(o, lse, acc, mrow, lrow, rows, qrow0, w0, nq);
}

// ---------------------------------------------------------------------------------------------
// Hopper forward (sm_90a only): warpgroup MMA with warp specialisation (FlashAttention-3's
// design). One CTA per (query tile of BM = 64 * NC rows, b*hq) has one producer warpgroup and NC
// consumer warpgroups of 64 query rows each (warp w of a consumer: rows 16w..16w+15).
// - The producer (its registers cut to 24 by `setmaxnreg`) streams the K and V tiles of BN keys
//   with cp.async into a ring of S stages of 128-byte-swizzled shared tiles (`load_tile_sw128`);
//   per stage, "full" mbarriers complete when a tile has landed (cp.async.mbarrier.arrive) and
//   "empty" ones when every consumer warp has finished reading it.
// - The consumers (registers raised to up to 240) load their own Q rows once, then run
//   S = Q K^T (both operands K-major from shared memory, m64nBNk16) and O += P V (P from
//   registers, V read MN-major, m64nDk16) through wgmma descriptors, software-pipelined: S of the
//   next key tile is issued together with P V of this one, so the next softmax runs while P V is
//   on the tensor cores. (FlashAttention-3's ping-pong of two consumers, taking turns issuing
//   their GEMMs through named barriers, measured 3.5% slower here at D 128; see BENCHMARKS.md.)
// Masking, online softmax and the epilogue are shared with the mma.sync kernel.
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int NC, int BN, int S, int MODE>
__device__ void fwd_wgmma(const T* q, const T* k, const T* v, T* o, float* lse, Vis vis,
                          const int4* qmeta, const int4* kmeta, int hq, int hkv, int nq, int nk,
                          float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = 64 * NC, N8 = BN / 8, DT = D / 8, KD = D / 16;
  static_assert(D % 64 == 0 && BN % 64 == 0, "fwd_wgmma: D and BN must be multiples of 64");
  // Registers: the launch gives every thread REG0 (the 64K split evenly, `__launch_bounds__(.., 1)`);
  // the producer gives back all but PREG, the consumers take them (a multiple of 8, at most 240).
  constexpr int REG0 = 65536 / (128 * (NC + 1)) / 8 * 8, PREG = 24;
  constexpr int CREG0 = (REG0 * (NC + 1) - PREG) / NC / 8 * 8;
  constexpr int CREG = CREG0 > 240 ? 240 : CREG0;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Swizzle atoms (8 rows x 128 B) must start on 1024-byte boundaries: the host adds 1 KB slack.
  T* sQ = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* sK = sQ + BM * D;      // [S][BN * D]
  T* sV = sK + S * BN * D;  // [S][BN * D]
  uint64_t* full_k = reinterpret_cast<uint64_t*>(sV + S * BN * D);  // [S] each
  uint64_t* full_v = full_k + S;
  uint64_t* empty_k = full_v + S;
  uint64_t* empty_v = empty_k + S;
  // Mode 2: [S][2 * BN] key positions and buckets, staged with the V tile of the same stage.
  int* sKv = reinterpret_cast<int*>(empty_v + S);

  const FwdCta<MODE> cta(vis, qmeta, kmeta, hq, hkv, nq, nk, scale, BM, BN);
  FwdKeyTiles<MODE> tiles = cta.tiles;
  int wg = threadIdx.x / 128, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < S; ++i) {
      mbar_init(full_k + i, 128);
      mbar_init(full_v + i, 128);
      mbar_init(empty_k + i, 4 * NC);
      mbar_init(empty_v + i, 4 * NC);
    }
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: the i-th key tile goes to stage i % S once the consumers released that stage's
    // previous tile (round i / S - 1; their wgmma reads of it have completed). No proxy fence here:
    // it would wait for this thread's cp.async in flight.
    setmaxnreg_dec<PREG>();
    const T* gk = k + cta.krow0 * D;
    const T* gv = v + cta.krow0 * D;
    int i = 0;
    for (int t = tiles.first(); t < tiles.end; t = tiles.next(t + 1), ++i) {
      int st = i % S;
      uint32_t parity = ((i / S) & 1) ^ 1;
      if (i >= S) mbar_wait(empty_k + st, parity);
      load_tile_sw128<T, BN, D, 128>(sK + st * BN * D, gk, t * BN, nk, threadIdx.x);
      mbar_arrive_cp_async(full_k + st);
      if (i >= S) mbar_wait(empty_v + st, parity);
      load_tile_sw128<T, BN, D, 128>(sV + st * BN * D, gv, t * BN, nk, threadIdx.x);
      if constexpr (MODE == 2)
        load_pos_bkt<BN, 128>(sKv + st * 2 * BN, vis.k_pos, vis.k_bkt, vis.has_bkt, cta.krow0,
                              t * BN, nk, threadIdx.x);
      mbar_arrive_cp_async(full_v + st);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    return;
  }

  setmaxnreg_inc<CREG>();
  int c = wg - 1;  // consumer index
  int w0 = cta.m0 + c * 64 + (warp % 4) * 16;
  // This warpgroup's 64 query rows, the K-major A operand of S = Q K^T: D / 64 column blocks of
  // 64 rows; k-step kk sits in column block kk / 4, at byte offset 32 * (kk % 4) of the swizzled
  // 128-byte rows (as for K).
  T* qa = sQ + c * 64 * D;
  load_tile_sw128<T, 64, D, 128>(qa, q + cta.qrow0 * D, cta.m0 + c * 64, nq, threadIdx.x - 128 * wg);
  cp_async_commit();
  const FwdRows<MODE, 1> rows(vis, cta.qrow0, w0, nq);

  float acc[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float mrow[1][2] = {{neg_inf(), neg_inf()}}, lrow[1][2] = {{0.f, 0.f}}, alpha[1][2];
  float s[N8][4];
  uint32_t pa[BN / 16][4];
  auto issue_qk = [&](const T* cK) {
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
      wgmma_ss<T, BN>(s, sw128_desc(qa + (kk / 4) * 64 * 64 + (kk % 4) * 16, 16),
                      sw128_desc(cK + (kk / 4) * BN * 64 + (kk % 4) * 16, 16), kk > 0);
    wgmma_commit();
  };
  // O += P V: P from registers (pa), V's k-step kk is its rows 16kk.. (2048 bytes further), its
  // column blocks BN * 128 bytes apart (the MN-major leading byte offset).
  auto issue_pv = [&](const T* cV) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
      wgmma_rs_tb<T, D>(acc, pa[kk], sw128_desc(cV + kk * 16 * 64, BN * 128));
    wgmma_commit();
  };
  // Rescales O and turns the probabilities into the A fragments of P V (the C fragments of two
  // adjacent n-tiles are the A fragment of one k-step, as in mma.sync's gemm_pb). The register
  // fences keep the compiler from sinking this work past the next wgmma.fence, between wgmmas
  // (where reading an accumulator would make ptxas serialize them).
  auto rescale_to_pa = [&]() {
    fwd_rescale<1, DT>(acc, alpha);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
    wgmma_fence_regs<DT>(acc);
    wgmma_fence_regs_a<BN / 16>(pa);
  };
  // Stage of the i-th key tile ready (its cp.async data then visible to this thread's wgmma), and
  // released by this warp.
  auto wait_full = [&](uint64_t* bar, int i) { mbar_wait(bar + i % S, (i / S) & 1); };
  auto release = [&](uint64_t* bar) {
    if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
  };
  // Scores of key tile t, the i-th one visited (after its S = Q K^T completed), to probabilities in
  // s. Sparse mode: the element mask waits for the tile's key positions (they come with its V).
  auto softmax = [&](int t, int i) {
    wgmma_fence_regs<N8>(s);
    bool full = tiles.full(t);
    if (MODE == 2 && (!full || (t + 1) * BN > nk)) wait_full(full_v, i);
    fwd_mask<MODE, 1, N8>(s, vis, rows, full, sKv + (i % S) * 2 * BN, t, w0, nk, cta.sb,
                          cta.masked);
    fwd_softmax<1, N8>(s, mrow, lrow, alpha, cta.sl2);
  };

  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync(1 + c, 128);  // the warpgroup's Q rows are in shared memory
  int t = tiles.first(), i = 0;  // key tile t is the i-th one visited
  if (t < tiles.end) {
    wait_full(full_k, 0);
    fence_proxy_async();
    wgmma_fence();
    issue_qk(sK);
    wgmma_wait<0>();
    release(empty_k);
    softmax(t, 0);
    rescale_to_pa();  // O is still zero
  }
  // No wgmma is issued conditionally inside the loop: a branch between wgmmas makes ptxas
  // serialize them. The last tile's O += P V runs after it.
  int tn = t < tiles.end ? tiles.next(t + 1) : tiles.end;
  while (tn < tiles.end) {
    int sk = (i + 1) % S, sv = i % S;
    wait_full(full_k, i + 1);
    wait_full(full_v, i);
    fence_proxy_async();
    wgmma_fence();
    issue_qk(sK + sk * BN * D);
    issue_pv(sV + sv * BN * D);
    wgmma_wait<1>();
    release(empty_k + sk);
    softmax(tn, i + 1);
    wgmma_wait<0>();
    release(empty_v + sv);
    wgmma_fence_regs<DT>(acc);
    wgmma_fence_regs_a<BN / 16>(pa);
    rescale_to_pa();
    t = tn;
    tn = tiles.next(tn + 1);
    ++i;
  }
  if (t < tiles.end) {
    wait_full(full_v, i);
    fence_proxy_async();
    wgmma_fence();
    issue_pv(sV + (i % S) * BN * D);
    wgmma_wait<0>();
    wgmma_fence_regs<DT>(acc);
  }
  fwd_epilogue<T, D, MODE, 1>(o, lse, acc, mrow, lrow, rows, cta.qrow0, w0, nq);
#endif
}

// The query tiles one backward CTA (key tile `kt`, keys [n0, n0 + BK) of kv head `hk`) visits:
// flat indices p = head-in-group * nqt + query tile in [0, p_end), skipping the tiles its keys are
// invisible to (causal: before the diagonal; sink-band: outside the band's query range; sparse:
// per-tile metadata), plus the metadata the masking needs. Shared by both backward kernels.
// Sparse mode reads the query-tile metadata 32 tiles at a time (one load per lane, two warp
// ballots: the tiles that pass `tile_pass` and those `tile_full` proves fully visible), so a step
// waits on no global load to find its successor. `next` must be called with non-decreasing p.
template <int MODE, int BQ, int BK>
struct BwdQueryTiles {
  int nqt, p_end;
  int u0, u1;        // query tiles [u0, u1) of every head (causal, sink-band)
  int2 sb;           // sink-band span of the kv head (mode 3)
  int4 km;           // the key tile's metadata (mode 2)
  const int4* qm;    // the group's query-tile metadata (mode 2)
  int strict;
  int wbase;         // mode 2: first flat index of the ballot words below
  unsigned wpass;    // mode 2: bit i = flat index wbase + i passes tile_pass
  unsigned wfull;    // mode 2: bit i = flat index wbase + i is fully visible (tile_full)

  __device__ BwdQueryTiles(const Vis& vis, const int4* qmeta, const int4* kmeta, int n0, int nk,
                           int nq, int hk, int group, int bhk, int kt, long long qhead0) {
    nqt = (nq + BQ - 1) / BQ;
    p_end = group * nqt;
    // Causal: the first query row seeing key n0 is n0 - off.
    u0 = MODE == 1 ? min(nqt, max(0, n0 - vis.off) / BQ) : 0;
    u1 = nqt;
    sb = sb_span(vis, hk);
    if (MODE == 3) {
      int2 qr = sb_queries(n0, min(nk, n0 + BK), sb, nq);
      u0 = qr.x / BQ;
      u1 = (qr.y + BQ - 1) / BQ;
    }
    km = MODE == 2 ? kmeta[(long long)bhk * gridDim.x + kt] : make_int4(0, 0, 0, 0);
    qm = qmeta + qhead0 * nqt;
    strict = vis.strict;
    wbase = -32;
    wpass = wfull = 0u;
  }

  // Mode 2: the ballot words of flat indices [base, base + 32) (every lane of the warp calls it).
  __device__ void load_word(int base) {
    int tt = base + (threadIdx.x & 31);
    bool pass = false, full = false;
    if (tt < p_end) {
      int4 q = qm[tt];
      pass = tile_pass(q, km, strict);
      full = pass && tile_full(q, km, strict);
    }
    wpass = __ballot_sync(0xffffffffu, pass);
    wfull = __ballot_sync(0xffffffffu, full);
    wbase = base;
  }

  // The first visited flat index >= p (p_end when none is left).
  __device__ int next(int p) {
    if (MODE == 2) {
      while (p < p_end) {
        if (p < wbase || p >= wbase + 32) load_word(p & ~31);
        unsigned m = wpass >> (p - wbase);
        if (m) return p + __ffs(m) - 1;
        p = wbase + 32;
      }
      return p_end;
    }
    if (MODE == 3) {
      if (p >= p_end || u0 >= u1) return p_end;
      int r = p % nqt;
      if (r < u0) return p - r + u0;
      if (r >= u1) return min(p_end, p - r + nqt + u0);
      return p;
    }
    if (MODE == 1 && p < p_end && p % nqt < u0) return p - p % nqt + u0;
    return p;
  }

  // Mode 2: whether every pair of flat query tile p and the key tile is visible; p must be the
  // index `next` returned last (its ballot word is the current one). False in other modes.
  __device__ bool full(int p) const {
    return MODE == 2 && p < p_end && ((wfull >> (p - wbase)) & 1u);
  }
};

// Writes zeros to rows [n0, min(n, n0 + BK)) of two (n, D) matrices: the dK and dV of a key tile
// that no query sees (16-byte stores; the tensor-core paths' buffers are 16-byte aligned).
template <typename T, int BK, int D, int NT>
__device__ __forceinline__ void bwd_zero_rows(T* a, T* b, int n0, int n) {
  constexpr int V = D * (int)sizeof(T) / 16;  // vectors per row
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  for (int idx = threadIdx.x; idx < BK * V; idx += NT) {
    int r = n0 + idx / V;
    if (r < n) {
      reinterpret_cast<uint4*>(a + (long long)r * D)[idx % V] = z;
      reinterpret_cast<uint4*>(b + (long long)r * D)[idx % V] = z;
    }
  }
}

// Starts the cp.async loads of one backward query tile: rows [m0, m0 + BQ) of q and dO of the
// query head whose first row is `qr0` into sQ / sG (padded tiles, or 128-byte-swizzled ones when
// SW), their lse and delta into sL / sD (rows past nq zero-filled).
template <typename T, int BQ, int D, int NT, bool SW = false>
__device__ __forceinline__ void bwd_load_q(T* sQ, T* sG, float* sL, float* sD, const T* q,
                                           const T* go, const float* lse, const float* delta,
                                           long long qr0, int m0, int nq) {
  if constexpr (SW) {
    load_tile_sw128<T, BQ, D, NT>(sQ, q + qr0 * D, m0, nq, threadIdx.x);
    load_tile_sw128<T, BQ, D, NT>(sG, go + qr0 * D, m0, nq, threadIdx.x);
  } else {
    load_tile<T, BQ, D, NT>(sQ, q + qr0 * D, m0, nq);
    load_tile<T, BQ, D, NT>(sG, go + qr0 * D, m0, nq);
  }
  for (int r = threadIdx.x; r < 2 * BQ; r += NT) {
    int rr = r % BQ;
    bool ok = m0 + rr < nq;
    long long src = qr0 + (ok ? m0 + rr : 0);
    if (r < BQ)
      cp_async4(sL + rr, lse + src, ok);
    else
      cp_async4(sD + rr, delta + src, ok);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core backward for head dims 32 and 64 (1-D warp tiles over the keys; `bwd_mma2` below
// serves 96 and 128), one fused kernel (FA2 style): one CTA per (key tile of BK = 16 * MR * NW keys,
// b * hkv) owns dK, dV of its keys and loops over the group's query heads and their query tiles of
// BQ rows (Q, dO, lse, delta double-buffered with cp.async). dS goes through shared memory and
// dQ += dS K is added with f32 vector atomics into a zeroed (b, hq, nq, D) f32 buffer, which
// `flash_bwd_dq_convert` scales and writes in the input dtype (not bitwise deterministic).
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int NW, int MR, int BQ, int MODE>
__device__ void bwd_mma(const T* q, const T* k, const T* v, const T* go, const float* lse,
                        const float* delta, T* dk, T* dv, float* dqa, Vis vis, const int4* qmeta,
                        const int4* kmeta, int hq, int hkv, int nq, int nk, float scale) {
  constexpr int WK = 16 * MR, BK = WK * NW, DT = D / 8, SD = Pad<D>::SD, SQ = BQ + 8, NT = NW * 32, N8 = BQ / 8;
  // dQ phase: RG groups of 16 query rows, each split over WG warps of DW columns.
  constexpr int RG = BQ / 16, WG = NW / RG, DW = D / WG;
  static_assert(NW % RG == 0 && D % WG == 0 && DW % 16 == 0, "bwd tile shape");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BK * SD;
  T* sQ = sV + BK * SD;        // [2][BQ][SD]
  T* sG = sQ + 2 * BQ * SD;    // [2][BQ][SD]
  T* sS = sG + 2 * BQ * SD;    // [2][BK][SQ] dS^T
  float* sL = reinterpret_cast<float*>(sS + 2 * BK * SQ);  // [2][BQ] lse
  float* sD = sL + 2 * BQ;                              // [2][BQ] delta
  int* sQv = reinterpret_cast<int*>(sD + 2 * BQ);  // [2][2 * BQ] query positions, buckets (mode 2)

  int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  int kt = blockIdx.x, bhk = blockIdx.y, n0 = kt * BK;
  int b = bhk / hkv, hk = bhk % hkv, group = hq / hkv;
  long long krow0 = (long long)bhk * nk;
  long long qhead0 = (long long)b * hq + (long long)hk * group;  // first query head of the group
  float sl2 = scale * LOG2E;
  BwdQueryTiles<MODE, BQ, BK> tiles(vis, qmeta, kmeta, n0, nk, nq, hk, group, bhk, kt, qhead0);
  const int nqt = tiles.nqt, p_end = tiles.p_end;
  const int2 sb = tiles.sb;
  auto next = [&](int p) { return tiles.next(p); };
  int p = next(0);
  if (MODE >= 2 && p >= p_end) {  // no query sees these keys (sparse and sink-band modes)
    bwd_zero_rows<T, BK, D, NT>(dk + krow0 * D, dv + krow0 * D, n0, nk);
    return;
  }
  bool p_full = tiles.full(p);
  auto load_q = [&](int p, int bf) {
    long long qr0 = (qhead0 + p / nqt) * nq;
    int m0 = (p % nqt) * BQ;
    bwd_load_q<T, BQ, D, NT>(sQ + bf * BQ * SD, sG + bf * BQ * SD, sL + bf * BQ, sD + bf * BQ,
                             q, go, lse, delta, qr0, m0, nq);
    if constexpr (MODE == 2)
      load_pos_bkt<BQ, NT>(sQv + bf * 2 * BQ, vis.q_pos, vis.q_bkt, vis.has_bkt, qr0, m0, nq,
                           threadIdx.x);
  };

  // Per-thread key rows (gq, gq+8 of each of the warp's MR tiles of 16) and their sparse keys.
  int j_r[MR][2], kp[MR][2], kb[MR][2];
#pragma unroll
  for (int mr = 0; mr < MR; ++mr)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int j = n0 + warp * WK + mr * 16 + gq + hf * 8;
      j_r[mr][hf] = j;
      kp[mr][hf] = INT_MAX_;
      kb[mr][hf] = -2;
      if (MODE == 2 && j < nk) {
        kp[mr][hf] = vis.k_pos[krow0 + j];
        kb[mr][hf] = vis.has_bkt ? vis.k_bkt[krow0 + j] : 0;
      }
    }

  load_tile<T, BK, D, NT>(sK, k + krow0 * D, n0, nk);
  load_tile<T, BK, D, NT>(sV, v + krow0 * D, n0, nk);
  load_q(p, 0);
  cp_async_commit();

  // For small enough MR * D the warp's K and V fragments stay in registers for the query loop.
  constexpr bool KVREG = MR * D <= 64;
  uint32_t kf[KVREG ? MR * D / 16 : 1][4], vf[KVREG ? MR * D / 16 : 1][4];
  if constexpr (KVREG) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mr = 0; mr < MR; ++mr)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        int r = warp * WK + mr * 16 + (lane & 15);
        ldsm_x4(kf[mr * (D / 16) + kk], sK + r * SD + kk * 16 + (lane >> 4) * 8);
        ldsm_x4(vf[mr * (D / 16) + kk], sV + r * SD + kk * 16 + (lane >> 4) * 8);
      }
  }

  float adk[MR * DT][4], adv[MR * DT][4];
#pragma unroll
  for (int i = 0; i < MR * DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[i][e] = adv[i][e] = 0.f;

  // dQ rows rg*16.. columns c0..c0+DW of the query tile at m0 (flat rows from qr0) += dS K, with dS
  // (16 x BK) read from the dS^T buffer cS via ldmatrix.trans.
  int rg = warp % RG, c0 = (warp / RG) * DW;
  auto dq_step = [&](const T* cS, int m0, long long qr0) {
    float aq[DW / 8][4];
#pragma unroll
    for (int i = 0; i < DW / 8; ++i) aq[i][0] = aq[i][1] = aq[i][2] = aq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4_t(a, cS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * SQ + rg * 16 +
                       ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int dn = 0; dn < DW / 16; ++dn) {
        uint32_t bb[4];
        ldsm_x4_t(bb, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + c0 + dn * 16 +
                          (lane >> 4) * 8);
        mma<T>(aq[2 * dn], a, bb[0], bb[1]);
        mma<T>(aq[2 * dn + 1], a, bb[2], bb[3]);
      }
    }
    // Lane pairs (t4, t4 ^ 1) swap halves: the even lane adds 4 columns of row gq, the odd lane
    // 4 columns of row gq + 8, one 16-byte vector reduction each.
    bool odd = t4 & 1;
    int i = m0 + rg * 16 + gq + (odd ? 8 : 0);
    float* row = dqa + (qr0 + i) * D + c0 + 2 * (t4 & 2);
#pragma unroll
    for (int dt = 0; dt < DW / 8; ++dt) {
      float y0 = __shfl_xor_sync(0xffffffffu, odd ? aq[dt][0] : aq[dt][2], 1);
      float y1 = __shfl_xor_sync(0xffffffffu, odd ? aq[dt][1] : aq[dt][3], 1);
      if (i < nq) {
        if (odd)
          red_add4(row + dt * 8, y0, y1, aq[dt][2], aq[dt][3]);
        else
          red_add4(row + dt * 8, aq[dt][0], aq[dt][1], y0, y1);
      }
    }
  };

  // One barrier per step: step n computes S, dP, dS (to sS[n % 2]), dV, dK of tile n and, first,
  // the dQ product of tile n - 1 (from sS[(n - 1) % 2]), while tile n + 1 loads.
  int buf = 0, prev_m0 = 0;
  long long prev_qr0 = -1;
  for (;;) {
    cp_async_wait<0>();
    __syncthreads();
    int pn = p < p_end ? next(p + 1) : p_end;
    bool pn_full = tiles.full(pn);
    if (pn < p_end) load_q(pn, buf ^ 1);
    cp_async_commit();
    if (prev_qr0 >= 0) dq_step(sS + (buf ^ 1) * BK * SQ, prev_m0, prev_qr0);
    if (p >= p_end) break;

    const T* cQ = sQ + buf * BQ * SD;
    const T* cG = sG + buf * BQ * SD;
    const float* cL = sL + buf * BQ;
    const float* cD = sD + buf * BQ;
    const int* cQv = sQv + buf * 2 * BQ;
    T* cS = sS + buf * BK * SQ;
    int h = p / nqt, m0 = (p % nqt) * BQ;
    long long qr0 = (qhead0 + h) * nq;

    // S^T = K Q^T and dP^T = V dO^T for the warp's WK keys x BQ queries.
    float s[MR * N8][4], dp[MR * N8][4];
#pragma unroll
    for (int i = 0; i < MR * N8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    gemm_abt<T, D, MR, N8, KVREG>(s, kf, sK, warp * WK, cQ, 0);
    gemm_abt<T, D, MR, N8, KVREG>(dp, vf, sV, warp * WK, cG, 0);

    bool need_mask = m0 + BQ > nq || n0 + BK > nk ||
                     (MODE == 1 && n0 + warp * WK + WK - 1 > m0 + vis.off) ||
                     (MODE == 2 && !p_full) ||
                     (MODE == 3 &&
                      !sb_tile_full(m0, m0 + BQ, n0 + warp * WK, n0 + warp * WK + WK, sb));
#pragma unroll
    for (int nt = 0; nt < N8; ++nt) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        int c = nt * 8 + 2 * t4 + e2, i = m0 + c;
        int qp = 0, qb = 0;
        if (MODE == 2 && need_mask) {
          qp = cQv[c];
          if (vis.has_bkt) qb = cQv[BQ + c];
        }
        float L = cL[c], dl = cD[c];
        L = L == neg_inf() ? pos_inf() : L * LOG2E;  // stranded row: P = 0
#pragma unroll
        for (int mr = 0; mr < MR; ++mr)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            int j = j_r[mr][hf];
            bool ok;
            if constexpr (MODE == 2)
              ok = !need_mask || (i < nq && j < nk &&
                                  sparse_sees(qp, qb, kp[mr][hf], kb[mr][hf], vis.strict));
            else if constexpr (MODE == 3)
              ok = !need_mask || (i < nq && j < nk && sb_sees(i, j, sb));
            else
              ok = !need_mask || (i < nq && j < nk && (MODE == 0 || j <= i + vis.off));
            float* sv = &s[mr * N8 + nt][hf * 2 + e2];
            float* dv_ = &dp[mr * N8 + nt][hf * 2 + e2];
            float pv = ok ? fast_exp2(*sv * sl2 - L) : 0.f;
            *sv = pv;
            *dv_ = pv * (*dv_ - dl);
          }
      }
    }
    // dS^T to shared memory (rows = keys) for the next step's dQ product.
#pragma unroll
    for (int mr = 0; mr < MR; ++mr)
#pragma unroll
      for (int nt = 0; nt < N8; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          *reinterpret_cast<uint32_t*>(cS + (warp * WK + mr * 16 + gq + hf * 8) * SQ + nt * 8 +
                                       2 * t4) =
              pack2<T>(dp[mr * N8 + nt][hf * 2], dp[mr * N8 + nt][hf * 2 + 1]);
    // dV += P^T dO, dK += dS^T Q (scaled at the end).
    gemm_pb<T, D, MR, BQ / 16>(adv, s, cG, 0);
    gemm_pb<T, D, MR, BQ / 16>(adk, dp, cQ, 0);
    prev_m0 = m0;
    prev_qr0 = qr0;
    p = pn;
    p_full = pn_full;
    buf ^= 1;
  }
  cp_async_wait<0>();
#pragma unroll
  for (int mr = 0; mr < MR; ++mr) {
    int r0 = n0 + warp * WK + mr * 16;
    store_acc<T, D>(dk + krow0 * D, adk + mr * DT, r0, nk, scale, scale);
    store_acc<T, D>(dv + krow0 * D, adv + mr * DT, r0, nk, 1.f, 1.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core backward with 2-D warp tiles (FlashAttention-2's layout): one CTA of 8 warps per (key
// tile of BK = 128 keys, b * hkv) owns dK, dV of its keys and loops over the group's query heads and
// their query tiles of BQ rows (Q, dO, lse, delta double-buffered with cp.async). Per query tile:
//  1. S^T = K Q^T, dP^T = V dO^T; warp w computes keys 32 (w % 4).. x queries BQ/2 (w / 4).. and
//     writes P^T and dS^T = P^T (dP^T - delta) to shared memory (K, V fragments in registers when
//     D <= 64);
//  2. after a barrier, dV += P^T dO and dK += dS^T Q (warp w: keys 32 (w % 4).., columns D/2 (w / 4)..)
//     and dQ += dS K (warp w: MRQ row tiles of 16 x D/(BQ/(16 MRQ)) columns), added with f32 vector
//     atomics into a zeroed (b, hq, nq, D) f32 buffer that `flash_bwd_dq_convert` scales and writes
//     in the input dtype (not bitwise deterministic).
// ---------------------------------------------------------------------------------------------

template <typename T, int D, int BQ, int MRQ, int MODE>
__device__ void bwd_mma2(const T* q, const T* k, const T* v, const T* go, const float* lse,
                         const float* delta, T* dk, T* dv, float* dqa, Vis vis, const int4* qmeta,
                         const int4* kmeta, int hq, int hkv, int nq, int nk, float scale) {
  constexpr int NW = 8, NT = NW * 32, BK = 128, SD = Pad<D>::SD, SQ = BQ + 8;
  constexpr int QW = BQ / 2, N8 = QW / 8;  // phase 1: queries per warp, their 8-column tiles
  constexpr int DH = D / 2, DT = DH / 8;   // phase 2: dK / dV columns per warp, their tiles
  constexpr int RGQ = BQ / (16 * MRQ), CG = NW / RGQ, DW = D / CG;  // dQ: row groups x columns
  static_assert(N8 % 2 == 0 && DT % 2 == 0 && NW % RGQ == 0 && DW % 16 == 0, "bwd2 tile shape");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BK * SD;
  T* sQ = sV + BK * SD;      // [2][BQ][SD]
  T* sG = sQ + 2 * BQ * SD;  // [2][BQ][SD]
  T* sP = sG + 2 * BQ * SD;  // [BK][SQ] P^T
  T* sS = sP + BK * SQ;      // [BK][SQ] dS^T
  float* sL = reinterpret_cast<float*>(sS + BK * SQ);  // [2][BQ] lse
  float* sD = sL + 2 * BQ;                             // [2][BQ] delta

  int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  int kg = warp % 4, wh = warp / 4;  // key group of 32, query half (phase 1) / column half (phase 2)
  int rq = warp % RGQ, cq = warp / RGQ;  // dQ row group, column group
  int kt = blockIdx.x, bhk = blockIdx.y, n0 = kt * BK;
  int b = bhk / hkv, hk = bhk % hkv, group = hq / hkv;
  long long krow0 = (long long)bhk * nk;
  long long qhead0 = (long long)b * hq + (long long)hk * group;  // first query head of the group
  float sl2 = scale * LOG2E;
  BwdQueryTiles<MODE, BQ, BK> tiles(vis, qmeta, kmeta, n0, nk, nq, hk, group, bhk, kt, qhead0);
  const int nqt = tiles.nqt, p_end = tiles.p_end;
  const int2 sb = tiles.sb;
  auto next = [&](int p) { return tiles.next(p); };
  int p = next(0);
  if (MODE >= 2 && p >= p_end) {  // no query sees these keys (sparse and sink-band modes)
    bwd_zero_rows<T, BK, D, NT>(dk + krow0 * D, dv + krow0 * D, n0, nk);
    return;
  }
  bool p_full = tiles.full(p);
  auto load_q = [&](int p, int bf) {
    bwd_load_q<T, BQ, D, NT>(sQ + bf * BQ * SD, sG + bf * BQ * SD, sL + bf * BQ, sD + bf * BQ,
                             q, go, lse, delta, (qhead0 + p / nqt) * nq, (p % nqt) * BQ, nq);
  };

  // Per-thread key rows of phase 1 (gq, gq+8 of the warp's two tiles of 16) and their sparse keys.
  int j_r[2][2], kp[2][2], kb[2][2];
#pragma unroll
  for (int mr = 0; mr < 2; ++mr)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      int j = n0 + kg * 32 + mr * 16 + gq + hf * 8;
      j_r[mr][hf] = j;
      kp[mr][hf] = INT_MAX_;
      kb[mr][hf] = -2;
      if (MODE == 2 && j < nk) {
        kp[mr][hf] = vis.k_pos[krow0 + j];
        kb[mr][hf] = vis.has_bkt ? vis.k_bkt[krow0 + j] : 0;
      }
    }

  load_tile<T, BK, D, NT>(sK, k + krow0 * D, n0, nk);
  load_tile<T, BK, D, NT>(sV, v + krow0 * D, n0, nk);
  load_q(p, 0);
  cp_async_commit();

  // At small head dims the warp's K and V fragments of phase 1 stay in registers.
  constexpr bool KVREG = D <= 64;
  uint32_t kf[KVREG ? 2 * D / 16 : 1][4], vf[KVREG ? 2 * D / 16 : 1][4];
  if constexpr (KVREG) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mr = 0; mr < 2; ++mr)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        int r = kg * 32 + mr * 16 + (lane & 15);
        ldsm_x4(kf[mr * (D / 16) + kk], sK + r * SD + kk * 16 + (lane >> 4) * 8);
        ldsm_x4(vf[mr * (D / 16) + kk], sV + r * SD + kk * 16 + (lane >> 4) * 8);
      }
  }

  float adk[2 * DT][4], adv[2 * DT][4];
#pragma unroll
  for (int i = 0; i < 2 * DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[i][e] = adv[i][e] = 0.f;

  int buf = 0;
  while (p < p_end) {
    cp_async_wait<0>();
    __syncthreads();  // tile p has landed; the previous step's readers of sP, sS and buf ^ 1 are done
    int pn = next(p + 1);
    bool pn_full = tiles.full(pn);
    if (pn < p_end) load_q(pn, buf ^ 1);
    cp_async_commit();

    const T* cQ = sQ + buf * BQ * SD;
    const T* cG = sG + buf * BQ * SD;
    const float* cL = sL + buf * BQ;
    const float* cD = sD + buf * BQ;
    int h = p / nqt, m0 = (p % nqt) * BQ;
    long long qr0 = (qhead0 + h) * nq;

    // Phase 1: S^T, dP^T for keys kg * 32.. x queries wh * QW...
    float s[2 * N8][4], dp[2 * N8][4];
#pragma unroll
    for (int i = 0; i < 2 * N8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
    gemm_abt<T, D, 2, N8, KVREG>(s, kf, sK, kg * 32, cQ, wh * QW);
    gemm_abt<T, D, 2, N8, KVREG>(dp, vf, sV, kg * 32, cG, wh * QW);

    int qa = m0 + wh * QW, ka = n0 + kg * 32;  // the warp's first query and key
    bool need_mask = m0 + BQ > nq || n0 + BK > nk || (MODE == 1 && ka + 31 > qa + vis.off) ||
                     (MODE == 2 && !p_full) ||
                     (MODE == 3 && !sb_tile_full(qa, qa + QW, ka, ka + 32, sb));
#pragma unroll
    for (int nt = 0; nt < N8; ++nt) {
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        int c = wh * QW + nt * 8 + 2 * t4 + e2, i = m0 + c;
        int qp = INT_MIN_, qb = -1;
        if (MODE == 2 && need_mask && i < nq) {
          qp = vis.q_pos[qr0 + i];
          qb = vis.has_bkt ? vis.q_bkt[qr0 + i] : 0;
        }
        float L = cL[c], dl = cD[c];
        L = L == neg_inf() ? pos_inf() : L * LOG2E;  // stranded row: P = 0
#pragma unroll
        for (int mr = 0; mr < 2; ++mr)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            int j = j_r[mr][hf];
            bool ok;
            if constexpr (MODE == 2)
              ok = !need_mask || (i < nq && j < nk &&
                                  sparse_sees(qp, qb, kp[mr][hf], kb[mr][hf], vis.strict));
            else if constexpr (MODE == 3)
              ok = !need_mask || (i < nq && j < nk && sb_sees(i, j, sb));
            else
              ok = !need_mask || (i < nq && j < nk && (MODE == 0 || j <= i + vis.off));
            float* sv = &s[mr * N8 + nt][hf * 2 + e2];
            float* dv_ = &dp[mr * N8 + nt][hf * 2 + e2];
            float pv = ok ? fast_exp2(*sv * sl2 - L) : 0.f;
            *sv = pv;
            *dv_ = pv * (*dv_ - dl);
          }
      }
    }
    // P^T and dS^T to shared memory (rows = keys).
#pragma unroll
    for (int mr = 0; mr < 2; ++mr)
#pragma unroll
      for (int nt = 0; nt < N8; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          int off = (kg * 32 + mr * 16 + gq + hf * 8) * SQ + wh * QW + nt * 8 + 2 * t4;
          *reinterpret_cast<uint32_t*>(sP + off) =
              pack2<T>(s[mr * N8 + nt][hf * 2], s[mr * N8 + nt][hf * 2 + 1]);
          *reinterpret_cast<uint32_t*>(sS + off) =
              pack2<T>(dp[mr * N8 + nt][hf * 2], dp[mr * N8 + nt][hf * 2 + 1]);
        }
    __syncthreads();

    // Phase 2: dV += P^T dO, dK += dS^T Q (scaled at the end).
    gemm_ss<T, 2, DT, BQ / 16, SQ, SD, false>(adv, sP, kg * 32, 0, cG, 0, wh * DH);
    gemm_ss<T, 2, DT, BQ / 16, SQ, SD, false>(adk, sS, kg * 32, 0, cQ, 0, wh * DH);

    // dQ rows rq * 16 * MRQ.. columns cq * DW.. += dS K.
    float aq[MRQ * DW / 8][4];
#pragma unroll
    for (int i = 0; i < MRQ * DW / 8; ++i) aq[i][0] = aq[i][1] = aq[i][2] = aq[i][3] = 0.f;
    gemm_ss<T, MRQ, DW / 8, BK / 16, SQ, SD, true>(aq, sS, rq * 16 * MRQ, 0, sK, 0, cq * DW);
    // Lane pairs (t4, t4 ^ 1) swap halves: the even lane adds 4 columns of row gq, the odd lane
    // 4 columns of row gq + 8, one 16-byte vector reduction each.
    bool odd = t4 & 1;
#pragma unroll
    for (int mr = 0; mr < MRQ; ++mr) {
      int i = m0 + (rq * MRQ + mr) * 16 + gq + (odd ? 8 : 0);
      float* row = dqa + (qr0 + i) * D + cq * DW + 2 * (t4 & 2);
#pragma unroll
      for (int dt = 0; dt < DW / 8; ++dt) {
        const float* a = aq[mr * (DW / 8) + dt];
        float y0 = __shfl_xor_sync(0xffffffffu, odd ? a[0] : a[2], 1);
        float y1 = __shfl_xor_sync(0xffffffffu, odd ? a[1] : a[3], 1);
        if (i < nq) {
          if (odd)
            red_add4(row + dt * 8, y0, y1, a[2], a[3]);
          else
            red_add4(row + dt * 8, a[0], a[1], y0, y1);
        }
      }
    }
    p = pn;
    p_full = pn_full;
    buf ^= 1;
  }
  cp_async_wait<0>();
#pragma unroll
  for (int mr = 0; mr < 2; ++mr) {
    int r0 = n0 + kg * 32 + mr * 16;
    store_acc_cols<T, D, DH>(dk + krow0 * D, adk + mr * DT, r0, wh * DH, nk, scale);
    store_acc_cols<T, D, DH>(dv + krow0 * D, adv + mr * DT, r0, wh * DH, nk, 1.f);
  }
}

#include "flash_bwd_wgmma.cuh"

// dq = scale * acc, in the output dtype (n a multiple of 4).
template <typename T>
__device__ void dq_convert(const float* acc, T* dq, long long n, float scale) {
  long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  long long step = (long long)gridDim.x * blockDim.x * 4;
  for (; i < n; i += step) {
    float4 a = *reinterpret_cast<const float4*>(acc + i);
    uint2 w = make_uint2(pack2<T>(a.x * scale, a.y * scale), pack2<T>(a.z * scale, a.w * scale));
    *reinterpret_cast<uint2*>(dq + i) = w;
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

#define VIS_PARAMS                                                                        \
  const int *q_pos, const int *k_pos, const int *q_bkt, const int *k_bkt, const int4 *qmeta, \
      const int4 *kmeta, const int *spans, int b, int hq, int hkv, int nq, int nk, int mode,  \
      int strict, int has_bkt, float scale
#define MAKE_VIS Vis vis{mode, nk - nq, strict, has_bkt, q_pos, k_pos, q_bkt, k_bkt, spans};

// Tensor-core forward tiles: BM = 16 * MR * NW query rows (`fwd_tiles` in cuda.rs), BN = 64 keys,
// one kernel per visibility mode M.
#define FWD_MMA_M(TN, T, D, NW, MR, M)                                                           \
  extern "C" __global__ void __launch_bounds__(NW * 32, 2)                                      \
      flash_fwd_##TN##_d##D##_m##M(const T* q, const T* k, const T* v, T* o, float* lse,         \
                                   VIS_PARAMS) {                                                \
    MAKE_VIS fwd_mma<T, D, NW, MR, 64, M>(q, k, v, o, lse, vis, qmeta, kmeta, hq, hkv, nq, nk,   \
                                          scale);                                               \
  }
#define FWD_MMA(TN, T, D, NW, MR)                                                              \
  FWD_MMA_M(TN, T, D, NW, MR, 0) FWD_MMA_M(TN, T, D, NW, MR, 1) FWD_MMA_M(TN, T, D, NW, MR, 2) \
  FWD_MMA_M(TN, T, D, NW, MR, 3)
// Hopper (sm_90a) forward: NC consumer warpgroups of 64 query rows plus one producer warpgroup,
// BN keys per tile, S pipeline stages (`HOPPER_FWD_VARIANTS` in cuda.rs), one kernel per
// visibility mode M. Built for every target (empty bodies before sm_90a); the host only launches
// them on compute capability 9.0 with PTX that holds wgmma.
#define FWD_WG_M(TN, T, D, NC, BN, S, M)                                                         \
  extern "C" __global__ void __launch_bounds__((NC + 1) * 128, 1)                               \
      flash_fwd_wg_##TN##_d##D##_w##NC##_n##BN##_s##S##_m##M(                                   \
          const T* q, const T* k, const T* v, T* o, float* lse, VIS_PARAMS) {                   \
    MAKE_VIS fwd_wgmma<T, D, NC, BN, S, M>(q, k, v, o, lse, vis, qmeta, kmeta, hq, hkv, nq, nk, \
                                           scale);                                              \
  }
#define FWD_WG(TN, T, D, NC, BN, S)                                                \
  FWD_WG_M(TN, T, D, NC, BN, S, 0) FWD_WG_M(TN, T, D, NC, BN, S, 1)                \
  FWD_WG_M(TN, T, D, NC, BN, S, 2) FWD_WG_M(TN, T, D, NC, BN, S, 3)
// Tensor-core backward: key tiles of 16 * MR * NW keys, query tiles of BQ rows (`bwd_tiles` in
// cuda.rs), one kernel per visibility mode M (compact code for the dense modes).
#define BWD_MMA_M(TN, T, D, NW, MR, BQ, M)                                                       \
  extern "C" __global__ void __launch_bounds__(NW * 32, 1)                                      \
      flash_bwd_##TN##_d##D##_m##M(const T* q, const T* k, const T* v, const T* go,             \
                                   const float* lse, const float* delta, T* dk, T* dv,          \
                                   float* dqa, VIS_PARAMS) {                                    \
    MAKE_VIS bwd_mma<T, D, NW, MR, BQ, M>(q, k, v, go, lse, delta, dk, dv, dqa, vis, qmeta,     \
                                          kmeta, hq, hkv, nq, nk, scale);                       \
  }
#define BWD_MMA(TN, T, D, NW, MR, BQ)                                  \
  BWD_MMA_M(TN, T, D, NW, MR, BQ, 0) BWD_MMA_M(TN, T, D, NW, MR, BQ, 1) \
  BWD_MMA_M(TN, T, D, NW, MR, BQ, 2) BWD_MMA_M(TN, T, D, NW, MR, BQ, 3)
// Tensor-core backward with 2-D warp tiles: key tiles of 128 keys, 8 warps, query tiles of BQ rows,
// dQ warp tiles of 16 * MRQ rows (`bwd_tiles` in cuda.rs), one kernel per visibility mode M.
#define BWD2_MMA_M(TN, T, D, BQ, MRQ, M)                                                         \
  extern "C" __global__ void __launch_bounds__(256, 1)                                          \
      flash_bwd2_##TN##_d##D##_m##M(const T* q, const T* k, const T* v, const T* go,            \
                                    const float* lse, const float* delta, T* dk, T* dv,         \
                                    float* dqa, VIS_PARAMS) {                                   \
    MAKE_VIS bwd_mma2<T, D, BQ, MRQ, M>(q, k, v, go, lse, delta, dk, dv, dqa, vis, qmeta, kmeta, \
                                        hq, hkv, nq, nk, scale);                                \
  }
#define BWD2_MMA(TN, T, D, BQ, MRQ)                                    \
  BWD2_MMA_M(TN, T, D, BQ, MRQ, 0) BWD2_MMA_M(TN, T, D, BQ, MRQ, 1) \
  BWD2_MMA_M(TN, T, D, BQ, MRQ, 2) BWD2_MMA_M(TN, T, D, BQ, MRQ, 3)
// Hopper (sm_90a) backward: key tiles of BK = 64 * NWG keys, query tiles of BQ rows, dQ pipelined
// into the next step when P is 1 (`HOPPER_BWD_VARIANTS` in cuda.rs), one kernel per visibility mode
// M. Built for every target (empty bodies before sm_90a); the host only launches them where it
// launches the Hopper forward.
#define BWD_WG_M(TN, T, D, NWG, BQ, P, M)                                                        \
  extern "C" __global__ void __launch_bounds__(NWG * 128, 1)                                    \
      flash_bwd_wg_##TN##_d##D##_w##NWG##_q##BQ##_p##P##_m##M(                                  \
          const T* q, const T* k, const T* v, const T* go, const float* lse,                    \
          const float* delta, T* dk, T* dv, float* dqa, VIS_PARAMS) {                           \
    MAKE_VIS bwd_wgmma<T, D, NWG, BQ, P, M>(q, k, v, go, lse, delta, dk, dv, dqa, vis, qmeta,   \
                                            kmeta, hq, hkv, nq, nk, scale);                     \
  }
#define BWD_WG(TN, T, D, NWG, BQ, P)                                      \
  BWD_WG_M(TN, T, D, NWG, BQ, P, 0) BWD_WG_M(TN, T, D, NWG, BQ, P, 1) \
  BWD_WG_M(TN, T, D, NWG, BQ, P, 2) BWD_WG_M(TN, T, D, NWG, BQ, P, 3)
#define SIMPLE(TN, T, D)                                                                        \
  extern "C" __global__ void flash_fwd_simple_##TN##_d##D(const T* q, const T* k, const T* v,   \
                                                          T* o, float* lse, VIS_PARAMS) {       \
    MAKE_VIS fwd_simple<T, D>(q, k, v, o, lse, vis, b, hq, hkv, nq, nk, scale);                 \
  }                                                                                             \
  extern "C" __global__ void flash_bwd_simple_dq_##TN##_d##D(                                   \
      const T* q, const T* k, const T* v, const T* go, const float* lse, const float* delta,    \
      T* dq, VIS_PARAMS) {                                                                      \
    MAKE_VIS bwd_simple_dq<T, D>(q, k, v, go, lse, delta, dq, vis, b, hq, hkv, nq, nk, scale);  \
  }                                                                                             \
  extern "C" __global__ void flash_bwd_simple_dkv_##TN##_d##D(                                  \
      const T* q, const T* k, const T* v, const T* go, const float* lse, const float* delta,    \
      T* dk, T* dv, VIS_PARAMS) {                                                               \
    MAKE_VIS bwd_simple_dkv<T, D>(q, k, v, go, lse, delta, dk, dv, vis, b, hq, hkv, nq, nk,     \
                                  scale);                                                       \
  }

#define DELTA(TN, T)                                                                           \
  extern "C" __global__ void flash_bwd_delta_##TN(const T* o, const T* go, float* delta,       \
                                                  long long rows, int d) {                     \
    bwd_delta<T>(o, go, delta, rows, d);                                                       \
  }                                                                                            \
  extern "C" __global__ void flash_bwd_delta_vec_##TN(const T* o, const T* go, float* delta,   \
                                                      long long rows, int d) {                 \
    bwd_delta_vec<T>(o, go, delta, rows, d);                                                   \
  }
#define DQ_CONVERT(TN, T)                                                                      \
  extern "C" __global__ void flash_bwd_dq_convert_##TN(const float* acc, T* dq, long long n,   \
                                                       float scale) {                          \
    dq_convert<T>(acc, dq, n, scale);                                                          \
  }

DELTA(f32, float)
DELTA(f16, __half)
DELTA(bf16, __nv_bfloat16)
DQ_CONVERT(f16, __half)
DQ_CONVERT(bf16, __nv_bfloat16)

#define ALL_D(M, TN, T) M(TN, T, 32) M(TN, T, 64) M(TN, T, 96) M(TN, T, 128) M(TN, T, 256)
ALL_D(SIMPLE, f32, float)
ALL_D(SIMPLE, f16, __half)
ALL_D(SIMPLE, bf16, __nv_bfloat16)

#define FWD_ALL(TN, T) \
  FWD_MMA(TN, T, 32, 4, 2) FWD_MMA(TN, T, 64, 4, 2) FWD_MMA(TN, T, 96, 4, 2) \
  FWD_MMA(TN, T, 128, 4, 2) FWD_MMA(TN, T, 256, 4, 1)
FWD_ALL(f16, __half)
FWD_ALL(bf16, __nv_bfloat16)

#define FWD_WG_ALL(TN, T) \
  FWD_WG(TN, T, 64, 3, 128, 2) FWD_WG(TN, T, 128, 3, 64, 2) FWD_WG(TN, T, 128, 2, 128, 2)
FWD_WG_ALL(f16, __half)
FWD_WG_ALL(bf16, __nv_bfloat16)

#define BWD_ALL(TN, T) BWD_MMA(TN, T, 32, 8, 1, 64) BWD_MMA(TN, T, 64, 4, 2, 32)
BWD_ALL(f16, __half)
BWD_ALL(bf16, __nv_bfloat16)

#define BWD2_ALL(TN, T) BWD2_MMA(TN, T, 96, 64, 1) BWD2_MMA(TN, T, 128, 64, 2)
BWD2_ALL(f16, __half)
BWD2_ALL(bf16, __nv_bfloat16)

#define BWD_WG_ALL(TN, T)                                                                   \
  BWD_WG(TN, T, 64, 2, 128, 0) BWD_WG(TN, T, 64, 2, 128, 1) BWD_WG(TN, T, 128, 2, 64, 0) \
  BWD_WG(TN, T, 128, 2, 64, 1)
BWD_WG_ALL(f16, __half)
BWD_WG_ALL(bf16, __nv_bfloat16)
