// MoA decode kernels: the per-step cache scatter and split-KV attention over per-head spans with
// an LSE merge. Layouts (row-major, contiguous):
//   cache K, V (b, total, d) with total = sum of the kv heads' sizes, head h at rows
//   [starts[h], starts[h + 1]): a static sink (rows 0..63 of the region) then the ring;
//   q, out (b, hq, d); new k/v rows (b, hkv, d);
//   meta u32: starts[hkv + 1] | item_offs[hkv + 1] | item_head[n_items]: work item i attends
//   chunk (i - item_offs[h]) of head h = item_head[i], `chunk` slots long.
// A head holds valid = min(len, size) slots, always the first `valid` rows of its region.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"

#define FULL_MASK 0xffffffffu
#define SINK 64
#define NWARPS 4
#define UNROLL 4

// Copies N consecutive elements with 16- or 8-byte vector loads when the size allows (the caller
// guarantees the alignment).
template <typename T, int N>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, T (&x)[N]) {
  constexpr int BYTES = N * sizeof(T);
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 16; ++i)
      reinterpret_cast<uint4*>(x)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  } else if constexpr (BYTES % 8 == 0) {
#pragma unroll
    for (int i = 0; i < BYTES / 8; ++i)
      reinterpret_cast<uint2*>(x)[i] = __ldg(reinterpret_cast<const uint2*>(p) + i);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = p[i];
  }
}

// Lanes that share one key row: the largest power of two <= min(32, D / (16 B of elements)).
template <typename T, int D> __host__ __device__ constexpr int lanes_per_key() {
  int want = D / (16 / (int)sizeof(T));
  int l = 1;
  while (l * 2 <= want && l * 2 <= 32) l *= 2;
  return l;
}

// ---------------------------------------------------------------------------------------------
// Cache scatter of one decode step at absolute position t: grid b * hkv, each block copies the
// row of (b, h) to slot t (t < 64) or 64 + (t - 64) mod band of head h's region. Elements are
// moved as raw bits (E = 2- or 4-byte words). A head without a band keeps only its sink.
// ---------------------------------------------------------------------------------------------
template <typename E>
__device__ void append_rows(E* __restrict__ cache, const E* __restrict__ rows,
                            const uint32_t* __restrict__ meta, int hkv, long long total, int d,
                            long long t) {
  const int bh = blockIdx.x, b = bh / hkv, h = bh % hkv;
  const long long start = meta[h], size = (long long)meta[h + 1] - start;
  const long long band = size - SINK;
  if (t >= SINK && band <= 0) return;
  const long long slot = t < SINK ? t : SINK + (t - SINK) % band;
  E* dst = cache + ((long long)b * total + start + slot) * d;
  const E* src = rows + (long long)bh * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void moa_append_u16(uint16_t* cache, const uint16_t* rows,
                                          const uint32_t* meta, int hkv, long long total, int d,
                                          long long t) {
  append_rows<uint16_t>(cache, rows, meta, hkv, total, d, t);
}
extern "C" __global__ void moa_append_u32(uint32_t* cache, const uint32_t* rows,
                                          const uint32_t* meta, int hkv, long long total, int d,
                                          long long t) {
  append_rows<uint32_t>(cache, rows, meta, hkv, total, d, t);
}

// ---------------------------------------------------------------------------------------------
// Attention of one work item: grid (n_items, b), NWARPS warps. The block attends the G query
// heads of kv head h (one K/V read for the whole group) over slots [c * chunk, min(valid,
// (c + 1) * chunk)) of its region. Each warp holds 32 / LPK keys at a time (LPK lanes per key,
// EPL elements per lane), UNROLL steps of loads in flight, online softmax in f32 and base 2.
// Blocks past `valid` exit; the others write unnormalised partial o (b, n_items, group, D) and
// (max, sum) (b, n_items, group, 2), max in log2 units.
// ---------------------------------------------------------------------------------------------
template <typename T, int D, int G>
__device__ void decode_chunk(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const uint32_t* __restrict__ meta,
                             float* __restrict__ part_o, float* __restrict__ part_ml, int hq,
                             int hkv, long long total, int n_items, long long len, int chunk,
                             float scale_log2) {
  constexpr int LPK = lanes_per_key<T, D>();
  constexpr int EPL = D / LPK;
  constexpr int KPW = 32 / LPK;
  constexpr int STEP = NWARPS * KPW;
  extern __shared__ float sh[];  // NWARPS * KPW * group * (D + 2)
  const int item = blockIdx.x, b = blockIdx.y, group = hq / hkv;
  const uint32_t* starts = meta;
  const uint32_t* item_offs = meta + hkv + 1;
  const int h = meta[2 * (hkv + 1) + item];
  const long long start = starts[h], size = (long long)starts[h + 1] - start;
  const long long valid = min(len, size);
  const long long t0 = (long long)(item - (int)item_offs[h]) * chunk;
  if (t0 >= valid) return;
  const long long t1 = min(valid, t0 + chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sg = lane / LPK, sl = lane % LPK;
  const long long q_row0 = (long long)b * hq + (long long)h * group;

  float qr[G][EPL], o[G][EPL], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      o[g][e] = 0.f;
      qr[g][e] = g < group ? to_f(q[(q_row0 + g) * D + sl * EPL + e]) * scale_log2 : 0.f;
    }
  }
  const long long row0 = (long long)b * total + start;
  const T* kb = k + row0 * D + sl * EPL;
  const T* vb = v + row0 * D + sl * EPL;
  // The loop bound is the same for the whole warp, so every lane reaches the shuffles.
  for (long long wbase = t0 + warp * KPW; wbase < t1; wbase += (long long)STEP * UNROLL) {
    T kr[UNROLL][EPL], vr[UNROLL][EPL];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long t = wbase + sg + (long long)u * STEP;
      ok[u] = t < t1;
      if (ok[u]) {
        load_raw<T, EPL>(kb + t * D, kr[u]);
        load_raw<T, EPL>(vb + t * D, vr[u]);
      } else {
#pragma unroll
        for (int e = 0; e < EPL; ++e) kr[u][e] = vr[u][e] = from_f<T>(0.f);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g < group) {
        float s[UNROLL];
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          float acc = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; ++e) acc += qr[g][e] * to_f(kr[u][e]);
#pragma unroll
          for (int off = LPK / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(FULL_MASK, acc, off);
          s[u] = ok[u] ? acc : neg_inf();
          mx = fmaxf(mx, s[u]);
        }
        const float base = mx == neg_inf() ? 0.f : mx;
        const float corr = exp2f(m[g] - base);
        float p[UNROLL], psum = 0.f;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          p[u] = exp2f(s[u] - base);
          psum += p[u];
        }
        l[g] = l[g] * corr + psum;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          float acc = o[g][e] * corr;
#pragma unroll
          for (int u = 0; u < UNROLL; ++u) acc += p[u] * to_f(vr[u][e]);
          o[g][e] = acc;
        }
        m[g] = mx;
      }
    }
  }
  // Merge the NWARPS * KPW key streams of the block in shared memory.
  const int stream = warp * KPW + sg;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < group) {
      float* mine = sh + (stream * group + g) * (D + 2);
#pragma unroll
      for (int e = 0; e < EPL; ++e) mine[sl * EPL + e] = o[g][e];
      if (sl == 0) {
        mine[D] = m[g];
        mine[D + 1] = l[g];
      }
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, c = idx % D;
    float mx = neg_inf();
    for (int w = 0; w < NWARPS * KPW; ++w) mx = fmaxf(mx, sh[(w * group + g) * (D + 2) + D]);
    float acc = 0.f, sum = 0.f;
    for (int w = 0; w < NWARPS * KPW; ++w) {
      const float* s = sh + (w * group + g) * (D + 2);
      const float f = s[D] == neg_inf() ? 0.f : exp2f(s[D] - mx);
      acc += f * s[c];
      sum += f * s[D + 1];
    }
    const long long prow = ((long long)b * n_items + item) * group + g;
    part_o[prow * D + c] = acc;
    if (c == 0) {
      part_ml[2 * prow] = mx;
      part_ml[2 * prow + 1] = sum;
    }
  }
}

