//! Twilight: every stage against a brute-force host reference, the whole pipeline against a
//! sorted-top-p oracle and the dense reference, and the error paths. CPU always; CUDA too when
//! built with `--features cuda` on a GPU machine (a visible SKIP line otherwise).

#![allow(clippy::needless_range_loop)] // index-heavy brute-force references

mod common;

use candle::{DType, Device, Result, Tensor};
use candle_sparse_attn::reference;
use candle_sparse_attn::twilight::{
    decode_layer, decode_with, estimate_scores, page_scores, prune_and_union, quantize_int4,
    sparse_decode_attention, top_indices, top_p, union_per_group, BaseSelector, FullSelector,
    QuestSelector, TopKSelector, TwilightCache, TwilightConfig, WindowSelector, NO_TOKEN,
    TOP_P_EPS,
};
use common::devices;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

/// Keys with structure: rank-4 signal + noise, plus heavy hitters (token 0 and every 23rd token)
/// aligned with a direction the queries share, so that attention is peaked and top-p prunes.
fn structured_keys(rng: &mut StdRng, b: usize, h: usize, t: usize, d: usize) -> Vec<f32> {
    let basis = gaussian(rng, 4 * d);
    let mut k = gaussian(rng, b * h * t * d);
    for row in 0..b * h * t {
        let tok = row % t;
        let coef = gaussian(rng, 4);
        let heavy = if tok == 0 || tok % 23 == 5 { 3.0 } else { 0.0 };
        for c in 0..d {
            let mut x = 0.3 * k[row * d + c];
            for r in 0..4 {
                x += coef[r] * basis[r * d + c];
            }
            k[row * d + c] = x + heavy * basis[c];
        }
    }
    k
}

struct Case {
    cache: TwilightCache,
    /// `(b, hq, 1, d)` on the device.
    q: Tensor,
    /// Host copies (f32) of the stored keys and values `(b, hkv, t, d)` and of q `(b, hq, 1, d)`.
    k: Tensor,
    v: Tensor,
    q_host: Tensor,
}

/// A cache of `t` tokens built by a prefill of `t - 3` then three single-token appends.
#[allow(clippy::too_many_arguments)]
fn case(
    dev: &Device,
    dtype: DType,
    (b, hq, hkv, t, d): (usize, usize, usize, usize, usize),
    page: usize,
    capacity: usize,
    seed: u64,
) -> Result<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = Tensor::from_vec(structured_keys(&mut rng, b, hkv, t, d), (b, hkv, t, d), dev)?
        .to_dtype(dtype)?;
    let v = Tensor::from_vec(gaussian(&mut rng, b * hkv * t * d), (b, hkv, t, d), dev)?
        .to_dtype(dtype)?;
    let qv: Vec<f32> = gaussian(&mut rng, b * hq * d);
    let q = (Tensor::from_vec(qv, (b, hq, 1, d), dev)? * 0.6)?;
    // Queries lean towards the heavy-hitter direction of their keys (the first basis vector is
    // reconstructed from key 0 of batch 0, head 0).
    let lean = k
        .narrow(0, 0, 1)?
        .narrow(1, 0, 1)?
        .narrow(2, 0, 1)?
        .to_dtype(DType::F32)?;
    let q = q.broadcast_add(&(lean * 0.15)?)?.to_dtype(dtype)?;
    let mut cache = TwilightCache::new(b, hkv, d, capacity, page, dtype, dev)?;
    cache.append(&k.narrow(2, 0, t - 3)?, &v.narrow(2, 0, t - 3)?)?;
    for i in t - 3..t {
        cache.append(&k.narrow(2, i, 1)?, &v.narrow(2, i, 1)?)?;
    }
    let host = |x: &Tensor| x.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    Ok(Case {
        q_host: host(&q)?,
        k: host(&k)?,
        v: host(&v)?,
        q,
        cache,
    })
}

fn vec3<T: candle::WithDType>(t: &Tensor) -> Result<Vec<Vec<Vec<T>>>> {
    t.to_device(&Device::Cpu)?.to_vec3::<T>()
}

fn vec4(t: &Tensor) -> Result<Vec<Vec<Vec<Vec<f32>>>>> {
    vec4_of::<f32>(&t.to_dtype(DType::F32)?)
}

fn vec4_of<T: candle::WithDType>(t: &Tensor) -> Result<Vec<Vec<Vec<Vec<T>>>>> {
    let (a, b, c, d) = t.dims4()?;
    let flat = t
        .to_device(&Device::Cpu)?
        .reshape((a * b, c, d))?
        .to_vec3::<T>()?;
    Ok(flat.chunks(b).map(|x| x.to_vec()).collect())
}

/// Per-row sorted top-p oracle over weights: `{w ≥ w_(k)}` with `k` the smallest prefix of the
/// descending order reaching `p`.
fn oracle_top_p(w: &[f32], p: f32) -> Vec<bool> {
    let mut sorted: Vec<f32> = w.iter().copied().filter(|&x| x > 0.0).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut acc = 0f32;
    let mut cut = sorted[sorted.len() - 1];
    for &x in &sorted {
        acc += x;
        if acc >= p {
            cut = x;
            break;
        }
    }
    w.iter().map(|&x| x > 0.0 && x >= cut).collect()
}

