//! A Tinker client's sampler weights on every server: a server that saves them
//! (`save_weights_for_sampler`) puts the checkpoint folder's files in the JetStream object store
//! `tandem-weights` under the weights' `tinker://` path, then an index of them (names, sizes,
//! SHA-256); a server asked to sample weights it does not have reads the index, fetches the
//! files, checks each digest and writes the folder where its own checkpoints live. LoRA adapters
//! are a few MB, so this is the same versioned path as the drafter's.
use crate::broker;
use crate::drafters::sha256_hex;
use async_nats::jetstream::{self, object_store};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokio::io::AsyncReadExt;

pub const WEIGHTS_BUCKET: &str = "tandem-weights";

#[derive(Serialize, Deserialize)]
struct Index {
    files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: usize,
    sha256: String,
}

/// The fleet's weight store; its calls block the calling thread (a training worker or a request's
/// blocking task) on the store's own runtime.
pub struct BrokerWeightStore {
    /// Taken on drop (`shutdown_background`: a runtime may not be dropped inside another's
    /// async context, where the server's state may end).
    runtime: Option<tokio::runtime::Runtime>,
    js: jetstream::Context,
}

impl Drop for BrokerWeightStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl BrokerWeightStore {
    /// Connects to the broker at `url` (in the background: a broker that is down makes calls
    /// fail with a clear message until it is back).
    pub fn connect(url: &str) -> Result<BrokerWeightStore, String> {
        broker::check_url("--weight-store", url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tandem-weight-store")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        // The context spawns its acknowledgement task: made inside the store's runtime.
        let js = runtime.block_on(async { broker::connect(url, "tandem-weight-store").await.map(jetstream::new) })?;
        Ok(BrokerWeightStore { js, runtime: Some(runtime) })
    }

    /// Runs `work` on the store's runtime and waits for it: callable from a plain thread and
    /// from an async handler alike (no runtime is entered on the caller's thread).
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(
            jetstream::Context,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>,
    ) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        let fut = work(self.js.clone());
        let Some(runtime) = &self.runtime else { return Err("the weight store is closed".into()) };
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| "the weight store's runtime stopped".to_string())?
    }
}

async fn bucket(js: &jetstream::Context) -> Result<object_store::ObjectStore, String> {
    let get = async {
        if let Ok(o) = js.get_object_store(WEIGHTS_BUCKET).await {
            return Ok(o);
        }
        js.create_object_store(object_store::Config { bucket: WEIGHTS_BUCKET.into(), ..Default::default() })
            .await
            .map_err(|e| format!("the weights object store: {e}"))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), get)
        .await
        .map_err(|_| "the broker did not answer".to_string())?
}

impl BrokerWeightStore {}

/// The object names of a checkpoint: `<run>/<kind>/<name>/<file>` (the path without its scheme).
fn key(path: &str) -> String {
    path.trim_start_matches("tinker://").trim_matches('/').to_string()
}

impl std::fmt::Debug for BrokerWeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerWeightStore")
    }
}

impl tandem_server::training::WeightStore for BrokerWeightStore {
    fn publish(&self, path: &str, dir: &Path) -> Result<(), String> {
        let (path, dir) = (path.to_string(), dir.to_path_buf());
        self.run(move |js| Box::pin(async move { publish(&js, &path, &dir).await }))
    }

    fn fetch(&self, path: &str, dir: &Path) -> Result<bool, String> {
        let (path, dir) = (path.to_string(), dir.to_path_buf());
        self.run(move |js| Box::pin(async move { fetch(&js, &path, &dir).await }))
    }
}

async fn publish(js: &jetstream::Context, path: &str, dir: &Path) -> Result<(), String> {
    let store = bucket(js).await?;
    let mut index = Index { files: Vec::new() };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries.iter().filter(|e| e.path().is_file()) {
        let name = e.file_name().to_string_lossy().to_string();
        let bytes = std::fs::read(e.path()).map_err(|e| e.to_string())?;
        let object = format!("{}/{name}", key(path));
        store.put(object.as_str(), &mut bytes.as_slice()).await.map_err(|e| format!("storing {object}: {e}"))?;
        index.files.push(FileEntry { name, bytes: bytes.len(), sha256: sha256_hex(&bytes) });
    }
    // The index last: a reader never sees a checkpoint whose files are not all there.
    let json = serde_json::to_vec(&index).expect("an index serialises");
    let object = format!("{}/index.json", key(path));
    store.put(object.as_str(), &mut json.as_slice()).await.map_err(|e| format!("storing {object}: {e}"))?;
    Ok(())
}

async fn fetch(js: &jetstream::Context, path: &str, dir: &Path) -> Result<bool, String> {
    let store = bucket(js).await?;
    let index = match store.get(format!("{}/index.json", key(path))).await {
        Ok(mut o) => {
            let mut bytes = Vec::new();
            o.read_to_end(&mut bytes).await.map_err(|e| e.to_string())?;
            serde_json::from_slice::<Index>(&bytes).map_err(|e| format!("the index of {path}: {e}"))?
        }
        Err(e) if e.kind() == object_store::GetErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("the index of {path}: {e}")),
    };
    // Into a fresh folder beside the target, renamed into place once complete.
    let tmp = dir.with_extension("fetching");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    for f in &index.files {
        if f.name.contains('/') || f.name.starts_with('.') {
            return Err(format!("the index of {path} names a file outside its folder: {}", f.name));
        }
        let bytes = read(&store, &format!("{}/{}", key(path), f.name)).await?;
        if sha256_hex(&bytes) != f.sha256 || bytes.len() != f.bytes {
            return Err(format!("{path}/{}: digest or size differs from its index", f.name));
        }
        std::fs::write(tmp.join(&f.name), bytes).map_err(|e| e.to_string())?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| e.to_string())?;
    Ok(true)
}

async fn read(store: &object_store::ObjectStore, name: &str) -> Result<Vec<u8>, String> {
    let mut object = store.get(name).await.map_err(|e| format!("fetching {name}: {e}"))?;
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.map_err(|e| format!("reading {name}: {e}"))?;
    Ok(bytes)
}
