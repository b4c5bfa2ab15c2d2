//! MoA plans: the reference's JSON file (`{"alphas": [[..]], "betas": [[..]]}`) and its
//! resolution to per-head spans at a given total length (spec §3, §4, §7).

use std::path::Path;

use candle::{bail, Result};
use serde::{Deserialize, Serialize};

/// Granularity of MoA in tokens: profiling blocks, masks, kernel tiles and cache regions.
pub const MOA_BLOCK: usize = 64;
/// Tokens of the always-visible sink (one block).
pub const MOA_SINK: usize = 64;
/// Smallest span a head gets after resolution (the reference's minimum).
pub const MOA_MIN_SPAN: usize = 128;

/// The span rule of one head: `S(N) = alpha + beta·N` tokens (alpha the constant, beta the slope,
/// as in the reference code and every shipped plan; the paper's appendix swaps the letters).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpanRule {
    /// Constant term in tokens (may be negative).
    pub alpha: f64,
    /// Slope (expansion rate) in `[0, 1]`.
    pub beta: f64,
}

impl SpanRule {
    /// The resolved span (sink included) at total length `n` tokens, exactly as the reference
    /// converts it: `min(trunc(alpha + beta·n), n)`, at least [`MOA_MIN_SPAN`], rounded up to a
    /// multiple of [`MOA_BLOCK`] (so it may exceed `n` for short inputs). The search, the density
    /// and the runtime all use this one function.
    pub fn span(&self, n: usize) -> usize {
        let raw = (self.alpha + self.beta * n as f64).trunc();
        let clipped = raw.min(n as f64).max(MOA_MIN_SPAN as f64) as usize;
        clipped.div_ceil(MOA_BLOCK) * MOA_BLOCK
    }

    /// Key/value tokens a query at the end of an `n`-token sequence attends to: `min(span, n)`.
    pub fn kept_tokens(&self, n: usize) -> usize {
        self.span(n).min(n)
    }

    /// Checks that the rule is finite, `beta ∈ [0, 1]` and that its span is not negative (or
    /// zero) at every length (`beta = 0` with `alpha ≤ 0`).
    pub fn validate(&self) -> Result<()> {
        let Self { alpha, beta } = *self;
        if !alpha.is_finite() || !beta.is_finite() {
            bail!("moa rule: alpha {alpha} and beta {beta} must be finite")
        }
        if !(0.0..=1.0).contains(&beta) {
            bail!("moa rule: beta (the slope) must be in [0, 1], got {beta}")
        }
        if beta == 0.0 && alpha <= 0.0 {
            bail!("moa rule: alpha {alpha} with beta 0 gives a span ≤ 0 at every length")
        }
        Ok(())
    }
}

/// The resolved span of one key/value head: a sink of the first `sink` tokens plus a causal band
/// of the newest `band` tokens. Both are multiples of [`MOA_BLOCK`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadSpan {
    /// Sink tokens (`min(span, 64)`: 64 for every resolved plan).
    pub sink: usize,
    /// Band tokens (`span − sink`): the ring capacity of the decode cache.
    pub band: usize,
}

impl HeadSpan {
    /// A span from its rule at total length `n` (spec §4).
    pub fn resolve(rule: &SpanRule, n: usize) -> Self {
        Self::from_size(rule.span(n))
    }

    /// A span of `size` tokens: the first [`MOA_SINK`] are the sink, the rest the band.
    pub fn from_size(size: usize) -> Self {
        let sink = size.min(MOA_SINK);
        Self {
            sink,
            band: size - sink,
        }
    }

    /// Sink plus band, in tokens.
    pub fn size(&self) -> usize {
        self.sink + self.band
    }

    /// Band length in blocks of [`MOA_BLOCK`].
    pub fn band_blocks(&self) -> usize {
        self.band / MOA_BLOCK
    }
}

/// The spans of one layer, one per **key/value** head (GQA: one rule per KV group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoaLayerPlan {
    /// `spans[h]` for kv head `h`.
    pub spans: Vec<HeadSpan>,
}

impl MoaLayerPlan {
    /// Every kv head with the same span (the StreamingLLM-style uniform baseline).
    pub fn uniform(kv_heads: usize, span: HeadSpan) -> Self {
        Self {
            spans: vec![span; kv_heads],
        }
    }

    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.spans.len()
    }

    /// Checks the spans: at least one head, sink and band multiples of [`MOA_BLOCK`], sink at
    /// most one block, span not empty.
    pub fn validate(&self) -> Result<()> {
        if self.spans.is_empty() {
            bail!("moa layer plan: no heads")
        }
        for (h, s) in self.spans.iter().enumerate() {
            if s.sink > MOA_SINK || s.sink % MOA_BLOCK != 0 || s.band % MOA_BLOCK != 0 {
                bail!(
                    "moa layer plan: head {h} has sink {} and band {}; the sink must be 0 or \
                     {MOA_SINK} and the band a multiple of {MOA_BLOCK}",
                    s.sink,
                    s.band
                )
            }
            if s.size() == 0 {
                bail!("moa layer plan: head {h} has an empty span")
            }
        }
        Ok(())
    }
}

/// A whole-model plan in the reference's JSON format, in the model's original query-head order,
/// plus optional metadata of ours (ignored by the reference).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoaPlan {
    /// `alphas[layer][query_head]`: constant terms in tokens.
    pub alphas: Vec<Vec<f64>>,
    /// `betas[layer][query_head]`: slopes in `[0, 1]`.
    pub betas: Vec<Vec<f64>>,
    /// Sink size the plan was made for (informational; resolution always uses [`MOA_SINK`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_size: Option<usize>,
    /// Block size the plan was made for (informational; always [`MOA_BLOCK`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Model the plan was profiled on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Sequence lengths (tokens) the influence was profiled at and the density bound applied to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiled_lengths: Option<Vec<usize>>,
}

