//! Traces over the broker: every server publishes the traces its engine records (the records
//! `--trace-dir` writes, as bytes) to a capped JetStream stream; trainers read them through a
//! durable consumer and acknowledge a trace only once a published drafter version has used it.
//!
//! Publishing never makes serving wait. The engine pushes traces into its bounded buffer (full:
//! the oldest are dropped and counted); this component's own thread drains that buffer only
//! while the broker is connected, so a broker that is down just lets the buffer fill and drop,
//! and publishing resumes when it returns.
use crate::broker;
use async_nats::jetstream;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem_engine::online::{Trace, TraceBuffer};
use tandem_speculator::traces_io::{decode_trace, encode_trace};

/// Room left in a message for the safetensors header and the broker's own framing.
const HEADER_ROOM: usize = 64 << 10;

/// The trace split into pieces of at most `max_positions` positions each (a message must fit the
/// broker's `max_payload`, 1 MiB by default, and a long sequence's trace can be larger). A piece
/// trains like the whole over its positions: it keeps its tokens, features, labels and
/// rejections, shifted to start at 0 (the drafter's attention depends only on distances).
pub fn split_trace(t: &Trace, max_positions: usize) -> Vec<Trace> {
    let n = t.positions();
    let max = max_positions.max(1);
    if n <= max {
        return vec![t.clone()];
    }
    let (fs, hs) = (t.feature_size, t.final_size());
    (0..n)
        .step_by(max)
        .map(|a| {
            let b = (a + max).min(n);
            Trace {
                tokens: t.tokens[a..(b + 1).min(t.tokens.len())].to_vec(),
                prompt_len: t.prompt_len.saturating_sub(a).min(b - a),
                feature_size: fs,
                features: t.features[a * fs..b * fs].to_vec(),
                soft: t.soft.get(a..b.min(t.soft.len())).map(<[_]>::to_vec).unwrap_or_default(),
                final_hidden: if hs > 0 { t.final_hidden[a * hs..b * hs].to_vec() } else { Vec::new() },
                rejected: t
                    .rejected
                    .iter()
                    .filter(|r| (a..b).contains(&r.pos))
                    .map(|r| tandem_engine::online::Rejection { pos: r.pos - a, ..*r })
                    .collect(),
                version: t.version.clone(),
                skipped: t.skipped + a,
            }
        })
        .collect()
}

/// Positions per message so that one fits in `max_payload` bytes.
fn positions_per_message(t: &Trace, max_payload: usize) -> usize {
    let per_position = t.bytes().div_ceil(t.positions().max(1)) + 16;
    max_payload.saturating_sub(HEADER_ROOM).max(per_position) / per_position
}

/// What publishing has done, for /metrics.
#[derive(Default)]
pub struct SinkCounters {
    pub connected: AtomicBool,
    /// Traces published (a split trace counts once), their messages and bytes.
    pub traces: AtomicU64,
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Traces the broker did not take (it went away mid-publish, or refused): lost, counted.
    pub failed: AtomicU64,
}

/// The publishing thread; stops when dropped.
pub struct TraceSink {
    pub counters: Arc<SinkCounters>,
    _thread: broker::Component,
}

impl TraceSink {
    /// Publishes what `buffer` receives for `model` to the broker at `url`.
    pub fn start(url: &str, model: &str, buffer: Arc<TraceBuffer>, stream_bytes: i64) -> TraceSink {
        let counters = Arc::new(SinkCounters::default());
        let (url, subject, c) = (url.to_string(), broker::trace_subject(model), counters.clone());
        let thread = broker::Component::spawn("tandem-trace-sink", move |stop| {
            publish_loop(url, subject, buffer, stream_bytes, c, stop)
        });
        TraceSink { counters, _thread: thread }
    }
}

async fn publish_loop(
    url: String,
    subject: String,
    buffer: Arc<TraceBuffer>,
    stream_bytes: i64,
    counters: Arc<SinkCounters>,
    stop: Arc<AtomicBool>,
) {
    let client = match broker::connect(&url, "tandem-trace-sink").await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the trace sink cannot start; traces stay local");
            return;
        }
    };
    let js = jetstream::new(client.clone());
    let mut stream_ready = false;
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let up = broker::connected(&client);
        counters.connected.store(up, Ordering::Relaxed);
        if !up {
            stream_ready = false;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if !stream_ready {
            match broker::trace_stream(&js, stream_bytes).await {
                Ok(_) => stream_ready = true,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot reach the trace stream yet; retrying");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let traces = buffer.drain();
        if traces.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for t in traces {
            if !publish(&js, &subject, &t, client.server_info().max_payload, &counters).await {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                stream_ready = false;
            }
        }
    }
}

/// One trace, split to fit; true when the broker stored every piece.
async fn publish(js: &jetstream::Context, subject: &str, t: &Trace, max_payload: usize, c: &SinkCounters) -> bool {
    let mut acks = Vec::new();
    for piece in split_trace(t, positions_per_message(t, max_payload)) {
        let bytes = match encode_trace(&piece) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "a trace could not be encoded");
                return false;
            }
        };
        let len = bytes.len() as u64;
        match js.publish(subject.to_string(), bytes.into()).await {
            Ok(ack) => acks.push((ack, len)),
            Err(e) => {
                tracing::debug!(error = %e, "trace publish failed");
                return false;
            }
        }
    }
    for (ack, len) in acks {
        if tokio::time::timeout(Duration::from_secs(10), ack).await.map_or(true, |r| r.is_err()) {
            return false;
        }
        c.messages.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(len, Ordering::Relaxed);
    }
    c.traces.fetch_add(1, Ordering::Relaxed);
    true
}

