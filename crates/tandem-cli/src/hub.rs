//! `--model org/name` and `--model org/name:file.gguf`: checkpoints from the Hugging Face hub,
//! through the hub's own local cache (the `hf-hub` crate: `HF_HOME` places the cache, `HF_ENDPOINT`
//! names the hub or a mirror, `HF_TOKEN` authenticates). Files already in the cache load without a
//! network: with `HF_HUB_OFFLINE=1` only the cache is read, as the Python tools do.
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo};
use std::path::{Path, PathBuf};

/// Files a Hugging Face folder checkpoint may have besides config.json and the weights.
const OPTIONAL_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"];

/// True when `spec` names a hub repository rather than a local path: `org/name`, optionally with
/// `:file`, and no such path exists here.
pub fn is_repo_id(spec: &str) -> bool {
    if Path::new(spec).exists() || spec.starts_with(['.', '/', '~']) {
        return false;
    }
    let repo = spec.split_once(':').map_or(spec, |(r, _)| r);
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    parts.len() == 2 && parts.iter().all(|p| ok(p))
}

/// The local path of the checkpoint `spec` names: a GGUF file for `org/name:file.gguf`, else
/// the snapshot folder holding config.json, the tokenizer and the safetensors weights.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let (repo_id, file) = match spec.split_once(':') {
        Some((r, f)) => (r, Some(f)),
        None => (spec, None),
    };
    let source = Source::new(repo_id)?;
    if let Some(file) = file {
        return source.get(file);
    }
    let config = source.get("config.json")?;
    for f in OPTIONAL_FILES {
        source.get_optional(f)?;
    }
    let weights = match source.get_optional("model.safetensors.index.json")? {
        Some(index) => shards(&index)?,
        None => vec!["model.safetensors".to_string()],
    };
    for w in &weights {
        source.get(w)?;
    }
    Ok(config.parent().context("the cached config.json has no folder")?.to_path_buf())
}

/// The shard files an index names.
fn shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).context("the index has no weight_map")?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// One repository: read through the cache, and from the hub unless offline.
struct Source {
    repo_id: String,
    cache: Cache,
    /// None when offline.
    api: Option<ApiRepo>,
    endpoint: String,
}

impl Source {
    fn new(repo_id: &str) -> Result<Self> {
        let cache = Cache::from_env();
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let api = match offline {
            true => None,
            false => {
                let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
                let api = ApiBuilder::from_cache(cache.clone())
                    .with_endpoint(endpoint.clone())
                    .with_token(token)
                    .with_progress(true)
                    .build()
                    .context("setting up the Hugging Face hub client")?;
                Some(api.model(repo_id.to_string()))
            }
        };
        Ok(Source { repo_id: repo_id.to_string(), cache, api, endpoint })
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache.repo(Repo::model(self.repo_id.clone())).get(file)
    }

    /// A file the checkpoint needs.
    fn get(&self, file: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        let Some(api) = &self.api else {
            bail!(
                "{}/{file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                self.repo_id,
                self.cache.path().display()
            );
        };
        api.get(file).with_context(|| {
            format!(
                "fetching {}/{file} from {} (files already in the cache {} load with HF_HUB_OFFLINE=1)",
                self.repo_id,
                self.endpoint,
                self.cache.path().display()
            )
        })
    }

    /// A file the checkpoint may lack: None when the hub says it does not exist (or, offline,
    /// when it is not cached).
    fn get_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cached(file) {
            return Ok(Some(p));
        }
        let Some(api) = &self.api else { return Ok(None) };
        match api.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(hf_hub::api::sync::ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("fetching {}/{file} from {}", self.repo_id, self.endpoint)),
        }
    }
}
