//! Drafter versions over the broker. A trainer puts each version's weights (the bytes of its
//! `model.safetensors`) in a JetStream object store and then announces it in a key-value entry
//! named after the model: `{version, object, sha256, bytes, config}`. Servers watch that entry,
//! fetch the object, check its digest and its shapes against the drafter they serve, and offer
//! it to their engine, whose own rollback rule still judges it; a server started later reads the
//! current entry first, so it catches up.
use crate::broker;
use async_nats::jetstream::{self, kv, object_store};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::online::{DrafterExchange, Version};
use tandem_runtime::speculative::{EagleConfig, EagleWeights};
use tokio::io::AsyncReadExt;

/// The key-value entry that announces a model's current drafter version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announcement {
    pub version: u64,
    pub object: String,
    /// Hex SHA-256 of the object's bytes.
    pub sha256: String,
    pub bytes: usize,
    pub config: EagleConfig,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A model's drafter versions in the broker.
pub struct DrafterStore {
    kv: kv::Store,
    objects: object_store::ObjectStore,
    model: String,
}

impl DrafterStore {
    /// The buckets (created if missing).
    pub async fn open(js: &jetstream::Context, model: &str) -> Result<DrafterStore, String> {
        let kv = match js.get_key_value(broker::DRAFTER_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: broker::DRAFTER_BUCKET.into(),
                    history: 4,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("the drafter key-value bucket: {e}"))?,
        };
        let objects = match js.get_object_store(broker::DRAFTER_BUCKET).await {
            Ok(o) => o,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: broker::DRAFTER_BUCKET.into(),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("the drafter object store: {e}"))?,
        };
        Ok(DrafterStore { kv, objects, model: model.to_string() })
    }

    /// The current announcement (None before the first version).
    pub async fn current(&self) -> Result<Option<Announcement>, String> {
        let entry =
            self.kv.get(broker::token(&self.model)).await.map_err(|e| format!("reading the drafter entry: {e}"))?;
        match entry {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("the drafter entry: {e}")),
        }
    }

    /// Stores `weights` as `version` and announces it (the weights first, so an announcement
    /// never names an object that is not there).
    pub async fn publish(
        &self,
        version: u64,
        config: &EagleConfig,
        weights: &EagleWeights,
    ) -> Result<Announcement, String> {
        let bytes = weights.to_bytes().map_err(|e| e.to_string())?;
        self.publish_bytes(version, config, bytes).await
    }

    /// As `publish`, from the bytes themselves (tests publish broken ones this way).
    pub async fn publish_bytes(
        &self,
        version: u64,
        config: &EagleConfig,
        bytes: Vec<u8>,
    ) -> Result<Announcement, String> {
        let object = broker::drafter_object(&self.model, version);
        let a = Announcement {
            version,
            object: object.clone(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len(),
            config: config.clone(),
        };
        self.objects
            .put(object.as_str(), &mut bytes.as_slice())
            .await
            .map_err(|e| format!("storing drafter version {version}: {e}"))?;
        let json = serde_json::to_vec(&a).expect("an announcement serialises");
        self.kv
            .put(broker::token(&self.model), json.into())
            .await
            .map_err(|e| format!("announcing version {version}: {e}"))?;
        if version > broker::KEEP_VERSIONS {
            let _ = self.objects.delete(broker::drafter_object(&self.model, version - broker::KEEP_VERSIONS)).await;
        }
        Ok(a)
    }

    /// The weights an announcement names, their digest checked, read as its configuration says.
    pub async fn fetch(&self, a: &Announcement) -> Result<EagleWeights, Fetch> {
        let transient = |e: String| Fetch::Transient(format!("fetching {}: {e}", a.object));
        let mut object = self.objects.get(&a.object).await.map_err(|e| transient(e.to_string()))?;
        let mut bytes = Vec::with_capacity(a.bytes);
        object.read_to_end(&mut bytes).await.map_err(|e| transient(e.to_string()))?;
        let digest = sha256_hex(&bytes);
        if digest != a.sha256 {
            return Err(Fetch::Refused(format!(
                "drafter version {}: digest {digest} is not the announced {}",
                a.version, a.sha256
            )));
        }
        EagleWeights::from_bytes(&bytes, &a.config, &tandem_models::Device::Cpu)
            .map_err(|e| Fetch::Refused(format!("drafter version {}: {e}", a.version)))
    }
}

