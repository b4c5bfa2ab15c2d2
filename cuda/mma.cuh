// Shared device helpers of the CUDA kernels (flash_attn, sparsek, twilight, moa_decode, fused):
// dtype conversion, warp reductions and the tensor-core primitives (mma.sync m16n8k16 with f32
// accumulation, ldmatrix, cp.async, padded shared tiles and the small GEMMs built from them).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// ---------------------------------------------------------------------------------------------
// dtype helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats packed as a 32-bit pair of T (a in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
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

// ---------------------------------------------------------------------------------------------
// Tensor-core primitives
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte async copy; when !pred nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c += a (16x16, row) * b (16x8, col), f32 accumulate.
template <typename T> __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Row stride of a shared tile of D elements: padded by 8 elements (16 bytes) so the 8 row
// addresses of one ldmatrix 8x8 matrix fall in 8 distinct 16-byte bank groups.
template <int D> struct Pad { static constexpr int SD = D + 8; };

// Async copy of rows [row0, row0 + ROWS) of a (n, D) matrix into a padded shared tile; rows past
// n are zero-filled.
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int row0, int n) {
  constexpr int CH = D / 8, SD = Pad<D>::SD;
#pragma unroll
  for (int idx = threadIdx.x; idx < ROWS * CH; idx += NT) {
    int r = idx / CH, c = idx % CH;
    bool ok = row0 + r < n;
    cp_async16(s + r * SD + c * 8, g + (long long)(ok ? row0 + r : 0) * D + c * 8, ok);
  }
}

// S (16*MR x 8*NT8) += A (16*MR rows, D cols) * B^T (rows b0.. of sB, D cols), s[mr * NT8 + n].
// A from registers (af[mr * D/16 + kk]) when AREG, else via ldmatrix from rows a0.. of sA; B via
// ldmatrix non-transposed (rows = the n index), each B fragment shared by the MR row tiles.
template <typename T, int D, int MR, int NT8, bool AREG>
__device__ __forceinline__ void gemm_abt(float (*s)[4], const uint32_t (*af)[4], const T* sA,
                                         int a0, const T* sB, int b0) {
  constexpr int SD = Pad<D>::SD;
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MR][4];
#pragma unroll
    for (int mr = 0; mr < MR; ++mr) {
      if constexpr (AREG) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[mr][e] = af[mr * (D / 16) + kk][e];
      } else {
        ldsm_x4(a[mr], sA + (a0 + mr * 16 + (lane & 15)) * SD + kk * 16 + (lane >> 4) * 8);
      }
    }
#pragma unroll
    for (int nn = 0; nn < NT8 / 2; ++nn) {
      uint32_t bb[4];
      ldsm_x4(bb, sB + (b0 + nn * 16 + (lane & 7) + (lane >> 4) * 8) * SD + kk * 16 +
                      ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mr = 0; mr < MR; ++mr) {
        mma<T>(s[mr * NT8 + 2 * nn], a[mr], bb[0], bb[1]);
        mma<T>(s[mr * NT8 + 2 * nn + 1], a[mr], bb[2], bb[3]);
      }
    }
  }
}

// Acc (16*MR x D, acc[mr * D/8 + dt]) += P (16*MR x 16*KS, C-fragment registers p[mr * 2KS + n],
// converted to T) * B (rows = the k index of sB from b0, D cols), B via ldmatrix transposed.
template <typename T, int D, int MR, int KS>
__device__ __forceinline__ void gemm_pb(float (*acc)[4], const float (*p)[4], const T* sB, int b0) {
  constexpr int SD = Pad<D>::SD;
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    // The C fragments of two adjacent n-tiles are exactly the A fragment of one k-step.
    uint32_t a[MR][4];
#pragma unroll
    for (int mr = 0; mr < MR; ++mr) {
      const float(*pm)[4] = p + mr * 2 * KS;
      a[mr][0] = pack2<T>(pm[2 * kk][0], pm[2 * kk][1]);
      a[mr][1] = pack2<T>(pm[2 * kk][2], pm[2 * kk][3]);
      a[mr][2] = pack2<T>(pm[2 * kk + 1][0], pm[2 * kk + 1][1]);
      a[mr][3] = pack2<T>(pm[2 * kk + 1][2], pm[2 * kk + 1][3]);
    }
#pragma unroll
    for (int dn = 0; dn < D / 16; ++dn) {
      uint32_t bb[4];
      ldsm_x4_t(bb, sB + (b0 + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SD + dn * 16 +
                        (lane >> 4) * 8);
#pragma unroll
      for (int mr = 0; mr < MR; ++mr) {
        mma<T>(acc[mr * (D / 8) + 2 * dn], a[mr], bb[0], bb[1]);
        mma<T>(acc[mr * (D / 8) + 2 * dn + 1], a[mr], bb[2], bb[3]);
      }
    }
  }
}

