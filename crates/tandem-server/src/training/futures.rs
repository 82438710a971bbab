//! Futures of the training API: every submission answers at once with a request id; the result
//! is fetched by long-polling `retrieve_future`.
use super::results::Outcome;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Completed futures kept for retrieval (the oldest completed ones go first beyond this).
const KEEP: usize = 4096;

type Slot = watch::Sender<Option<Arc<Outcome>>>;

#[derive(Default)]
pub struct FutureStore {
    inner: Mutex<Inner>,
    /// Futures created and not completed yet.
    pending: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Slot>,
    order: VecDeque<String>,
    next: u64,
}

/// Completes one future (dropping it unresolved fails the future as a server error).
pub struct Completer {
    slot: Option<Slot>,
    pending: Arc<AtomicUsize>,
}

impl Completer {
    pub fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(s) = self.slot.take() {
            s.send_replace(Some(Arc::new(outcome)));
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        self.finish(Outcome::failed_server("the request was dropped before it finished"));
    }
}

/// What a poll found.
pub enum Poll {
    Unknown,
    Pending,
    Done(Arc<Outcome>),
}

impl FutureStore {
    /// A new pending future, unless `limit` futures are pending already (then how many are).
    pub fn create(&self, limit: usize) -> Result<(String, Completer), usize> {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let pending = self.pending.load(Ordering::Relaxed);
        if pending >= limit {
            return Err(pending);
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        inner.next += 1;
        let id = format!("req-{}", inner.next);
        let (tx, _) = watch::channel(None);
        inner.map.insert(id.clone(), tx.clone());
        inner.order.push_back(id.clone());
        while inner.order.len() > KEEP {
            let Some(oldest) = inner.order.front().cloned() else { break };
            let done = inner.map.get(&oldest).is_none_or(|s| s.borrow().is_some());
            if !done {
                break;
            }
            inner.order.pop_front();
            inner.map.remove(&oldest);
        }
        Ok((id, Completer { slot: Some(tx), pending: self.pending.clone() }))
    }

    /// Waits up to `hold` for the future to finish.
    pub async fn poll(&self, id: &str, hold: Duration) -> Poll {
        let rx = match self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.get(id) {
            None => return Poll::Unknown,
            Some(s) => s.subscribe(),
        };
        let mut rx = rx;
        let waited = tokio::time::timeout(hold, async { rx.wait_for(|v| v.is_some()).await.map(|v| v.clone()) }).await;
        match waited {
            Ok(Ok(Some(o))) => Poll::Done(o),
            _ => match rx.borrow().clone() {
                Some(o) => Poll::Done(o),
                None => Poll::Pending,
            },
        }
    }
}