// Merge of a head's chunks: grid b * hq, D threads; out (b, hq, D).
template <typename T>
__device__ void decode_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                             const uint32_t* __restrict__ meta, T* __restrict__ out, int hq,
                             int hkv, int n_items, long long len, int chunk, int D) {
  const int r = blockIdx.x, c = threadIdx.x;
  const int b = r / hq, group = hq / hkv, h = (r % hq) / group, g = (r % hq) % group;
  const long long size = (long long)meta[h + 1] - meta[h];
  const long long valid = min(len, size);
  const int nc = (int)((valid + chunk - 1) / chunk);
  const int first = meta[hkv + 1 + h];
  float mx = neg_inf();
  for (int i = 0; i < nc; ++i) {
    const long long prow = ((long long)b * n_items + first + i) * group + g;
    mx = fmaxf(mx, part_ml[2 * prow]);
  }
  float acc = 0.f, sum = 0.f;
  for (int i = 0; i < nc; ++i) {
    const long long prow = ((long long)b * n_items + first + i) * group + g;
    const float f = part_ml[2 * prow] == neg_inf() ? 0.f : exp2f(part_ml[2 * prow] - mx);
    acc += f * part_o[prow * D + c];
    sum += f * part_ml[2 * prow + 1];
  }
  out[(long long)r * D + c] = from_f<T>(sum > 0.f ? acc / sum : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Instantiations: TN in {f32, f16, bf16}, D in {32, 64, 96, 128, 256}, G in {1, 2, 4, 8} (the
// launcher picks the smallest G >= group).
// ---------------------------------------------------------------------------------------------
#define PER_G(TN, T, D, G)                                                                       \
  extern "C" __global__ void __launch_bounds__(NWARPS * 32) moa_decode_##TN##_d##D##_g##G(      \
      const T* q, const T* k, const T* v, const uint32_t* meta, float* part_o, float* part_ml,  \
      int hq, int hkv, long long total, int n_items, long long len, int chunk,                  \
      float scale_log2) {                                                                        \
    decode_chunk<T, D, G>(q, k, v, meta, part_o, part_ml, hq, hkv, total, n_items, len, chunk,  \
                          scale_log2);                                                           \
  }

#define PER_D(TN, T, D) PER_G(TN, T, D, 1) PER_G(TN, T, D, 2) PER_G(TN, T, D, 4) PER_G(TN, T, D, 8)

#define PER_T(TN, T)                                                                             \
  PER_D(TN, T, 32) PER_D(TN, T, 64) PER_D(TN, T, 96) PER_D(TN, T, 128) PER_D(TN, T, 256)         \
  extern "C" __global__ void moa_merge_##TN(const float* part_o, const float* part_ml,           \
                                            const uint32_t* meta, T* out, int hq, int hkv,       \
                                            int n_items, long long len, int chunk, int D) {      \
    decode_merge<T>(part_o, part_ml, meta, out, hq, hkv, n_items, len, chunk, D);                \
  }

PER_T(f32, float)
PER_T(f16, __half)
PER_T(bf16, __nv_bfloat16)