impl MoaPlan {
    /// A plan from per-layer, per-query-head rules.
    pub fn from_rules(rules: &[Vec<SpanRule>]) -> Self {
        Self {
            alphas: rules
                .iter()
                .map(|l| l.iter().map(|r| r.alpha).collect())
                .collect(),
            betas: rules
                .iter()
                .map(|l| l.iter().map(|r| r.beta).collect())
                .collect(),
            sink_size: Some(MOA_SINK),
            block_size: Some(MOA_BLOCK),
            model_id: None,
            profiled_lengths: None,
        }
    }

    /// Parses the JSON text of a plan and checks its values ([`Self::validate_values`]).
    pub fn from_json(text: &str) -> Result<Self> {
        let plan: Self = serde_json::from_str(text)
            .map_err(|e| candle::Error::Msg(format!("moa plan: invalid JSON: {e}")))?;
        plan.validate_values()?;
        Ok(plan)
    }

    /// Reads a plan file (see [`Self::from_json`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle::Error::Msg(format!("moa plan {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| candle::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// The plan as pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| candle::Error::Msg(format!("moa plan: cannot serialise: {e}")))
    }

    /// Writes the plan as JSON, atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, self.to_json()?)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| candle::Error::Msg(format!("moa plan {}: {e}", path.display())))
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.alphas.len()
    }

    /// The rule of `layer`, query head `head`.
    pub fn rule(&self, layer: usize, head: usize) -> SpanRule {
        SpanRule {
            alpha: self.alphas[layer][head],
            beta: self.betas[layer][head],
        }
    }

    /// Checks the shape is rectangular (alphas and betas alike) and every rule valid.
    pub fn validate_values(&self) -> Result<()> {
        if self.alphas.is_empty() {
            bail!("moa plan: no layers")
        }
        if self.alphas.len() != self.betas.len() {
            bail!(
                "moa plan: {} layers of alphas but {} of betas",
                self.alphas.len(),
                self.betas.len()
            )
        }
        let heads = self.alphas[0].len();
        for (l, (a, b)) in self.alphas.iter().zip(&self.betas).enumerate() {
            if a.len() != heads || b.len() != heads {
                bail!(
                    "moa plan: layer {l} has {} alphas and {} betas, expected {heads} heads \
                     like layer 0",
                    a.len(),
                    b.len()
                )
            }
            for h in 0..heads {
                self.rule(l, h)
                    .validate()
                    .map_err(|e| candle::Error::Msg(format!("layer {l} head {h}: {e}")))?;
            }
        }
        Ok(())
    }

    /// Checks the plan against a model with `num_layers` layers of `q_heads` query heads.
    pub fn validate_for(&self, num_layers: usize, q_heads: usize) -> Result<()> {
        self.validate_values()?;
        let (l, h) = (self.alphas.len(), self.alphas[0].len());
        if (l, h) != (num_layers, q_heads) {
            bail!(
                "moa plan: {l} layers × {h} heads, but the model has {num_layers} layers × \
                 {q_heads} query heads"
            )
        }
        Ok(())
    }

    /// Per-layer spans at total length `n` (prompt + max new tokens), one per kv head. Under GQA
    /// the query heads of a group share one span: the group's **largest** (conservative); with
    /// `strict`, query heads of one group with different spans are an error instead.
    pub fn resolve(
        &self,
        n: usize,
        num_layers: usize,
        q_heads: usize,
        kv_heads: usize,
        strict: bool,
    ) -> Result<Vec<MoaLayerPlan>> {
        self.validate_for(num_layers, q_heads)?;
        if kv_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
            bail!("moa plan: kv heads {kv_heads} must divide query heads {q_heads}")
        }
        let group = q_heads / kv_heads;
        (0..num_layers)
            .map(|l| {
                let spans = (0..kv_heads)
                    .map(|g| {
                        let sizes: Vec<usize> = (g * group..(g + 1) * group)
                            .map(|h| self.rule(l, h).span(n))
                            .collect();
                        let size = *sizes.iter().max().expect("group is not empty");
                        if strict && sizes.iter().any(|&s| s != size) {
                            bail!(
                                "moa plan: layer {l}, kv head {g}: query heads {}..{} resolve to \
                                 different spans {sizes:?} at {n} tokens (strict GQA)",
                                g * group,
                                (g + 1) * group
                            )
                        }
                        Ok(HeadSpan::from_size(size))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(MoaLayerPlan { spans })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_matches_the_spec_example() {
        // α = 1024, β = 0.125, prompt 8192 + 1024 new: N = 9216, size 2176 = 64 sink + 2112 band.
        let s = HeadSpan::resolve(
            &SpanRule {
                alpha: 1024.0,
                beta: 0.125,
            },
            9216,
        );
        assert_eq!((s.sink, s.band), (64, 2112));
    }

    #[test]
    fn span_floor_and_rounding() {
        let r = |alpha, beta| SpanRule { alpha, beta };
        assert_eq!(r(-1024.0, 0.125).span(4096), 128); // negative raw span: the minimum
        assert_eq!(r(100.0, 0.0).span(4096), 128);
        assert_eq!(r(200.0, 0.0).span(4096), 256); // rounded up to 64
        assert_eq!(r(0.0, 1.0).span(1000), 1024); // clipped to N, then rounded up
        assert_eq!(r(0.0, 1.0).kept_tokens(1000), 1000);
    }
}
