//! Where the fleet's data lives in NATS JetStream, in one place: the trace stream and its
//! subjects, the trainer's durable consumer, the drafter weight store and its key-value entry.
//! Every name is derived from the served model's name, so one broker carries several models.
use async_nats::jetstream::{self, stream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The stream every server publishes traces to (one subject per model).
pub const TRACE_STREAM: &str = "TANDEM_TRACES";
/// Drafter versions: weights in an object store, the current version's announcement in a
/// key-value bucket.
pub const DRAFTER_BUCKET: &str = "tandem-drafters";
/// Drafter versions kept in the object store per model (older ones are deleted on publish).
pub const KEEP_VERSIONS: u64 = 8;
/// Default cap on the trace stream (the oldest traces go first beyond it).
pub const DEFAULT_STREAM_BYTES: i64 = 2 << 30;

/// A model's name as a NATS subject token and key (letters, digits, `-` and `_`).
pub fn token(model: &str) -> String {
    model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

pub fn trace_subject(model: &str) -> String {
    format!("tandem.traces.{}", token(model))
}

/// The durable consumer a model's trainers share (a restarted trainer resumes it).
pub fn trainer_consumer(model: &str) -> String {
    format!("trainer-{}", token(model))
}

pub fn drafter_object(model: &str, version: u64) -> String {
    format!("{}/v{version}", token(model))
}

/// `nats://host:port` (or `host:port`) checked early, with a message that says which flag.
pub fn check_url(flag: &str, url: &str) -> Result<(), String> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("{flag} {url}: expected nats://HOST:PORT")),
    }
}

/// A client that connects in the background and reconnects forever: a fleet component starts
/// before its broker or outlives a broker restart without failing.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, String> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(url)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))
}

pub fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// The trace stream (created if missing; an existing one keeps its settings).
pub async fn trace_stream(js: &jetstream::Context, max_bytes: i64) -> Result<stream::Stream, String> {
    js.get_or_create_stream(stream::Config {
        name: TRACE_STREAM.into(),
        subjects: vec!["tandem.traces.>".into()],
        max_bytes,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("the trace stream: {e}"))
}

/// A single-threaded runtime for a fleet component's own thread: broker traffic never runs on
/// the serving runtime or the engine thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// A fleet component: a future on its own thread and runtime, stopped (and joined) on drop.
pub struct Component {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Component {
    /// Runs `work(stop)` on a thread named `name`; `work` should return soon after `stop` is set.
    pub fn spawn<F, Fut>(name: &str, work: F) -> Component
    where
        F: FnOnce(Arc<AtomicBool>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                nice_thread();
                runtime().block_on(work(s))
            })
            .expect("spawning a fleet thread");
        Component { stop, thread: Some(thread) }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Gives the calling thread the lowest normal priority (nice 19): when serving needs every core,
/// a fleet component gets a small share instead of an equal one, yet is never starved (traces
/// still flow from a saturated server, unlike under SCHED_IDLE).
fn nice_thread() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread (its kernel thread id).
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        if r != 0 {
            tracing::debug!("could not lower a fleet thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_subject_tokens() {
        assert_eq!(token("SmolLM2-135M-Instruct.Q4_1"), "SmolLM2-135M-Instruct_Q4_1");
        assert_eq!(trace_subject("a b.c>*"), "tandem.traces.a_b_c__");
        assert!(check_url("--trace-sink", "nats://127.0.0.1:4222").is_ok());
        assert!(check_url("--trace-sink", "localhost:4222").is_ok());
        assert!(check_url("--trace-sink", "nats://nowhere").is_err());
    }
}
