//! Joining the SGLang Model Gateway (`smg`): a worker registers itself with `POST /workers
//! {"url": ...}` once it serves (retrying while the gateway is not up yet, so the two start in
//! any order), and leaves with `DELETE /workers/{id}` when it shuts down. The gateway then routes
//! OpenAI traffic by its own policy (cache-aware by default), health-checks the worker, and
//! fans the RL controls (`/pause_generation`, `/update_weights_from_disk`, ...) out to it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long registration waits between tries while the gateway is unreachable.
const RETRY: Duration = Duration::from_secs(2);
/// One HTTP call to the gateway, at most.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// This worker's registration with a gateway.
pub struct Registration {
    gateway: String,
    id: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl Registration {
    /// Registers `worker_url` (how the gateway reaches this worker) with the gateway at
    /// `gateway_url`, in the background until it succeeds.
    pub fn start(gateway_url: &str, worker_url: &str) -> Registration {
        let gateway = gateway_url.trim_end_matches('/').to_string();
        let id = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, w, i, s) = (gateway.clone(), worker_url.to_string(), id.clone(), stop.clone());
        std::thread::Builder::new()
            .name("tandem-register".into())
            .spawn(move || {
                let mut warned = false;
                while !s.load(Ordering::SeqCst) {
                    match register(&g, &w) {
                        Ok(worker_id) => {
                            tracing::info!(gateway = %g, worker = %w, id = %worker_id, "registered with the gateway");
                            eprintln!("registered with the gateway {g} as {worker_id}");
                            *i.lock().unwrap_or_else(|e| e.into_inner()) = Some(worker_id);
                            return;
                        }
                        Err(e) if !warned => {
                            tracing::warn!(gateway = %g, error = %e, "cannot register with the gateway yet; retrying");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                    std::thread::sleep(RETRY);
                }
            })
            .expect("spawning the registration thread");
        Registration { gateway, id, stop }
    }

    /// The id the gateway gave this worker, once registered.
    pub fn worker_id(&self) -> Option<String> {
        self.id.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Leaves the gateway (a worker that was never registered just stops trying).
    pub fn leave(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let Some(id) = self.worker_id() else { return };
        let url = format!("{}/workers/{id}", self.gateway);
        match ureq::delete(&url).timeout(CALL_TIMEOUT).call() {
            Ok(_) => tracing::info!(gateway = %self.gateway, id = %id, "left the gateway"),
            Err(e) => tracing::warn!(gateway = %self.gateway, error = %e, "could not deregister from the gateway"),
        }
    }
}

/// One registration call; the worker id the gateway answers with. A worker the gateway still
/// knows (it restarted faster than the gateway noticed) is already registered: 409, and its id
/// is looked up.
fn register(gateway: &str, worker_url: &str) -> Result<String, String> {
    let body = serde_json::json!({ "url": worker_url }).to_string();
    let resp = match ureq::post(&format!("{gateway}/workers"))
        .timeout(CALL_TIMEOUT)
        .set("content-type", "application/json")
        .send_string(&body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(409, _)) => return known_id(gateway, worker_url),
        Err(e) => return Err(e.to_string()),
    };
    let text = resp.into_string().map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    v.get("worker_id")
        .or_else(|| v.get("id"))
        .and_then(|id| id.as_str())
        .map(String::from)
        .ok_or_else(|| format!("the gateway answered without a worker id: {text}"))
}

/// The id the gateway lists `worker_url` under.
fn known_id(gateway: &str, worker_url: &str) -> Result<String, String> {
    let text = ureq::get(&format!("{gateway}/workers"))
        .timeout(CALL_TIMEOUT)
        .call()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    v.get("workers")
        .and_then(|w| w.as_array())
        .and_then(|ws| ws.iter().find(|w| w.get("url").and_then(|u| u.as_str()) == Some(worker_url)))
        .and_then(|w| w.get("id").and_then(|i| i.as_str()))
        .map(String::from)
        .ok_or_else(|| format!("the gateway refused {worker_url} as a duplicate but does not list it"))
}
