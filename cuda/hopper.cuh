// Hopper (sm_90a) building blocks shared by the warp-specialised kernels of flash_attn.cu and
// sparsek.cu: 128-byte-swizzled shared tiles (async copies and wgmma descriptors), mbarriers,
// named barriers and warpgroup register reallocation. The PTX of the mbarrier / setmaxnreg
// wrappers is only valid on sm_90+; callers compile them inside `__CUDA_ARCH_FEAT_SM90_ALL`.
#pragma once
#include <stdint.h>

#include "mma.cuh"

// Async copy of rows [row0, row0 + ROWS) of a (n, D) matrix (rows ld elements apart, D by
// default) into a 128-byte-swizzled shared tile
// (the layout wgmma's SWIZZLE_128B descriptors read) by NT threads (this one is number tid): D / 64
// column blocks of ROWS rows x 128 bytes, the 16-byte chunk c of row r stored at chunk c ^ (r % 8)
// of its row. Rows past n are zero-filled. The tile must start on a 1024-byte boundary. A thread
// copies the same chunk c of rows r0, r0 + RS, ... (RS = NT / (D / 8), a multiple of 8, so the
// swizzle is the same for all of them).
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile_sw128(T* s, const T* g, int row0, int n, int tid,
                                                long long ld = D) {
  constexpr int CH = D / 8, RS = NT / CH;
  static_assert(NT % CH == 0 && RS % 8 == 0 && ROWS % RS == 0, "load_tile_sw128: tile shape");
  int r0 = tid / CH, c = tid % CH;
  T* sp = s + (c / 8) * ROWS * 64 + r0 * 64 + ((c % 8) ^ (r0 & 7)) * 8;
  const T* gp = g + (long long)(row0 + r0) * ld + c * 8;
#pragma unroll
  for (int j = 0; j < ROWS / RS; ++j) {
    bool ok = row0 + r0 + j * RS < n;
    cp_async16(sp + j * RS * 64, ok ? gp + (long long)j * RS * ld : g, ok);
  }
}

// wgmma shared-memory matrix descriptor of a 128-byte-swizzled operand at p: stride byte offset
// 1024 (from one 8-row group to the next), leading byte offset `lbo` (MN-major operands: from one
// 64-element column block to the next; unused for K-major), swizzle mode 1 (128 B).
__device__ __forceinline__ uint64_t sw128_desc(const void* p, uint32_t lbo) {
  uint64_t a = smem_addr(p);
  return ((a & 0x3FFFF) >> 4) | ((uint64_t)((lbo >> 4) & 0x3FFF) << 16) |
         ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
// sw128_desc(p + bytes, lbo) from d = sw128_desc(p, lbo), for `bytes` a multiple of 16 that keeps
// p + bytes inside the same shared allocation: only the start-address field (bits 0-13) moves.
__device__ __forceinline__ uint64_t sw128_desc_add(uint64_t d, uint32_t bytes) {
  return ((d >> 32) << 32) | (uint32_t)((uint32_t)d + (bytes >> 4));
}

// mbarrier (shared-memory barrier) primitives: init with the expected arrivals per phase; arrive;
// arrive once every cp.async this thread issued so far has landed (counts as one of the expected
// arrivals); wait for the completion of the phase of the given parity.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_cp_async(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t a = smem_addr(bar), done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
  } while (!done);
}
// Waits for `threads` threads at named barrier `id` (1..15).
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Warpgroup register reallocation (every thread of the warpgroup executes it).
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