/// The properties of a top-p row: non-empty, mass ≥ p, a threshold set (every kept weight above
/// every dropped one), minimal up to weights within `TOP_P_EPS` of the smallest kept one.
fn check_top_p_row(w: &[f32], kept: &[bool], p: f32, what: &str) {
    let mass: f32 = w.iter().zip(kept).filter(|(_, &k)| k).map(|(x, _)| x).sum();
    let min_kept = w
        .iter()
        .zip(kept)
        .filter(|(_, &k)| k)
        .map(|(x, _)| *x)
        .fold(f32::INFINITY, f32::min);
    let max_dropped = w
        .iter()
        .zip(kept)
        .filter(|(_, &k)| !k)
        .map(|(x, _)| *x)
        .fold(0f32, f32::max);
    assert!(kept.iter().any(|&k| k), "{what}: empty set");
    assert!(mass >= p - 1e-5, "{what}: mass {mass} < p {p}");
    assert!(
        min_kept > max_dropped || max_dropped == 0.0,
        "{what}: not a threshold set ({min_kept} <= {max_dropped})"
    );
    let above: f32 = w
        .iter()
        .zip(kept)
        .filter(|(x, &k)| k && **x > min_kept + TOP_P_EPS)
        .map(|(x, _)| x)
        .sum();
    assert!(
        above < p + 1e-6,
        "{what}: not minimal, mass {above} without the smallest weights already reaches p {p}"
    );
}