impl DrafterStore {
    /// Every announcement the bucket still holds for this model, newest first (a restarted
    /// trainer continues from the newest one it can verify and load).
    pub async fn announcements(&self) -> Result<Vec<Announcement>, String> {
        use futures::StreamExt;
        let mut history = match self.kv.history(broker::token(&self.model)).await {
            Ok(h) => h,
            Err(e) if e.to_string().contains("not found") => return Ok(Vec::new()),
            Err(e) => return Err(format!("reading the drafter history: {e}")),
        };
        let mut out = Vec::new();
        while let Some(entry) = history.next().await {
            let entry = entry.map_err(|e| format!("reading the drafter history: {e}"))?;
            if let Ok(a) = serde_json::from_slice::<Announcement>(&entry.value) {
                out.push(a);
            }
        }
        out.sort_by_key(|a| std::cmp::Reverse(a.version));
        Ok(out)
    }
}

/// Why a version could not be fetched.
#[derive(Debug)]
pub enum Fetch {
    /// The broker did not deliver it (down, restarting): try again.
    Transient(String),
    /// It is not a drafter this server can serve (digest, format or shapes): never again.
    Refused(String),
}

impl std::fmt::Display for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fetch::Transient(m) | Fetch::Refused(m) => f.write_str(m),
        }
    }
}

/// What the server's drafter source has done, for /metrics.
#[derive(Default)]
pub struct SourceCounters {
    pub connected: AtomicBool,
    /// The newest version announced, and versions offered to the engine or refused.
    pub announced: AtomicU64,
    pub offered: AtomicU64,
    pub refused: AtomicU64,
}

/// The server side: watches the announcement and offers each new version to the engine.
pub struct DrafterSource {
    pub counters: Arc<SourceCounters>,
    _thread: broker::Component,
}

/// How often a server reads the announcement.
const POLL: Duration = Duration::from_millis(500);

impl DrafterSource {
    pub fn start(url: &str, model: &str, exchange: Arc<DrafterExchange>) -> DrafterSource {
        let counters = Arc::new(SourceCounters::default());
        let (url, model, c) = (url.to_string(), model.to_string(), counters.clone());
        let thread =
            broker::Component::spawn("tandem-drafter-source", move |stop| watch(url, model, exchange, c, stop));
        DrafterSource { counters, _thread: thread }
    }
}

async fn watch(
    url: String,
    model: String,
    exchange: Arc<DrafterExchange>,
    c: Arc<SourceCounters>,
    stop: Arc<AtomicBool>,
) {
    let client = match broker::connect(&url, "tandem-drafter-source").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the drafter source cannot start; the drafter stays as it is");
            return;
        }
    };
    let js = jetstream::new(client.clone());
    let mut store = None;
    let mut seen = 0u64;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(POLL).await;
        let up = broker::connected(&client);
        c.connected.store(up, Ordering::Relaxed);
        if !up {
            continue;
        }
        if store.is_none() {
            store =
                DrafterStore::open(&js, &model).await.map_err(|e| tracing::debug!(error = %e, "drafter store")).ok();
        }
        let Some(s) = &store else { continue };
        let a = match s.current().await {
            Ok(Some(a)) if a.version > seen => a,
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "reading the drafter announcement");
                continue;
            }
        };
        c.announced.store(a.version, Ordering::Relaxed);
        let fetched = s.fetch(&a).await.and_then(|w| exchange.check_fits(&w).map(|()| w).map_err(Fetch::Refused));
        if let Err(Fetch::Transient(e)) = &fetched {
            tracing::debug!(error = %e, "drafter fetch failed; retrying");
            continue;
        }
        // A version is tried once: refused, it stays refused (the previous one keeps serving).
        seen = a.version;
        match fetched {
            Ok(w) => {
                exchange.weights.publish(Version { number: a.version, weights: Arc::new(w) });
                c.offered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version = a.version, "drafter version fetched from the broker");
            }
            Err(e) => {
                c.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(version = a.version, error = %e, "drafter version refused; the current one keeps serving");
            }
        }
    }
}
