// Hopper backward (sm_90a only), included by flash_attn.cu after the shared helpers (Vis,
// BwdQueryTiles, bwd_load_q, load_tile_sw128, sw128_desc): FlashAttention-3's layout without warp
// specialisation. One CTA of NWG warpgroups per (key tile of BK = 64 * NWG keys, b * hkv) owns dK,
// dV of its keys (warpgroup w: keys 64w..64w+63) and loops over the group's query heads and their
// query tiles of BQ rows (Q, dO, lse, delta double-buffered with cp.async). Every operand tile sits
// in 128-byte-swizzled shared memory. Per query tile, each warpgroup:
// - S^T = K Q^T and dP^T = V dO^T (wgmma, both operands K-major from shared memory), 64 keys x BQ
//   queries; P^T = exp2(S^T scale log2e - lse), dS^T = P^T (dP^T - delta), masked as in `bwd_mma`;
// - dV += P^T dO and dK += dS^T Q (wgmma with P^T / dS^T as the register A operand, dO / Q read
//   MN-major);
// - dS^T goes to shared memory; after a barrier, dQ = dS K (both operands MN-major) over all BK
//   keys for its share of the query tile (query slice w % (BQ / 64), columns (w / (BQ / 64)) * DN..)
//   is added with f32 vector atomics into the zeroed (b, hq, nq, D) buffer of `flash_bwd_dq_convert`.
// With PIPE, a step's dQ product is issued at the start of the next step, ahead of its S^T and dP^T
// (dS^T double-buffered; the step's first barrier also publishes dS^T, a discarded product on the
// first step keeps every wgmma unconditional), and its atomics run while they are on the tensor
// cores.
template <typename T, int D, int NWG, int BQ, bool PIPE, int MODE>
__device__ void bwd_wgmma(const T* q, const T* k, const T* v, const T* go, const float* lse,
                          const float* delta, T* dk, T* dv, float* dqa, Vis vis, const int4* qmeta,
                          const int4* kmeta, int hq, int hkv, int nq, int nk, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BK = 64 * NWG, NT = 128 * NWG, N8 = BQ / 8, DT = D / 8, KD = D / 16;
  // dQ shares: QS query slices of 64 rows times DS column blocks of DN columns, one per warpgroup.
  constexpr int QS = BQ / 64, DS = NWG / QS, DN = D / DS;
  static_assert(D % 64 == 0 && BQ % 64 == 0 && NWG % QS == 0 && DN % 64 == 0,
                "bwd_wgmma tile shape");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Swizzle atoms (8 rows x 128 B) must start on 1024-byte boundaries: the host adds 1 KB slack.
  T* sK = reinterpret_cast<T*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));
  T* sV = sK + BK * D;
  T* sQ = sV + BK * D;      // [2][BQ * D]
  T* sG = sQ + 2 * BQ * D;  // [2][BQ * D]
  T* sS = sG + 2 * BQ * D;  // [1 + PIPE][BK * BQ] dS^T: BK rows (keys) x BQ columns (queries)
  float* sL = reinterpret_cast<float*>(sS + (1 + PIPE) * BK * BQ);  // [2][BQ] lse
  float* sD = sL + 2 * BQ;                              // [2][BQ] delta
  int* sQv = reinterpret_cast<int*>(sD + 2 * BQ);  // [2][2 * BQ] query positions, buckets (mode 2)

  int warp = threadIdx.x / 32, lane = threadIdx.x & 31, gq = lane >> 2, t4 = lane & 3;
  int wg = warp / 4, wr = wg * 64 + (warp % 4) * 16;  // the warp's first key row in the tile
  int kt = blockIdx.x, bhk = blockIdx.y, n0 = kt * BK;
  int b = bhk / hkv, hk = bhk % hkv, group = hq / hkv;
  long long krow0 = (long long)bhk * nk;
  long long qhead0 = (long long)b * hq + (long long)hk * group;  // first query head of the group
  float sl2 = scale * LOG2E;
  BwdQueryTiles<MODE, BQ, BK> tiles(vis, qmeta, kmeta, n0, nk, nq, hk, group, bhk, kt, qhead0);
  const int nqt = tiles.nqt, p_end = tiles.p_end;
  const int2 sb = tiles.sb;
  int p = tiles.next(0);
  if (MODE >= 2 && p >= p_end) {  // no query sees these keys (sparse and sink-band modes)
    bwd_zero_rows<T, BK, D, NT>(dk + krow0 * D, dv + krow0 * D, n0, nk);
    return;
  }
  bool p_full = tiles.full(p);
  auto load_q = [&](int p, int bf) {
    long long qr0 = (qhead0 + p / nqt) * nq;
    int m0 = (p % nqt) * BQ;
    bwd_load_q<T, BQ, D, NT, true>(sQ + bf * BQ * D, sG + bf * BQ * D, sL + bf * BQ,
                                   sD + bf * BQ, q, go, lse, delta, qr0, m0, nq);
    if constexpr (MODE == 2)
      load_pos_bkt<BQ, NT>(sQv + bf * 2 * BQ, vis.q_pos, vis.q_bkt, vis.has_bkt, qr0, m0, nq,
                           threadIdx.x);
  };

  // Per-thread key rows (gq, gq + 8 of the warp's 16) and their sparse keys.
  int j_r[2], kp[2], kb[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    int j = n0 + wr + gq + hf * 8;
    j_r[hf] = j;
    kp[hf] = INT_MAX_;
    kb[hf] = -2;
    if (MODE == 2 && j < nk) {
      kp[hf] = vis.k_pos[krow0 + j];
      kb[hf] = vis.has_bkt ? vis.k_bkt[krow0 + j] : 0;
    }
  }

  load_tile_sw128<T, BK, D, NT>(sK, k + krow0 * D, n0, nk, threadIdx.x);
  load_tile_sw128<T, BK, D, NT>(sV, v + krow0 * D, n0, nk, threadIdx.x);
  load_q(p, 0);
  cp_async_commit();

  float adk[DT][4], adv[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) adk[i][e] = adv[i][e] = 0.f;

  // This warpgroup's 64 key rows of K and V: the K-major A operands of S^T and dP^T (k-step kk in
  // column block kk / 4, at byte offset 32 * (kk % 4) of the swizzled rows).
  const T* ka = sK + wg * 64 * 64;
  const T* va = sV + wg * 64 * 64;
  // dQ = dS K: A = this warpgroup's query slice of dS^T (column block of 64 queries at dsa_off,
  // MN-major), B = K's column block(s) of this warpgroup's DN columns (MN-major, like V in the
  // forward).
  const int dsa_off = (wg % QS) * BK * 64;
  const T* kb_s = sK + (wg / QS) * (DN / 64) * BK * 64;

  // dQ rows of the share: lane pairs (t4, t4 ^ 1) swap halves, the even lane adds 4 columns of
  // row gq, the odd lane 4 columns of row gq + 8, one 16-byte vector reduction each.
  float aq[DN / 8][4];
  auto dq_add = [&](int m0, long long qr0) {
    bool odd = t4 & 1;
    int i = m0 + (wg % QS) * 64 + (warp % 4) * 16 + gq + (odd ? 8 : 0);
    float* row = dqa + (qr0 + i) * D + (wg / QS) * DN + 2 * (t4 & 2);
#pragma unroll
    for (int dt = 0; dt < DN / 8; ++dt) {
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

  // dQ share = dS K over the BK keys from the dS^T buffer cS (k-step kk: keys 16kk.., 2048 bytes
  // further in both operands).
  auto issue_dq = [&](const T* cS) {
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      wgmma_ss_tt<T, DN>(aq, sw128_desc(cS + dsa_off + kk * 16 * 64, BK * 128),
                         sw128_desc(kb_s + kk * 16 * 64, BK * 128), kk > 0);
    wgmma_commit();
  };

  int buf = 0, prev_m0 = 0;
  long long prev_qr0 = -1;  // PIPE: the previous query tile (its dQ product not yet issued)
  while (p < p_end) {
    cp_async_wait<0>();
    fence_proxy_async();
    // Tile p landed; every warpgroup is done with buf ^ 1 and (without PIPE) sS, and (PIPE) the
    // previous step's dS^T is in sS[buf ^ 1].
    __syncthreads();
    int pn = tiles.next(p + 1);
    bool pn_full = tiles.full(pn);
    if (pn < p_end) load_q(pn, buf ^ 1);
    cp_async_commit();

    const T* cQ = sQ + buf * BQ * D;
    const T* cG = sG + buf * BQ * D;
    const float* cL = sL + buf * BQ;
    const float* cD = sD + buf * BQ;
    const int* cQv = sQv + buf * 2 * BQ;
    int h = p / nqt, m0 = (p % nqt) * BQ;
    long long qr0 = (qhead0 + h) * nq;

    // S^T and dP^T (64 keys x BQ queries), issued together.
    float s[N8][4], dp[N8][4];
    wgmma_fence();
    if constexpr (PIPE) issue_dq(sS + (buf ^ 1) * BK * BQ);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
      wgmma_ss<T, BQ>(s, sw128_desc(ka + (kk / 4) * BK * 64 + (kk % 4) * 16, 16),
                      sw128_desc(cQ + (kk / 4) * BQ * 64 + (kk % 4) * 16, 16), kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk)
      wgmma_ss<T, BQ>(dp, sw128_desc(va + (kk / 4) * BK * 64 + (kk % 4) * 16, 16),
                      sw128_desc(cG + (kk / 4) * BQ * 64 + (kk % 4) * 16, 16), kk > 0);
    wgmma_commit();
    if constexpr (PIPE) {  // the previous step's dQ product is done
      wgmma_wait<2>();
      wgmma_fence_regs<DN / 8>(aq);
      if (prev_qr0 >= 0) dq_add(prev_m0, prev_qr0);
    }

    int ka0 = n0 + wr;  // the warp's first key
    bool need_mask = m0 + BQ > nq || n0 + BK > nk || (MODE == 1 && ka0 + 15 > m0 + vis.off) ||
                     (MODE == 2 && !p_full) ||
                     (MODE == 3 && !sb_tile_full(m0, m0 + BQ, ka0, ka0 + 16, sb));
    // P^T while dP^T is on the tensor cores.
    wgmma_wait<1>();
    wgmma_fence_regs<N8>(s);
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
        float L = cL[c];
        L = L == neg_inf() ? pos_inf() : L * LOG2E;  // stranded row: P = 0
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          int j = j_r[hf];
          bool ok;
          if constexpr (MODE == 2)
            ok = !need_mask ||
                 (i < nq && j < nk && sparse_sees(qp, qb, kp[hf], kb[hf], vis.strict));
          else if constexpr (MODE == 3)
            ok = !need_mask || (i < nq && j < nk && sb_sees(i, j, sb));
          else
            ok = !need_mask || (i < nq && j < nk && (MODE == 0 || j <= i + vis.off));
          float* sv = &s[nt][hf * 2 + e2];
          *sv = ok ? fast_exp2(*sv * sl2 - L) : 0.f;
        }
      }
    }
    wgmma_wait<0>();
    wgmma_fence_regs<N8>(dp);
    // dS^T = P^T (dP^T - delta); P^T and dS^T to A fragments (two adjacent n-tiles of the C
    // fragments are one k-step of A), dS^T also to shared memory.
    uint32_t pa[BQ / 16][4], da[BQ / 16][4];