// Acc (16*MR x 8*N8, acc[mr * N8 + n]) += A (16*MR x 16*KS) * B (16*KS x 8*N8), both operands from
// shared memory. A: rows a0.. of sA (row stride SA), its k index from column ak; when AT, sA holds
// A^T instead (rows = the k index from ak, columns = the rows of A from a0), read with
// ldmatrix.trans. B: rows = the k index of sB from bk, columns b0.. (row stride SB), ldmatrix.trans.
// Each A fragment feeds the N8 n-tiles, each B fragment the MR row tiles.
template <typename T, int MR, int N8, int KS, int SA, int SB, bool AT>
__device__ __forceinline__ void gemm_ss(float (*acc)[4], const T* sA, int a0, int ak, const T* sB,
                                        int bk, int b0) {
  static_assert(N8 % 2 == 0, "gemm_ss: N8 must be even");
  int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[MR][4];
#pragma unroll
    for (int mr = 0; mr < MR; ++mr) {
      if constexpr (AT)
        ldsm_x4_t(a[mr], sA + (ak + kk * 16 + (lane >> 4) * 8 + (lane & 7)) * SA + a0 + mr * 16 +
                             ((lane >> 3) & 1) * 8);
      else
        ldsm_x4(a[mr], sA + (a0 + mr * 16 + (lane & 15)) * SA + ak + kk * 16 + (lane >> 4) * 8);
    }
#pragma unroll
    for (int dn = 0; dn < N8 / 2; ++dn) {
      uint32_t bb[4];
      ldsm_x4_t(bb, sB + (bk + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SB + b0 + dn * 16 +
                        (lane >> 4) * 8);
#pragma unroll
      for (int mr = 0; mr < MR; ++mr) {
        mma<T>(acc[mr * N8 + 2 * dn], a[mr], bb[0], bb[1]);
        mma<T>(acc[mr * N8 + 2 * dn + 1], a[mr], bb[2], bb[3]);
      }
    }
  }
}

// Writes a warp's 16 x W f32 accumulator (acc[W / 8], times mul) as T into rows [r0, r0+16),
// columns [c0, c0 + W) of a (n, D) matrix.
template <typename T, int D, int W>
__device__ __forceinline__ void store_acc_cols(T* g, const float (*acc)[4], int r0, int c0, int n,
                                               float mul) {
  int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int r = r0 + gq + half * 8;
    if (r >= n) continue;
#pragma unroll
    for (int dt = 0; dt < W / 8; ++dt) {
      uint32_t w = pack2<T>(acc[dt][half * 2] * mul, acc[dt][half * 2 + 1] * mul);
      *reinterpret_cast<uint32_t*>(g + (long long)r * D + c0 + dt * 8 + 2 * t4) = w;
    }
  }
}

// Writes a warp's 16 x D f32 accumulator (times mul) as T rows [r0, r0+16) of a (n, D) matrix
// (rows ld elements apart, D by default).
template <typename T, int D>
__device__ __forceinline__ void store_acc(T* g, const float (*acc)[4], int r0, int n, float mul0,
                                          float mul1, long long ld = D) {
  int lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    int r = r0 + gq + half * 8;
    if (r >= n) continue;
    float mul = half ? mul1 : mul0;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      uint32_t w = pack2<T>(acc[dt][half * 2] * mul, acc[dt][half * 2 + 1] * mul);
      *reinterpret_cast<uint32_t*>(g + (long long)r * ld + dt * 8 + 2 * t4) = w;
    }
  }
}

// 4-byte async copy; when !pred nothing is read and the destination is zero-filled.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 4 : 0));
}

// *p += {a, b, c, d} (16-byte aligned global f32), no return value.
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c),
               "f"(d));
}
