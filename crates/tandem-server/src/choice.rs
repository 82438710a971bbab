//! One generated choice: submits it to the engine, turns its tokens into text (holding back what
//! may be a stop string), measures latency, and reports deltas on a channel. Dropping that channel's
//! receiver (the client went away) cancels the engine request.
use crate::error::ApiError;
use crate::stop::{StopMatcher, StopOutcome, Stops};
use crate::AppState;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tandem_engine::{Event, GenerationRequest, SpecUsage};
use tandem_runtime::{FinishReason, TextStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug)]
pub enum ChoiceEvent {
    Delta {
        text: String,
        tokens: Vec<TokenInfo>,
    },
    /// `cached_tokens`: prompt tokens found in the KV cache (0 when a stop string ended the
    /// choice before the engine reported).
    End {
        finish_reason: &'static str,
        completion_tokens: usize,
        speculation: Option<SpecUsage>,
        cached_tokens: usize,
    },
    Error(String),
}

/// Starts one choice; its events arrive on the returned channel.
pub fn start(
    state: &Arc<AppState>,
    request: GenerationRequest,
    stops: Stops,
    want_logprobs: bool,
    started: Instant,
) -> Result<UnboundedReceiver<ChoiceEvent>, ApiError> {
    let client = request.client.clone().unwrap_or_else(|| "default".into());
    let min_tokens = request.sampling.min_tokens;
    let mut events = state.engine.submit(request)?;
    let (tx, rx) = unbounded_channel();
    let state = state.clone();
    tokio::spawn(async move {
        // Per-client latency of the whole choice, whichever way it ends. It is recorded before the
        // final event is sent, so a client that reads /metrics after its response sees it; the
        // guard covers the other exits (client gone, task dropped).
        struct Done(Arc<AppState>, String, Instant, bool);
        impl Done {
            fn record(&mut self) {
                if !std::mem::replace(&mut self.3, true) {
                    self.0.metrics.observe_client_latency(&self.1, self.2.elapsed().as_secs_f64());
                }
            }
        }
        impl Drop for Done {
            fn drop(&mut self) {
                self.record();
            }
        }
        let mut done = Done(state.clone(), client, started, false);
        let tokenizer = state.tokenizer.clone();
        let mut text = TextStream::new(&tokenizer);
        let mut stop = StopMatcher::new(stops);
        let mut last = started;
        let mut generated = 0usize;
        while let Some(event) = events.recv().await {
            match event {
                Event::Token(t) => {
                    let now = Instant::now();
                    if generated == 0 {
                        state.metrics.time_to_first_token.observe((now - started).as_secs_f64());
                    } else {
                        state.metrics.inter_token_latency.observe((now - last).as_secs_f64());
                    }
                    last = now;
                    generated += 1;
                    state.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    let tokens = if want_logprobs {
                        let name = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
                        vec![TokenInfo {
                            token: name(t.id),
                            logprob: t.logprob,
                            top: t.top_logprobs.iter().map(|&(id, lp)| (name(id), lp)).collect(),
                        }]
                    } else {
                        vec![]
                    };
                    let piece = text.push(t.id).unwrap_or_default();
                    let outcome = if generated < min_tokens {
                        StopOutcome::Continue(stop.pass(&piece))
                    } else {
                        stop.push(&piece)
                    };
                    match outcome {
                        StopOutcome::Continue(out) => {
                            if tx.send(ChoiceEvent::Delta { text: out, tokens }).is_err() {
                                return; // client gone: dropping `events` cancels the request
                            }
                        }
                        StopOutcome::Stop(out) => {
                            let _ = tx.send(ChoiceEvent::Delta { text: out, tokens });
                            done.record();
                            let _ = tx.send(ChoiceEvent::End {
                                finish_reason: "stop",
                                completion_tokens: generated,
                                speculation: None,
                                cached_tokens: 0,
                            });
                            return;
                        }
                    }
                }
                Event::Finished { reason, usage } => {
                    let rest = stop.flush();
                    if !rest.is_empty() {
                        let _ = tx.send(ChoiceEvent::Delta { text: rest, tokens: vec![] });
                    }
                    let finish_reason = match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                    };
                    done.record();
                    let _ = tx.send(ChoiceEvent::End {
                        finish_reason,
                        completion_tokens: usage.completion_tokens,
                        speculation: usage.speculation,
                        cached_tokens: usage.cached_tokens,
                    });
                    return;
                }
                // Only scoring requests are scored.
                Event::Scored(_) => {}
                Event::Failed(message) => {
                    done.record();
                    let _ = tx.send(ChoiceEvent::Error(message));
                    return;
                }
            }
        }
        done.record();
        let _ = tx.send(ChoiceEvent::Error("the engine stopped".into()));
    });
    Ok(rx)
}