#pragma unroll
    for (int nt = 0; nt < N8; ++nt) {
      float d0 = cD[nt * 8 + 2 * t4], d1 = cD[nt * 8 + 2 * t4 + 1];
      dp[nt][0] = s[nt][0] * (dp[nt][0] - d0);
      dp[nt][1] = s[nt][1] * (dp[nt][1] - d1);
      dp[nt][2] = s[nt][2] * (dp[nt][2] - d0);
      dp[nt][3] = s[nt][3] * (dp[nt][3] - d1);
    }
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[kk][0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
      da[kk][1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
      da[kk][2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[kk][3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
    }
    // dS^T element (key row r, query column c) sits in column block c / 64, row r, 16-byte chunk
    // (c % 64 / 8) ^ (r % 8) (the swizzle of load_tile_sw128); r % 8 == gq here.
    T* cS = sS + (PIPE ? buf : 0) * BK * BQ;
#pragma unroll
    for (int nt = 0; nt < N8; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        int r = wr + gq + hf * 8;
        *reinterpret_cast<uint32_t*>(cS + (nt / 8) * BK * 64 + r * 64 + ((nt % 8) ^ gq) * 8 +
                                     2 * t4) = da[nt / 2][(nt % 2) * 2 + hf];
      }
    fence_proxy_async();
    // dV += P^T dO, dK += dS^T Q (dK scaled at the end): dO and Q's k-step kk is their rows
    // 16kk.. (2048 bytes further), their column blocks BQ * 128 bytes apart.
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk)
      wgmma_rs_tb<T, D>(adv, pa[kk], sw128_desc(cG + kk * 16 * 64, BQ * 128));
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk)
      wgmma_rs_tb<T, D>(adk, da[kk], sw128_desc(cQ + kk * 16 * 64, BQ * 128));
    wgmma_commit();
    if constexpr (!PIPE) {
      __syncthreads();  // every warpgroup's dS^T is in sS
      issue_dq(cS);
    }
    wgmma_wait<0>();  // this step's Q, dO buffer and P, dS fragments are free
    wgmma_fence_regs<DT>(adv);
    wgmma_fence_regs<DT>(adk);
    wgmma_fence_regs_a<BQ / 16>(pa);
    wgmma_fence_regs_a<BQ / 16>(da);
    if constexpr (PIPE) {
      prev_m0 = m0;
      prev_qr0 = qr0;
    } else {
      wgmma_fence_regs<DN / 8>(aq);
      dq_add(m0, qr0);
    }
    p = pn;
    p_full = pn_full;
    buf ^= 1;
  }
  if constexpr (PIPE) {
    if (prev_qr0 >= 0) {  // the last step's dQ
      fence_proxy_async();
      __syncthreads();
      wgmma_fence();
      issue_dq(sS + (buf ^ 1) * BK * BQ);
      wgmma_wait<0>();
      wgmma_fence_regs<DN / 8>(aq);
      dq_add(prev_m0, prev_qr0);
    }
  }
  cp_async_wait<0>();
  store_acc<T, D>(dk + krow0 * D, adk, n0 + wr, nk, scale, scale);
  store_acc<T, D>(dv + krow0 * D, adv, n0 + wr, nk, 1.f, 1.f);
#endif
}