/// A trainer's side: traces from the durable consumer, each with the message to acknowledge once
/// a published version has used it.
pub struct TraceFeed {
    consumer: jetstream::consumer::PullConsumer,
}

/// A delivered trace and its message (None: an undecodable message, acknowledged at once so it
/// is not delivered again).
pub struct Delivered {
    pub trace: Option<Trace>,
    pub message: jetstream::Message,
    /// The stream's sequence number: a redelivered message has the same one.
    pub sequence: u64,
}

impl TraceFeed {
    /// The model's durable consumer (created if missing): a message not acknowledged within
    /// `ack_wait` is delivered again, to this trainer or the next one.
    pub async fn open(js: &jetstream::Context, model: &str, ack_wait: Duration) -> Result<TraceFeed, String> {
        let stream = broker::trace_stream(js, broker::DEFAULT_STREAM_BYTES).await?;
        let name = broker::trainer_consumer(model);
        let consumer = stream
            .get_or_create_consumer(
                &name,
                jetstream::consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: broker::trace_subject(model),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("the trainer's consumer {name}: {e}"))?;
        Ok(TraceFeed { consumer })
    }

    /// Up to `most` traces, waiting at most `wait` for the first.
    pub async fn next(&self, most: usize, wait: Duration) -> Result<Vec<Delivered>, String> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(most)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| format!("fetching traces: {e}"))?;
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            let message = m.map_err(|e| format!("fetching traces: {e}"))?;
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            let trace = match decode_trace(&message.payload, "a broker message") {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, sequence, "an undecodable trace message; skipped");
                    None
                }
            };
            out.push(Delivered { trace, message, sequence });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_engine::online::{Rejection, TraceVersion};

    fn trace(n: usize) -> Trace {
        Trace {
            tokens: (0..n as u32 + 1).collect(),
            prompt_len: 3,
            feature_size: 2,
            features: (0..2 * n).map(|i| i as f32).collect(),
            soft: (0..n).map(|p| if p < 3 { vec![] } else { vec![(p as u32, 0.5)] }).collect(),
            final_hidden: (0..n).map(|i| -(i as f32)).collect(),
            rejected: vec![Rejection { pos: 4, token: 9, depth: 0 }, Rejection { pos: 7, token: 8, depth: 1 }],
            version: Some(TraceVersion { family: "run".into(), id: 3 }),
            skipped: 0,
        }
    }

    #[test]
    fn pieces_cover_the_trace_exactly() {
        let t = trace(10);
        assert_eq!(split_trace(&t, 10), vec![t.clone()]);
        let pieces = split_trace(&t, 4);
        assert_eq!(pieces.iter().map(Trace::positions).collect::<Vec<_>>(), vec![4, 4, 2]);
        let features: Vec<f32> = pieces.iter().flat_map(|p| p.features.clone()).collect();
        assert_eq!(features, t.features);
        let hidden: Vec<f32> = pieces.iter().flat_map(|p| p.final_hidden.clone()).collect();
        assert_eq!(hidden, t.final_hidden);
        let soft: Vec<_> = pieces.iter().flat_map(|p| p.soft.clone()).collect();
        assert_eq!(soft, t.soft);
        // Each piece's tokens: its positions plus the next one (the label of its last position).
        assert_eq!(pieces[1].tokens, vec![4, 5, 6, 7, 8]);
        assert_eq!(pieces[2].tokens, vec![8, 9, 10]);
        assert_eq!((pieces[0].prompt_len, pieces[1].prompt_len), (3, 0));
        assert_eq!(
            pieces[1].rejected,
            vec![Rejection { pos: 0, token: 9, depth: 0 }, Rejection { pos: 3, token: 8, depth: 1 }]
        );
        assert!(pieces.iter().all(|p| p.version == t.version));
    }

    #[test]
    fn a_message_fits_the_payload() {
        let t = trace(1000);
        let per = positions_per_message(&t, 1 << 20);
        for p in split_trace(&t, per) {
            assert!(encode_trace(&p).unwrap().len() <= 1 << 20);
        }
    }
}
