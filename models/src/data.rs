//! Character-level data: a vocabulary of the distinct characters of a UTF-8 text, a train /
//! validation split, and batches whose randomness is a pure function of `(seed, step, ...)`, so
//! a resumed run draws exactly the batches an uninterrupted run would.

use std::path::Path;

use candle::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Sorted distinct characters of a text; token id = index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    /// The characters, sorted by code point.
    chars: Vec<char>,
}

impl Vocab {
    /// The vocabulary of `text` (every distinct character).
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self { chars }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Token ids of `text`; fails on a character outside the vocabulary (naming it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| match self.chars.binary_search(&c) {
                Ok(i) => Ok(i as u32),
                Err(_) => bail!(
                    "character {c:?} is not in the vocabulary of {} characters",
                    self.len()
                ),
            })
            .collect()
    }

    /// The text of token ids (ids outside the vocabulary become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }
}

/// Which part of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The first `1 - val_fraction` of the text.
    Train,
    /// The last `val_fraction` of the text.
    Val,
}

/// A tokenised text split into train and validation parts.
#[derive(Clone, Debug)]
pub struct CharDataset {
    vocab: Vocab,
    train: Vec<u32>,
    val: Vec<u32>,
}

impl CharDataset {
    /// Reads a UTF-8 text file (see [`CharDataset::from_text`]). Errors name the file and, for
    /// invalid UTF-8, the byte offset.
    pub fn from_file(path: &Path, val_fraction: f64, block_size: usize) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            candle::Error::Msg(format!("cannot read data file {}: {e}", path.display()))
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            candle::Error::Msg(format!(
                "data file {} is not valid UTF-8 (first bad byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            ))
        })?;
        Self::from_text(&text, val_fraction, block_size)
            .map_err(|e| candle::Error::Msg(format!("data file {}: {e}", path.display())))
    }

    /// Splits `text` (characters) into the first `1 - val_fraction` for training and the rest for
    /// validation. Both parts need more than `block_size` characters (one input/target window).
    pub fn from_text(text: &str, val_fraction: f64, block_size: usize) -> Result<Self> {
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            bail!("validation fraction must be in (0, 1), got {val_fraction}")
        }
        if text.is_empty() {
            bail!("the text is empty")
        }
        let vocab = Vocab::from_text(text);
        let ids = vocab.encode(text)?;
        let n_val = ((ids.len() as f64) * val_fraction).round() as usize;
        let n_train = ids.len() - n_val;
        if n_train <= block_size || n_val <= block_size {
            bail!(
                "the text has {} characters, split into {n_train} train and {n_val} validation; \
                 both need more than block_size {block_size} (use a longer text or a smaller \
                 block_size)",
                ids.len()
            )
        }
        let val = ids[n_train..].to_vec();
        let mut train = ids;
        train.truncate(n_train);
        Ok(Self { vocab, train, val })
    }

    /// The vocabulary (built from the whole text).
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// Token ids of a split.
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// `batch_size` random windows of a split: inputs and next-character targets, both
    /// `(batch_size, block_size)` u32 on `device`. Deterministic in `seed`.
    pub fn batch(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let data = self.tokens(split);
        if data.len() <= block_size {
            bail!(
                "{split:?} split has {} tokens, needs more than block_size {block_size}",
                data.len()
            )
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(batch_size * block_size);
        let mut y = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            let start = rng.random_range(0..data.len() - block_size);
            x.extend_from_slice(&data[start..start + block_size]);
            y.extend_from_slice(&data[start + 1..start + block_size + 1]);
        }
        Ok((
            Tensor::from_vec(x, (batch_size, block_size), device)?,
            Tensor::from_vec(y, (batch_size, block_size), device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_round_trips() -> Result<()> {
        let v = Vocab::from_text("hello, wörld");
        assert_eq!(v.len(), 10);
        let ids = v.encode("hölle")?;
        assert_eq!(v.decode(&ids), "hölle");
        assert!(v.encode("z").is_err());
        Ok(())
    }

    #[test]
    fn split_and_batches() -> Result<()> {
        let text: String = "abcdefghij".repeat(10);
        let ds = CharDataset::from_text(&text, 0.1, 8)?;
        assert_eq!(ds.tokens(Split::Train).len(), 90);
        assert_eq!(ds.tokens(Split::Val).len(), 10);
        let (x, y) = ds.batch(Split::Train, 3, 8, 1, &Device::Cpu)?;
        let (x, y) = (x.to_vec2::<u32>()?, y.to_vec2::<u32>()?);
        for (xr, yr) in x.iter().zip(&y) {
            assert_eq!(&xr[1..], &yr[..7]);
        }
        let (x2, _) = ds.batch(Split::Train, 3, 8, 1, &Device::Cpu)?;
        assert_eq!(x, x2.to_vec2::<u32>()?);
        Ok(())
    }
}
