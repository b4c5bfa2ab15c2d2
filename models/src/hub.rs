//! Finding the files of a Hugging Face model: a local directory, the Hugging Face cache (offline),
//! or a download through `hf-hub`.
//!
//! Resolution order of [`resolve_model_files`]:
//! 1. `model` names an existing directory: its files are used directly.
//! 2. `HF_HUB_OFFLINE` is truthy (`1`, `true`, `yes`, `on`): the cache only ([`resolve_in_cache`]),
//!    with the cache directory from `HF_HUB_CACHE`, else `HF_HOME/hub`, else
//!    `~/.cache/huggingface/hub`.
//! 3. Otherwise `hf-hub`'s API, which checks the same cache first and downloads on a miss.
//!
//! Weights are either one `model.safetensors` file or the shards listed in
//! `model.safetensors.index.json` (its `weight_map` values).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle::{bail, Result};

/// File name of the model configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of unsharded weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the shard index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The files of one Hugging Face model, all existing on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// `model.safetensors`, or every shard named by `model.safetensors.index.json` (sorted,
    /// deduplicated).
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`, if the model has one.
    pub tokenizer: Option<PathBuf>,
}

/// Where a model's files come from, for error messages.
fn how_to_get(model: &str) -> String {
    format!(
        "pass a directory holding config.json, model.safetensors (or model.safetensors.index.json \
         and its shards) and tokenizer.json, or download {model:?} into the Hugging Face cache \
         on a machine with Hub access (e.g. `huggingface-cli download {model}`) and copy the cache"
    )
}

/// Collects the model files through `fetch(file_name)`, which returns `Ok(None)` when the file
/// does not exist at the source. `source` names the source in errors.
fn collect_files(
    source: &str,
    model: &str,
    mut fetch: impl FnMut(&str) -> Result<Option<PathBuf>>,
) -> Result<ModelFiles> {
    let Some(config) = fetch(CONFIG_FILE)? else {
        bail!(
            "model {model:?}: {CONFIG_FILE} not found in {source}; {}",
            how_to_get(model)
        )
    };
    let weights = match fetch(WEIGHTS_FILE)? {
        Some(path) => vec![path],
        None => {
            let Some(index) = fetch(WEIGHTS_INDEX_FILE)? else {
                bail!(
                    "model {model:?}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found in \
                     {source}; {}",
                    how_to_get(model)
                )
            };
            let mut paths = Vec::new();
            for shard in shard_names(&index)? {
                match fetch(&shard)? {
                    Some(path) => paths.push(path),
                    None => bail!(
                        "model {model:?}: weight shard {shard:?} listed in {} not found in \
                         {source}; {}",
                        index.display(),
                        how_to_get(model)
                    ),
                }
            }
            paths
        }
    };
    let tokenizer = fetch(TOKENIZER_FILE)?;
    Ok(ModelFiles {
        config,
        weights,
        tokenizer,
    })
}

/// The shard file names (sorted, deduplicated) of a `model.safetensors.index.json`.
pub fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path)
        .map_err(|e| candle::Error::Msg(format!("reading {}: {e}", index_path.display())))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| candle::Error::Msg(format!("parsing {}: {e}", index_path.display())))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no \"weight_map\" object", index_path.display())
    };
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        match file.as_str() {
            Some(f) => {
                names.insert(f.to_string());
            }
            None => bail!(
                "{}: weight_map entry {tensor:?} is not a file name",
                index_path.display()
            ),
        }
    }
    if names.is_empty() {
        bail!("{}: the weight_map is empty", index_path.display())
    }
    Ok(names.into_iter().collect())
}

/// The model files in a local directory.
pub fn resolve_in_dir(dir: &Path) -> Result<ModelFiles> {
    let source = format!("directory {}", dir.display());
    collect_files(&source, &dir.display().to_string(), |name| {
        let path = dir.join(name);
        Ok(path.is_file().then_some(path))
    })
}

/// The model files of `model_id` at `revision` (a branch, tag or commit hash) in the Hugging Face
/// cache directory `cache_dir` (the `hub` folder holding `models--org--name`), without network.
pub fn resolve_in_cache(cache_dir: &Path, model_id: &str, revision: &str) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::new(cache_dir.to_path_buf());
    let repo = cache.repo(hf_hub::Repo::with_revision(
        model_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    let source = format!(
        "the Hugging Face cache {} (revision {revision:?}, offline)",
        cache_dir.display()
    );
    collect_files(&source, model_id, |name| Ok(repo.get(name)))
}

/// The model files of `model_id` at `revision` through the Hub API (cache first, download on a
/// miss), with the cache in `cache_dir`.
pub fn resolve_with_api(cache_dir: &Path, model_id: &str, revision: &str) -> Result<ModelFiles> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_cache_dir(cache_dir.to_path_buf())
        .build()
        .map_err(|e| candle::Error::Msg(format!("hub api for {model_id:?}: {e}")))?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        model_id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ));
    // A file the repository lacks is a 404; any other failure (network, auth) is an error.
    let source = format!("the Hub repository (revision {revision:?})");
    collect_files(&source, model_id, |name| match repo.get(name) {
        Ok(path) => Ok(Some(path)),
        Err(hf_hub::api::sync::ApiError::RequestError(e)) if e.to_string().contains("404") => {
            Ok(None)
        }
        Err(e) => Err(candle::Error::Msg(format!(
            "model {model_id:?}: fetching {name} failed: {e}; offline, set HF_HUB_OFFLINE=1 and \
             make sure the cache holds the model, or {}",
            how_to_get(model_id)
        ))),
    })
}

/// Whether `model` is spelled like a filesystem path rather than a Hub id (`name` or
/// `org/name`): absolute, starting with `.` or `~`, with a backslash or several slashes.
pub fn looks_like_path(model: &str) -> bool {
    model.starts_with(['/', '.', '~']) || model.contains('\\') || model.matches('/').count() > 1
}

/// Whether an environment value means "on" (`1`, `true`, `yes`, `on`, any case).
pub fn env_flag_is_set(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The Hugging Face cache directory from the environment values `HF_HUB_CACHE`, `HF_HOME` and
/// `HOME` (in that priority): `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `HOME/.cache/huggingface/hub`.
pub fn cache_dir_from(
    hf_hub_cache: Option<&str>,
    hf_home: Option<&str>,
    home: Option<&str>,
) -> PathBuf {
    match (hf_hub_cache, hf_home) {
        (Some(c), _) if !c.is_empty() => PathBuf::from(c),
        (_, Some(h)) if !h.is_empty() => Path::new(h).join("hub"),
        _ => Path::new(home.unwrap_or(".")).join(".cache/huggingface/hub"),
    }
}

/// Resolves `model` (a directory or a Hub model id) at `revision` (default `main`), reading
/// `HF_HUB_OFFLINE`, `HF_HUB_CACHE`, `HF_HOME` and `HOME` from the process environment. See the
/// module documentation for the order.
pub fn resolve_model_files(model: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let path = Path::new(model);
    if path.is_dir() {
        return resolve_in_dir(path);
    }
    let revision = revision.unwrap_or("main");
    let var = |name: &str| std::env::var(name).ok();
    let cache_dir = cache_dir_from(
        var("HF_HUB_CACHE").as_deref(),
        var("HF_HOME").as_deref(),
        var("HOME").as_deref(),
    );
    if path.exists() {
        bail!(
            "model {model:?} is a file, not a model directory; pass a directory, a Hub model id \
             or a .gguf file"
        )
    }
    if looks_like_path(model) {
        bail!("model {model:?}: no such directory; {}", how_to_get(model))
    }
    if env_flag_is_set(var("HF_HUB_OFFLINE").as_deref()) {
        resolve_in_cache(&cache_dir, model, revision)
    } else {
        resolve_with_api(&cache_dir, model, revision)
    }
}