fn softmax(s: &[f32]) -> Vec<f32> {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = s.iter().map(|&x| (x - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

#[test]
fn page_bounds_track_appends() -> Result<()> {
    for dev in devices() {
        // 37 tokens in pages of 16: two full pages and a partial one, built incrementally.
        let c = case(&dev, DType::F32, (2, 2, 2, 37, 32), 16, 64, 1)?;
        assert_eq!(c.cache.num_pages(), 3);
        let (mins, maxs, k) = (
            vec4(c.cache.page_min())?,
            vec4(c.cache.page_max())?,
            vec4(&c.k)?,
        );
        for b in 0..2 {
            for h in 0..2 {
                for p in 0..3 {
                    for ch in 0..32 {
                        let vals: Vec<f32> = (p * 16..(p * 16 + 16).min(37))
                            .map(|t| k[b][h][t][ch])
                            .collect();
                        let mn = vals.iter().copied().fold(f32::INFINITY, f32::min);
                        let mx = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        assert_eq!(
                            mins[b][h][p][ch], mn,
                            "{dev:?} min b{b} h{h} page {p} ch {ch}"
                        );
                        assert_eq!(
                            maxs[b][h][p][ch], mx,
                            "{dev:?} max b{b} h{h} page {p} ch {ch}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn int4_round_trip_error_bound() -> Result<()> {
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16] {
            let c = case(&dev, dtype, (1, 2, 2, 40, 64), 16, 40, 2)?;
            let deq = vec4(&c.cache.dequantized_keys()?)?;
            let k = vec4(&c.k)?;
            let sm = vec4(&c.cache.k_scale_min().narrow(2, 0, 40)?)?;
            for h in 0..2 {
                for t in 0..40 {
                    let row = &k[0][h][t];
                    let mn = row.iter().copied().fold(f32::INFINITY, f32::min);
                    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let scale = (mx - mn).max(1e-9) / 15.0;
                    // Stored f16 scale and min: relative rounding 2^-11.
                    assert!(
                        (sm[0][h][t][0] - scale).abs() <= scale * 1e-3,
                        "{dev:?} scale"
                    );
                    assert!(
                        (sm[0][h][t][1] - mn).abs() <= mn.abs() * 1e-3,
                        "{dev:?} min"
                    );
                    let bound = 0.5 * scale + 15.0 * scale * 1e-3 + mn.abs() * 1e-3 + 1e-6;
                    for ch in 0..64 {
                        let err = (deq[0][h][t][ch] - row[ch]).abs();
                        assert!(
                            err <= bound,
                            "{dev:?} {dtype:?} h{h} t{t} ch{ch}: |k̂ − k| = {err} > {bound}"
                        );
                    }
                }
            }
            // Packing: low nibble = even channel (checked against a host quantisation).
            let codes = vec4_of::<u8>(c.cache.k_codes())?;
            let row = &k[0][1][7];
            let mn = row.iter().copied().fold(f32::INFINITY, f32::min);
            let scale =
                (row.iter().copied().fold(f32::NEG_INFINITY, f32::max) - mn).max(1e-9) / 15.0;
            let code = |x: f32| ((x - mn) / scale).round().clamp(0.0, 15.0) as u8;
            for j in 0..32 {
                assert_eq!(
                    codes[0][1][7][j],
                    code(row[2 * j]) | (code(row[2 * j + 1]) << 4),
                    "{dev:?} byte {j}"
                );
            }
        }
        // Constant rows: scale clamps to 1e-9 / 15 and the round trip is exact.
        let k = Tensor::full(0.5f32, (1, 1, 2, 32), &dev)?;
        let (codes, sm) = quantize_int4(&k)?;
        assert!(codes
            .flatten_all()?
            .to_vec1::<u8>()?
            .iter()
            .all(|&c| c == 0));
        assert_eq!(
            sm.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?[1],
            0.5
        );
    }
    Ok(())
}

#[test]
fn quest_scores_bound_and_top_pages() -> Result<()> {
    for dev in devices() {
        let (b, hq, hkv, t, d, ps) = (2, 4, 2, 75, 32, 8);
        let c = case(&dev, DType::F32, (b, hq, hkv, t, d), ps, 80, 3)?;
        let q3 = c.q.squeeze(2)?;
        let scores = vec3::<f32>(&page_scores(&c.cache, &q3)?)?;
        let (k, q) = (vec4(&c.k)?, vec4(&c.q_host)?);
        let pages = t.div_ceil(ps);
        for bi in 0..b {
            for h in 0..hq {
                let kv = h / (hq / hkv);
                for p in 0..pages {
                    let toks: Vec<usize> = (p * ps..(p * ps + ps).min(t)).collect();
                    let bound: f32 = (0..d)
                        .map(|ch| {
                            let qc = q[bi][h][0][ch];
                            toks.iter()
                                .map(|&tk| qc * k[bi][kv][tk][ch])
                                .fold(f32::NEG_INFINITY, f32::max)
                        })
                        .sum();
                    assert!(
                        (scores[bi][h][p] - bound).abs() <= 1e-4 * (1.0 + bound.abs()),
                        "{dev:?} page score"
                    );
                    for &tk in &toks {
                        let dot: f32 = (0..d).map(|ch| q[bi][h][0][ch] * k[bi][kv][tk][ch]).sum();
                        assert!(dot <= scores[bi][h][p] + 1e-4, "{dev:?} bound violated");
                    }
                }
            }
        }
        // Top pages: budget 20 tokens → 3 pages of 8; the partial last page pads with NO_TOKEN.
        let cand = vec3::<u32>(&QuestSelector::unpinned(20).select(&c.cache, &q3)?)?;
        for bi in 0..b {
            for h in 0..hq {
                let mut order: Vec<usize> = (0..pages).collect();
                order.sort_by(|&x, &y| scores[bi][h][y].total_cmp(&scores[bi][h][x]));
                let mut top = order[..3].to_vec();
                top.sort();
                let want: Vec<u32> = top
                    .iter()
                    .flat_map(|&p| {
                        (p * ps..p * ps + ps).map(|tk| if tk < t { tk as u32 } else { NO_TOKEN })
                    })
                    .collect();
                assert_eq!(cand[bi][h], want, "{dev:?} b{bi} h{h}");
            }
        }
        // Budget above the context: every token.
        let all = vec3::<u32>(&QuestSelector::unpinned(1000).select(&c.cache, &q3)?)?;
        let mut ids: Vec<u32> = all[1][3]
            .iter()
            .copied()
            .filter(|&x| x != NO_TOKEN)
            .collect();
        ids.sort();
        assert_eq!(ids, (0..t as u32).collect::<Vec<_>>());
    }
    Ok(())
}

/// Pinned pages: the first `sink_pages` and the last `recent_pages` pages are always selected,
/// inside the budget (lower page indices first when they alone exceed it), the rest by bound;
/// a partial last page pads with NO_TOKEN. Against a host ranking of the page scores, on every
/// device (the fused CUDA kernel and the staged path).
#[test]
fn quest_pins_sink_and_recent_pages() -> Result<()> {
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16] {
            let (b, hq, hkv, t, d, ps) = (2, 4, 2, 203, 64, 16);
            let c = case(&dev, dtype, (b, hq, hkv, t, d), ps, 256, 21)?;
            let q3 = c.q.squeeze(2)?.contiguous()?;
            let scores = vec3::<f32>(&page_scores(&c.cache, &q3)?)?;
            let pages = t.div_ceil(ps);
            for (sink, recent, keep) in [(1, 1, 5), (2, 3, 6), (0, 2, 4), (3, 0, 4), (3, 3, 4)] {
                let quest = QuestSelector {
                    budget: keep * ps - 3,
                    sink_pages: sink,
                    recent_pages: recent,
                };
                let cand = vec3::<u32>(&quest.select(&c.cache, &q3)?)?;
                for bi in 0..b {
                    for h in 0..hq {
                        let rank = |p: usize| {
                            if p < sink || p + recent >= pages {
                                f32::INFINITY
                            } else {
                                scores[bi][h][p]
                            }
                        };
                        let mut order: Vec<usize> = (0..pages).collect();
                        order.sort_by(|&x, &y| rank(y).total_cmp(&rank(x)));
                        let mut top = order[..keep].to_vec();
                        top.sort();
                        let pinned = (0..pages).filter(|&p| p < sink || p + recent >= pages);
                        for p in pinned.take(keep) {
                            assert!(top.contains(&p), "page {p} pinned");
                        }
                        let want: Vec<u32> = top
                            .iter()
                            .flat_map(|&p| {
                                (p * ps..p * ps + ps)
                                    .map(|tk| if tk < t { tk as u32 } else { NO_TOKEN })
                            })
                            .collect();
                        assert_eq!(
                            cand[bi][h], want,
                            "{dev:?} {dtype:?} sink {sink} recent {recent} b{bi} h{h}"
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn top_indices_ties_go_to_lower_index() -> Result<()> {
    for dev in devices() {
        let s = Tensor::from_vec(vec![1f32, 3., 3., 0., 3., f32::NAN, 2.], (1, 1, 7), &dev)?;
        let top = vec3::<u32>(&top_indices(&s, 2, 1, 7)?)?;
        assert_eq!(top[0][0], vec![1, 2], "{dev:?}");
        let top = vec3::<u32>(&top_indices(&s, 4, 2, 13)?)?;
        assert_eq!(top[0][0], vec![2, 3, 4, 5, 8, 9, 12, NO_TOKEN], "{dev:?}");
        // Rows longer than one block pass, many equal scores.
        let n = 3000;
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32).collect();
        let s = Tensor::from_vec(v.clone(), (1, 1, n), &dev)?;
        let top = vec3::<u32>(&top_indices(&s, 500, 1, n)?)?;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
        let mut want: Vec<u32> = order[..500].iter().map(|&i| i as u32).collect();
        want.sort();
        assert_eq!(top[0][0], want, "{dev:?}");
    }
    Ok(())
}

#[test]
fn estimate_uses_int4_keys() -> Result<()> {
    for dev in devices() {
        let c = case(&dev, DType::F32, (1, 4, 2, 50, 64), 16, 50, 4)?;
        let q3 = c.q.squeeze(2)?;
        let ids: Vec<u32> = vec![0, 49, 3, NO_TOKEN, 17, 60, 25, 8];
        let cand = Tensor::from_vec(ids.repeat(4), (1, 4, 8), &dev)?;
        let est = vec3::<f32>(&estimate_scores(&c.cache, &q3, &cand, 0.125)?)?;
        let (deq, q) = (vec4(&c.cache.dequantized_keys()?)?, vec4(&c.q_host)?);
        for h in 0..4 {
            for (j, &tk) in ids.iter().enumerate() {
                if tk as usize >= 50 {
                    assert_eq!(est[0][h][j], f32::NEG_INFINITY, "{dev:?} padding");
                    continue;
                }
                let want: f32 = 0.125
                    * (0..64)
                        .map(|ch| q[0][h][0][ch] * deq[0][h / 2][tk as usize][ch])
                        .sum::<f32>();
                assert!(
                    (est[0][h][j] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{dev:?} h{h} tok {tk}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn top_p_is_minimal_threshold_set() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let n = 700;
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for temp in [0.3f32, 1.0, 3.0, 8.0] {
        rows.push(gaussian(&mut rng, n).iter().map(|x| x * temp).collect());
    }
    // Ties: 10 equal maxima, then a plateau; a one-hot row; a row with padding and token 0 absent.
    rows.push(
        (0..n)
            .map(|i| {
                if i % 70 == 3 {
                    5.0
                } else if i % 3 == 0 {
                    2.0
                } else {
                    0.0
                }
            })
            .collect(),
    );
    rows.push((0..n).map(|i| if i == 400 { 50.0 } else { 0.0 }).collect());
    rows.push(
        (0..n)
            .map(|i| {
                if i < 100 {
                    f32::NEG_INFINITY
                } else {
                    (i % 17) as f32 * 0.4
                }
            })
            .collect(),
    );
    let nrows = rows.len();
    let ids: Vec<u32> = (0..nrows * n).map(|i| (i % n) as u32 + 1000).collect();
    for dev in devices() {
        let est = Tensor::from_vec(rows.concat(), (1, nrows, n), &dev)?;
        let cand = Tensor::from_vec(ids.clone(), (1, nrows, n), &dev)?;
        for p in [0.5f32, 0.85, 0.95, 0.999] {
            let kept = vec3::<u32>(&top_p(&est, &cand, p)?)?;
            for (r, row) in rows.iter().enumerate() {
                let w = softmax(row);
                let mask: Vec<bool> = kept[0][r].iter().map(|&x| x != NO_TOKEN).collect();
                for (j, &x) in kept[0][r].iter().enumerate() {
                    assert!(
                        x == NO_TOKEN || x == ids[r * n + j],
                        "kept ids are the candidates' ids"
                    );
                }
                check_top_p_row(&w, &mask, p, &format!("{dev:?} p {p} row {r}"));
                let oracle = oracle_top_p(&w, p);
                let cut = w
                    .iter()
                    .zip(&oracle)
                    .filter(|(_, &o)| o)
                    .map(|(x, _)| *x)
                    .fold(f32::INFINITY, f32::min);
                for j in 0..n {
                    if mask[j] != oracle[j] {
                        assert!((w[j] - cut).abs() <= TOP_P_EPS + 1e-6, "{dev:?} p {p} row {r} tok {j}: differs from the sorted oracle beyond eps");
                    }
                }
            }
        }
        // p = 1 keeps every finite candidate (the base selector unchanged).
        let kept = vec3::<u32>(&top_p(&est, &cand, 1.0)?)?;
        for (r, row) in rows.iter().enumerate() {
            for j in 0..n {
                assert_eq!(kept[0][r][j] != NO_TOKEN, row[j].is_finite());
            }
        }
        // One-hot row: exactly the argmax.
        let kept = vec3::<u32>(&top_p(&est, &cand, 0.95)?)?;
        assert_eq!(kept[0][5].iter().filter(|&&x| x != NO_TOKEN).count(), 1);
        // Ties at the top: all 10 maxima kept together.
        let kept = vec3::<u32>(&top_p(&est, &cand, 0.1)?)?;
        assert_eq!(
            kept[0][4].iter().filter(|&&x| x != NO_TOKEN).count(),
            10,
            "{dev:?} ties"
        );
    }
    Ok(())
}

/// The `(b, hq, 1, t)` u8 mask of the union lists, on the CPU.
fn mask_of_lists(lists: &Tensor, hq: usize, t: usize) -> Result<Tensor> {
    let l = vec3::<u32>(lists)?;
    let (b, hkv) = (l.len(), l[0].len());
    let mut m = vec![0u8; b * hq * t];
    for bi in 0..b {
        for h in 0..hq {
            let row = &l[bi][h / (hq / hkv)];
            for &tk in &row[1..1 + row[0] as usize] {
                m[(bi * hq + h) * t + tk as usize] = 1;
            }
        }
    }
    Tensor::from_vec(m, (b, hq, 1, t), &Device::Cpu)
}

#[test]
fn gqa_union_and_sparse_attention_match_dense_reference() -> Result<()> {
    for dev in devices() {
        for dtype in [DType::F32, DType::BF16] {
            let (b, hq, hkv, t, d) = (2, 8, 2, 300, 64);
            let c = case(&dev, dtype, (b, hq, hkv, t, d), 16, 320, 6)?;
            let mut rng = StdRng::seed_from_u64(7);
            // Per query head kept sets of different sizes, with NO_TOKEN holes and duplicates.
            let n = 40;
            let mut kept = vec![NO_TOKEN; b * hq * n];
            for (r, row) in kept.chunks_mut(n).enumerate() {
                let size = 1 + (r * 7) % n;
                for x in row.iter_mut().take(size) {
                    *x = rng.random_range(0..t as u32);
                }
                row.swap(0, n - 1);
            }
            let kept_t = Tensor::from_vec(kept.clone(), (b, hq, n), &dev)?;
            let lists = union_per_group(&kept_t, hkv, t)?;
            assert_eq!(lists.dims(), &[b, hkv, 1 + (4 * n).min(t)]);
            let l = vec3::<u32>(&lists)?;
            for bi in 0..b {
                for g in 0..hkv {
                    let mut want: Vec<u32> = (0..4)
                        .flat_map(|j| {
                            kept[(bi * hq + g * 4 + j) * n..(bi * hq + g * 4 + j + 1) * n].to_vec()
                        })
                        .filter(|&x| x != NO_TOKEN)
                        .collect();
                    want.sort();
                    want.dedup();
                    let row = &l[bi][g];
                    assert_eq!(
                        &row[1..1 + row[0] as usize],
                        &want[..],
                        "{dev:?} union b{bi} g{g}"
                    );
                }
            }
            let scale = 1.0 / (d as f32).sqrt();
            let out = sparse_decode_attention(&c.cache, &c.q.squeeze(2)?, &lists, scale)?;
            let mask = mask_of_lists(&lists, hq, t)?;
            let want = reference::attention(&c.q_host, &c.k, &c.v, scale as f64, Some(&mask))?;
            let err = reference::rel_err(&out.unsqueeze(2)?, &want)?;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1.5e-2 };
            assert!(
                err < tol,
                "{dev:?} {dtype:?} sparse attention rel err {err}"
            );
        }
    }
    Ok(())
}

#[test]
fn p1_full_budget_equals_dense_decoding() -> Result<()> {
    for dev in devices() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1.5e-2)] {
            let (b, hq, hkv, t, d) = (2, 4, 2, 333, 128);
            let c = case(&dev, dtype, (b, hq, hkv, t, d), 16, 400, 8)?;
            let cfg = TwilightConfig {
                p: 1.0,
                base_budget: 400,
                page_size: 16,
                dense_layers: 2,
                ..TwilightConfig::default()
            };
            let want = reference::attention(&c.q_host, &c.k, &c.v, 1.0 / (d as f64).sqrt(), None)?;
            for layer in [0, 5] {
                let step = decode_layer(layer, &c.cache, &c.q, &cfg)?;
                assert_eq!(step.output.dims(), &[b, hq, 1, d]);
                let err = reference::rel_err(&step.output, &want)?;
                assert!(err < tol, "{dev:?} {dtype:?} layer {layer}: rel err {err}");
                let frac = step.kept_fraction()?.to_scalar::<f32>()?;
                assert!((frac - 1.0).abs() < 1e-6, "kept fraction {frac}");
            }
        }
    }
    Ok(())
}

/// The whole pipeline against the host oracle: Quest pages from the host keys, the estimate from
/// the dequantised keys, softmax over the candidates and a sorted top-p, the GQA union, and the
/// dense reference restricted to it.
#[test]
fn pipeline_matches_oracle() -> Result<()> {
    for dev in devices() {
        let (b, hq, hkv, t, d, ps) = (2, 4, 2, 500, 64, 16);
        let c = case(&dev, DType::F32, (b, hq, hkv, t, d), ps, 512, 9)?;
        let cfg = TwilightConfig {
            p: 0.9,
            base_budget: 160,
            page_size: ps,
            dense_layers: 0,
            ..TwilightConfig::default()
        };
        let step = decode_layer(3, &c.cache, &c.q, &cfg)?;
        let (k, q, deq) = (
            vec4(&c.k)?,
            vec4(&c.q_host)?,
            vec4(&c.cache.dequantized_keys()?)?,
        );
        let kept = vec3::<u32>(&step.kept)?;
        let scale = 1.0 / (d as f32).sqrt();
        let pages = t.div_ceil(ps);
        let mut total_kept = 0;
        for bi in 0..b {
            for h in 0..hq {
                let kv = h / (hq / hkv);
                let bound = |p: usize| -> f32 {
                    (0..d)
                        .map(|ch| {
                            let qc = q[bi][h][0][ch];
                            (p * ps..(p * ps + ps).min(t))
                                .map(|tk| qc * k[bi][kv][tk][ch])
                                .fold(f32::NEG_INFINITY, f32::max)
                        })
                        .sum()
                };
                // The default config pins the first and the last page.
                let rank = |p: usize| {
                    if p == 0 || p == pages - 1 {
                        f32::INFINITY
                    } else {
                        bound(p)
                    }
                };
                let mut order: Vec<usize> = (0..pages).collect();
                order.sort_by(|&x, &y| rank(y).total_cmp(&rank(x)));
                let cands: Vec<usize> = order[..10]
                    .iter()
                    .flat_map(|&p| p * ps..(p * ps + ps).min(t))
                    .collect();
                let est: Vec<f32> = cands
                    .iter()
                    .map(|&tk| {
                        scale
                            * (0..d)
                                .map(|ch| q[bi][h][0][ch] * deq[bi][kv][tk][ch])
                                .sum::<f32>()
                    })
                    .collect();
                let w = softmax(&est);
                let mut got: Vec<bool> = vec![false; cands.len()];
                for &x in kept[bi][h].iter().filter(|&&x| x != NO_TOKEN) {
                    let pos = cands
                        .iter()
                        .position(|&tk| tk == x as usize)
                        .expect("kept token is a candidate");
                    got[pos] = true;
                }
                check_top_p_row(&w, &got, 0.9, &format!("{dev:?} b{bi} h{h}"));
                total_kept += got.iter().filter(|&&g| g).count();
            }
        }
        assert!(
            total_kept < b * hq * 160,
            "pruning kept everything: {total_kept}"
        );
        let frac = step.kept_fraction()?.to_scalar::<f32>()?;
        let want_frac = total_kept as f32 / (b * hq * t) as f32;
        assert!(
            (frac - want_frac).abs() < 1e-6,
            "{dev:?} kept fraction {frac} vs {want_frac}"
        );
        let mask = mask_of_lists(&step.lists, hq, t)?;
        let want = reference::attention(&c.q_host, &c.k, &c.v, scale as f64, Some(&mask))?;
        let err = reference::rel_err(&step.output, &want)?;
        assert!(
            err < 1e-5,
            "{dev:?} output vs reference over the union: {err}"
        );
    }
    Ok(())
}

#[test]
fn other_base_selectors() -> Result<()> {
    for dev in devices() {
        let c = case(&dev, DType::F32, (1, 2, 2, 100, 32), 16, 100, 10)?;
        let q3 = c.q.squeeze(2)?;
        let w = vec3::<u32>(
            &WindowSelector {
                sink: 4,
                window: 10,
            }
            .select(&c.cache, &q3)?,
        )?;
        assert_eq!(
            w[0][1],
            [0, 1, 2, 3, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99]
        );
        let top = vec3::<u32>(&TopKSelector { budget: 5 }.select(&c.cache, &q3)?)?;
        let (k, q) = (vec4(&c.k)?, vec4(&c.q_host)?);
        let dots: Vec<f32> = (0..100)
            .map(|tk| (0..32).map(|ch| q[0][0][0][ch] * k[0][0][tk][ch]).sum())
            .collect();
        let mut order: Vec<u32> = (0..100).collect();
        order.sort_by(|&x, &y| dots[y as usize].total_cmp(&dots[x as usize]));
        let mut want = order[..5].to_vec();
        want.sort();
        assert_eq!(top[0][0], want, "{dev:?}");
        let cfg = TwilightConfig {
            p: 0.8,
            base_budget: 16,
            page_size: 16,
            dense_layers: 0,
            ..TwilightConfig::default()
        };
        for sel in [
            &FullSelector as &dyn BaseSelector,
            &WindowSelector {
                sink: 1,
                window: 30,
            },
        ] {
            let step = decode_with(&c.cache, &c.q, &cfg, sel)?;
            assert_eq!(step.output.dims(), &[1, 2, 1, 32]);
        }
    }
    Ok(())
}

/// The fused paths of a decode step (Quest selection in one call; estimate + top-p + union in
/// one call, one kernel each on CUDA) against the stage functions they replace, on every device:
/// selection exactly (ties included), the pruner up to the `TOP_P_EPS` ties of top-p, the union
/// exactly.
#[test]
fn fused_paths_match_stages() -> Result<()> {
    for dev in devices() {
        for (dtype, shape, budget, p) in [
            (DType::BF16, (2, 8, 2, 2000, 128), 512usize, 0.95f32),
            (DType::F32, (2, 6, 2, 1001, 64), 300, 0.8),
            (DType::F16, (1, 3, 3, 700, 32), 700, 0.9),
        ] {
            let (b, hq, hkv, t, d) = shape;
            let c = case(&dev, dtype, shape, 16, t + 30, 13)?;
            let q3 = c.q.squeeze(2)?.contiguous()?;
            let what = format!("{dev:?} {dtype:?} {shape:?}");
            let keep = budget.div_ceil(16).min(t.div_ceil(16));
            let cand = QuestSelector::unpinned(budget).select(&c.cache, &q3)?;
            let staged = top_indices(&page_scores(&c.cache, &q3)?, keep, 16, t)?;
            assert_eq!(
                vec3::<u32>(&cand)?,
                vec3::<u32>(&staged)?,
                "{what} selection"
            );
            let scale = 1.0 / (d as f32).sqrt();
            let est = estimate_scores(&c.cache, &q3, &cand, scale)?;
            let (kept, lists) = prune_and_union(&c.cache, &q3, &cand, scale, p)?;
            let want = vec3::<u32>(&top_p(&est, &cand, p)?)?;
            let (kept, est, cand_h) =
                (vec3::<u32>(&kept)?, vec3::<f32>(&est)?, vec3::<u32>(&cand)?);
            let (mut diff, mut total) = (0, 0);
            for bi in 0..b {
                for h in 0..hq {
                    let w = softmax(&est[bi][h]);
                    let mask: Vec<bool> = kept[bi][h].iter().map(|&x| x != NO_TOKEN).collect();
                    for (j, &x) in kept[bi][h].iter().enumerate() {
                        assert!(x == NO_TOKEN || x == cand_h[bi][h][j], "{what}: kept ids");
                        diff += (mask[j] != (want[bi][h][j] != NO_TOKEN)) as usize;
                        total += mask[j] as usize;
                    }
                    check_top_p_row(&w, &mask, p, &format!("{what} b{bi} h{h}"));
                }
            }
            assert!(
                diff * 100 <= total,
                "{what}: fused and staged top-p differ in {diff} of {total}"
            );
            let kept_t = Tensor::from_vec(
                kept.concat().concat(),
                (b, hq, kept[0][0].len()),
                &Device::Cpu,
            )?;
            let want_lists = vec3::<u32>(&union_per_group(&kept_t, hkv, t)?)?;
            let lists = vec3::<u32>(&lists)?;
            for bi in 0..b {
                for g in 0..hkv {
                    let (got, want) = (&lists[bi][g], &want_lists[bi][g]);
                    assert_eq!(got[0], want[0], "{what} union count b{bi} g{g}");
                    let n = got[0] as usize;
                    assert_eq!(got[1..1 + n], want[1..1 + n], "{what} union b{bi} g{g}");
                }
            }
            // p = 1: every finite candidate, unchanged.
            let (all, _) = prune_and_union(&c.cache, &q3, &cand, scale, 1.0)?;
            assert_eq!(vec3::<u32>(&all)?, cand_h, "{what} p = 1");
        }
    }
    Ok(())
}

/// Quest selection with many equal page scores (pages repeating with period 4): ties go to the
/// lower page index, in the fused path as in the stages and the CPU.
#[test]
fn quest_select_ties() -> Result<()> {
    let (b, hq, hkv, d, ps) = (1, 4, 2, 64, 16);
    let t = 64 * ps;
    let mut rng = StdRng::seed_from_u64(14);
    let period = gaussian(&mut rng, hkv * 4 * ps * d);
    let mut k = vec![0f32; b * hkv * t * d];
    for h in 0..hkv {
        for tok in 0..t {
            let src = (h * 4 * ps + tok % (4 * ps)) * d;
            k[(h * t + tok) * d..(h * t + tok + 1) * d].copy_from_slice(&period[src..src + d]);
        }
    }
    let q = gaussian(&mut rng, b * hq * d);
    let mut results = Vec::new();
    for dev in devices() {
        let kt = Tensor::from_vec(k.clone(), (b, hkv, t, d), &dev)?;
        let mut cache = TwilightCache::new(b, hkv, d, t, ps, DType::F32, &dev)?;
        cache.append(&kt, &kt)?;
        let q3 = Tensor::from_vec(q.clone(), (b, hq, d), &dev)?;
        let cand = vec3::<u32>(&QuestSelector::unpinned(6 * ps).select(&cache, &q3)?)?;
        let scores = vec3::<f32>(&page_scores(&cache, &q3)?)?;
        for h in 0..hq {
            let best = scores[0][h]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let top: Vec<usize> = (0..64)
                .filter(|&p| scores[0][h][p] == best)
                .take(6)
                .collect();
            assert_eq!(top.len(), 6, "{dev:?}: 16 tied pages per class");
            let want: Vec<u32> = top
                .iter()
                .flat_map(|&p| (p * ps..(p + 1) * ps).map(|x| x as u32))
                .collect();
            assert_eq!(cand[0][h], want, "{dev:?} h{h}");
        }
        results.push(cand);
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    Ok(())
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_matches_cpu_bf16() -> Result<()> {
    let devs = devices();
    if devs.len() < 2 {
        return Ok(());
    }
    let shape = (2, 8, 2, 2000, 128);
    let cfg = TwilightConfig {
        p: 0.95,
        base_budget: 512,
        page_size: 16,
        dense_layers: 0,
        ..TwilightConfig::default()
    };
    let cpu = case(&devs[0], DType::BF16, shape, 16, 2048, 11)?;
    let gpu = case(&devs[1], DType::BF16, shape, 16, 2048, 11)?;
    let (sc, sg) = (
        decode_layer(2, &cpu.cache, &cpu.q, &cfg)?,
        decode_layer(2, &gpu.cache, &gpu.q, &cfg)?,
    );
    let (kc, kg) = (vec3::<u32>(&sc.kept)?, vec3::<u32>(&sg.kept)?);
    let mut diff = 0;
    let mut total = 0;
    for (rc, rg) in kc.iter().flatten().zip(kg.iter().flatten()) {
        for (a, g) in rc.iter().zip(rg) {
            diff += ((*a == NO_TOKEN) != (*g == NO_TOKEN)) as usize;
            total += (*a != NO_TOKEN) as usize;
        }
    }
    assert!(
        diff * 100 <= total,
        "CPU and CUDA kept sets differ in {diff} of {total}"
    );
    let err = reference::rel_err(&sg.output, &sc.output)?;
    assert!(err < 2e-2, "CUDA vs CPU output {err}");
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let c = case(&Device::Cpu, DType::F32, (1, 2, 2, 40, 32), 16, 48, 12)?;
    let expect = |r: Result<candle_sparse_attn::twilight::TwilightStep>, needle: &str| {
        let e = r.expect_err(needle).to_string();
        assert!(e.contains(needle), "error {e:?} should mention {needle:?}");
    };
    let cfg = TwilightConfig {
        p: 0.9,
        base_budget: 32,
        page_size: 16,
        dense_layers: 0,
        ..TwilightConfig::default()
    };
    for p in [0.0, -0.1, 1.5, f32::NAN] {
        expect(
            decode_layer(2, &c.cache, &c.q, &TwilightConfig { p, ..cfg }),
            "p must be in (0, 1]",
        );
    }
    expect(
        decode_layer(
            2,
            &c.cache,
            &c.q,
            &TwilightConfig {
                base_budget: 0,
                ..cfg
            },
        ),
        "base_budget",
    );
    expect(
        decode_layer(
            2,
            &c.cache,
            &c.q,
            &TwilightConfig {
                page_size: 0,
                ..cfg
            },
        ),
        "page_size",
    );
    expect(
        decode_layer(
            2,
            &c.cache,
            &c.q,
            &TwilightConfig {
                page_size: 8,
                ..cfg
            },
        ),
        "page_size 8",
    );
    let q2 = Tensor::zeros((1, 2, 2, 32), DType::F32, &Device::Cpu)?;
    expect(decode_layer(2, &c.cache, &q2, &cfg), "[1, 2, 2, 32]");
    expect(decode_layer(2, &c.cache, &q2, &cfg), "only decoding");
    let q3 = Tensor::zeros((1, 3, 1, 32), DType::F32, &Device::Cpu)?;
    expect(decode_layer(2, &c.cache, &q3, &cfg), "[1, 3, 1, 32]");
    let qd = Tensor::zeros((1, 2, 1, 64), DType::F32, &Device::Cpu)?;
    expect(decode_layer(2, &c.cache, &qd, &cfg), "[1, 2, 1, 64]");
    expect(
        decode_layer(2, &c.cache, &c.q.to_dtype(DType::BF16)?, &cfg),
        "BF16",
    );
    expect(
        decode_layer(2, &c.cache, &c.q.squeeze(2)?, &cfg),
        "[1, 2, 32]",
    );
    assert!(
        TwilightCache::new(1, 2, 32, 48, 0, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("page_size")
    );
    assert!(
        TwilightCache::new(1, 2, 30, 48, 16, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("head_dim 30")
    );
    assert!(
        TwilightCache::new(1, 2, 32, 48, 16, DType::U8, &Device::Cpu)
            .unwrap_err()
            .to_string()
            .contains("U8")
    );
    let empty = TwilightCache::new(1, 2, 32, 48, 16, DType::F32, &Device::Cpu)?;
    expect(decode_layer(2, &empty, &c.q, &cfg), "empty");
    let mut full = c.cache.clone();
    let kv = Tensor::zeros((1, 2, 9, 32), DType::F32, &Device::Cpu)?;
    let e = full.append(&kv, &kv).unwrap_err().to_string();
    assert!(
        e.contains("capacity 48") && e.contains("[1, 2, 9, 32]"),
        "{e}"
    );
    let bad = Tensor::zeros((1, 3, 1, 32), DType::F32, &Device::Cpu)?;
    assert!(full
        .append(&bad, &bad)
        .unwrap_err()
        .to_string()
        .contains("[1, 3, 1, 32]"));
    assert!(full
        .append(&kv.to_dtype(DType::F16)?, &kv)
        .unwrap_err()
        .to_string()
        .contains("F16"));
    let cand = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu)?;
    let est = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu)?;
    assert!(top_p(&est, &cand, 0.9)
        .unwrap_err()
        .to_string()
        .contains("u32"));
    assert!(top_p(&est, &cand.to_dtype(DType::U32)?, 0.0)
        .unwrap_err()
        .to_string()
        .contains("(0, 1]"));
    assert!(QuestSelector::unpinned(0)
        .select(&c.cache, &c.q.squeeze(2)?)
        .is_err());
    assert!(WindowSelector { sink: 0, window: 0 }
        .select(&c.cache, &c.q.squeeze(2)?)
        .is_err());
    assert!(top_indices(&est, 5, 1, 4)
        .unwrap_err()
        .to_string()
        .contains("k <= n"));
    let lists = Tensor::zeros((1, 2, 1), DType::U32, &Device::Cpu)?;
    assert!(sparse_decode_attention(&c.cache, &c.q.squeeze(2)?, &lists, 0.1).is_err());
    for dev in devices().into_iter().skip(1) {
        let q = c.q.to_device(&dev)?;
        expect(decode_layer(2, &c.cache, &q, &cfg), "Cuda");
    }
    Ok(())
}
