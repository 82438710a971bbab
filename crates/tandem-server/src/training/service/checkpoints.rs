//! Checkpoints on disk: listing, deleting, exporting a merged model, and a training model
//! created straight from one.
use super::*;

impl TrainingService {
    pub fn list_checkpoints(&self, run: &str) -> Result<Value> {
        check_name(run)?;
        let mut out = Vec::new();
        for kind in ["weights", "sampler_weights"] {
            let dir = self.config.root.join(run).join(kind);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let size: u64 = std::fs::read_dir(e.path())
                    .map(|d| d.flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
                    .unwrap_or(0);
                let time = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                out.push(json!({
                    "checkpoint_id": format!("{kind}/{name}"),
                    "checkpoint_type": if kind == "weights" { "training" } else { "sampler" },
                    "time": rfc3339(time),
                    "tinker_path": format!("tinker://{run}/{kind}/{name}"),
                    "size_bytes": size,
                    "public": false,
                }));
            }
        }
        Ok(json!({"checkpoints": out}))
    }

    pub fn delete_checkpoint(&self, run: &str, checkpoint: &str) -> Result<()> {
        let p = TinkerPath::parse(&format!("tinker://{run}/{checkpoint}"))?;
        let dir = self.checkpoint_dir(&p);
        if !dir.exists() {
            return Err(Failure::user(format!("no checkpoint {}", p.to_path())));
        }
        std::fs::remove_dir_all(&dir).map_err(|e| Failure::server(format!("{}: {e}", dir.display())))?;
        self.versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&p.to_path());
        Ok(())
    }

    /// Writes the merged Hugging Face folder of a checkpoint to `export_dir/<name>` (for a
    /// GGUF-served model, its config.json is written from the model's configuration and its
    /// tokenizer from the file's) and returns that folder. `name` is a name, never a path; an
    /// existing export is replaced only with `overwrite`, and a symbolic link there never is.
    /// The folder is written beside its final place and renamed into it, so a failed export
    /// leaves nothing half-written under the name.
    pub fn export(&self, path: &str, name: &str, overwrite: bool) -> Result<PathBuf> {
        check_name(name).map_err(|_| {
            Failure::user(format!(
                "export name `{name}` must be a plain folder name (letters, digits, - _ . :), not a path; \
                 exports go under the server's --export-dir"
            ))
        })?;
        let p = TinkerPath::parse(path)?;
        let dir = self.checkpoint_dir(&p);
        let tokenizer_dir = self
            .config
            .model_dir
            .clone()
            .or_else(|| self.config.tokenizer_dir.clone())
            .ok_or_else(|| Failure::server("no tokenizer folder to copy into the export"))?;
        let root = &self.config.export_dir;
        let io = |e: std::io::Error| Failure::server(format!("{}: {e}", root.display()));
        std::fs::create_dir_all(root).map_err(io)?;
        let out = root.join(name);
        let existing = std::fs::symlink_metadata(&out).ok();
        match existing {
            Some(m) if m.file_type().is_symlink() => {
                return Err(Failure::user(format!(
                    "export `{name}` is a symbolic link in the export directory; refusing to write through it"
                )))
            }
            Some(_) if !overwrite => {
                return Err(Failure::conflict(format!(
                    "export `{name}` already exists; set \"overwrite\": true to replace it"
                )))
            }
            _ => {}
        }
        let mut t = TrainingModel::new(&self.base, read_mode(&dir)?, 0)?;
        t.load(&dir, false)?;
        let partial = root.join(format!(".{name}.partial-{:08x}", rand::random::<u32>()));
        let written = t.export_hf(self.config.model_dir.as_deref(), &tokenizer_dir, &partial);
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e.into());
        }
        if existing.is_some() {
            std::fs::remove_dir_all(&out).map_err(io)?;
        }
        std::fs::rename(&partial, &out).map_err(io)?;
        Ok(out)
    }

    /// A training model created straight from a checkpoint (load_weights with a session).
    pub fn create_from_checkpoint(&self, session: &str, seq: i64, path: &str, optimizer: bool) -> Result<String> {
        self.check_session(session)?;
        let p = TinkerPath::parse(path)?;
        let dir = self.checkpoint_dir(&p);
        let mode = read_mode(&dir)?;
        let id = format!("{session}:train:{seq}");
        let mut t = self.new_trainer(&id, mode, 0)?;
        t.load(&dir, optimizer)?;
        self.start_model(id.clone(), mode, t)?;
        Ok(id)
    }
}

pub(super) fn read_mode(dir: &std::path::Path) -> Result<Mode> {
    let bytes = std::fs::read(dir.join("state.json"))
        .map_err(|_| Failure::user(format!("no checkpoint at {}", dir.display())))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| Failure::server(format!("state.json: {e}")))?;
    serde_json::from_value(v["mode"].clone()).map_err(|e| Failure::server(format!("state.json mode: {e}")))
}

fn rfc3339(secs: u64) -> String {
    let (y, m, d) = tandem_runtime::chat::civil_date(secs);
    let rem = secs % 86400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
