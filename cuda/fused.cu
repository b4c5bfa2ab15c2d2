// Fused training ops of the char-level GPT (see src/fused/cuda.rs for the launch side):
// - ln_fwd / ln_bwd_dx / ln_bwd_dgain: LayerNorm over the last axis with a gain and no bias, one
//   warp per row, statistics in f32; the gain gradient is reduced per block into f32 partials
//   (summed over blocks by the caller).
// - gelu_fwd / gelu_bwd: exact (erf) GELU, element-wise, f32 math.
// - emb_bwd: embedding backward, atomicAdd of each output-gradient row into an f32 table.
// - heads_split / heads_merge: (b, t, parts, h, d) <-> one part (b, h, t, d) (parts 3: the fused
//   qkv projection; parts 1: heads of a plain (b, t, h·d) tensor).
// - xent: softmax cross-entropy per row (loss and logit gradient), one warp per row.
// - adamw_step: one AdamW update of an f32 parameter, its moments and gradient.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL 0xffffffffu

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

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

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * gain; one warp per row.
template <typename T>
__device__ void ln_bwd_dx(const T* __restrict__ x, const T* __restrict__ gain,
                          const T* __restrict__ dy, T* __restrict__ dx, int rows, int c,
                          float eps) {
  int lane = threadIdx.x & 31;
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
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
    float g = to_f(dy[off + j]) * to_f(gain[j]);
    float xh = (to_f(x[off + j]) - mean) * rstd;
    dx[off + j] = from_f<T>(rstd * (g - sg - xh * sgx));
  }
}

// partial[blockIdx.x, j] = sum over this block's rows of dy * xhat (f32, shared-memory atomics);
// rows are strided over the grid, one warp per row at a time. Dynamic shared memory: c floats.
template <typename T>
__device__ void ln_bwd_dgain(const T* __restrict__ x, const T* __restrict__ dy,
                             float* __restrict__ partial, int rows, int c, float eps) {
  extern __shared__ float acc[];
  for (int j = threadIdx.x; j < c; j += blockDim.x) acc[j] = 0.f;
  __syncthreads();
  int lane = threadIdx.x & 31;
  int warps = blockDim.x >> 5;
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    size_t off = (size_t)row * c;
    float mean, rstd;
    row_stats(x + off, c, eps, lane, mean, rstd);
    for (int j = lane; j < c; j += 32)
      atomicAdd(&acc[j], to_f(dy[off + j]) * (to_f(x[off + j]) - mean) * rstd);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < c; j += blockDim.x) partial[(size_t)blockIdx.x * c + j] = acc[j];
}

__device__ __forceinline__ float gelu_f(float x) {
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}
// d/dx gelu(x) = Phi(x) + x * phi(x).
__device__ __forceinline__ float gelu_grad_f(float x) {
  float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
  float pdf = 0.39894228040143268f * __expf(-0.5f * x * x);
  return cdf + x * pdf;
}

template <typename T>
__device__ void gelu_fwd(const T* __restrict__ x, T* __restrict__ y, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    y[i] = from_f<T>(gelu_f(to_f(x[i])));
}

template <typename T>
__device__ void gelu_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                         size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x)
    dx[i] = from_f<T>(to_f(dy[i]) * gelu_grad_f(to_f(x[i])));
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

// out (b, h, t, d) = part `p` of x (b, t, parts, h, d); one thread per output element.
template <typename T>
__device__ void heads_split(const T* __restrict__ x, T* __restrict__ out, int b, int h, int t,
                            int d, int parts, int p) {
  size_t n = (size_t)b * h * t * d;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t e = i % d, r = i / d;
    size_t ti = r % t, bh = r / t;
    size_t hi = bh % h, bi = bh / h;
    out[i] = x[(((bi * t + ti) * parts + p) * h + hi) * d + e];
  }
}

// The inverse of heads_split (and its gradient): dx (b, t, parts, h, d) holds dout (b, h, t, d)
// in part `p` and zeros in the other parts; one thread per dx element.
template <typename T>
__device__ void heads_merge(const T* __restrict__ dout, T* __restrict__ dx, int b, int h, int t,
                            int d, int parts, int p) {
  size_t n = (size_t)b * t * parts * h * d;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
       i += (size_t)gridDim.x * blockDim.x) {
    size_t e = i % d, r = i / d;
    size_t hi = r % h;
    r /= h;
    size_t pi = r % parts, bt = r / parts;
    size_t ti = bt % t, bi = bt / t;
    dx[i] = pi == (size_t)p ? dout[((bi * h + hi) * t + ti) * d + e] : from_f<T>(0.f);
  }
}

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
  extern "C" __global__ void ln_bwd_dx_##NAME(const TY* x, const TY* gain, const TY* dy, TY* dx,  \
                                              int rows, int c, float eps) {                       \
    ln_bwd_dx(x, gain, dy, dx, rows, c, eps);                                                     \
  }                                                                                               \
  extern "C" __global__ void ln_bwd_dgain_##NAME(const TY* x, const TY* dy, float* partial,       \
                                                 int rows, int c, float eps) {                    \
    ln_bwd_dgain(x, dy, partial, rows, c, eps);                                                   \
  }                                                                                               \
  extern "C" __global__ void gelu_fwd_##NAME(const TY* x, TY* y, size_t n) { gelu_fwd(x, y, n); } \
  extern "C" __global__ void gelu_bwd_##NAME(const TY* x, const TY* dy, TY* dx, size_t n) {       \
    gelu_bwd(x, dy, dx, n);                                                                       \
  }                                                                                               \
  extern "C" __global__ void emb_bwd_##NAME(const TY* dy, const uint32_t* ids, float* table_grad, \
                                            int rows, int c, uint32_t vocab) {                    \
    emb_bwd(dy, ids, table_grad, rows, c, vocab);                                                      \
  }                                                                                               \
  extern "C" __global__ void heads_split_##NAME(const TY* x, TY* out, int b, int h, int t,        \
                                                int d, int parts, int p) {                        \
    heads_split(x, out, b, h, t, d, parts, p);                                                    \
  }                                                                                               \
  extern "C" __global__ void heads_merge_##NAME(const TY* dout, TY* dx, int b, int h, int t,      \
                                                int d, int parts, int p) {                        \
    heads_merge(dout, dx, b, h, t, d, parts, p);                                                  \
  }                                                                                               \
  extern "C" __global__ void xent_##NAME(const TY* logits, const uint32_t* targets, float* loss,  \
                                         TY* grad, int rows, int v, float scale) {                \
    xent(logits, targets, loss, grad, rows, v, scale);                                            \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

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
    float g = grad[i] * grad_scale;
    float m = beta1 * state[i] + (1.f - beta1) * g;
    float v = beta2 * state[n + i] + (1.f - beta2) * g * g;
    float update = (m * scale_m) / (sqrtf(v * scale_v) + eps);
    out[i] = param[i] * (1.f - lr * weight_decay) - lr * update;
    out[n + i] = m;
    out[2 * n + i] = v;
  }
}
