//! The engine batches many requests without changing any of their outputs, frees what cancelled
//! requests held, and refuses bad requests with precise errors.
mod common;
use std::path::PathBuf;
use tandem_engine::{Engine, EngineConfig, EngineError, EngineHandle, Event, Fcfs, GenerationRequest};
use tandem_models::{load, LoadOptions};
use tandem_runtime::{FinishReason, SamplingParams};
use tokio::sync::mpsc::UnboundedReceiver;

fn tiny_model_dir() -> PathBuf {
    common::tiny_dir().join("qwen3-qknorm-untied")
}

fn engine(config: EngineConfig) -> (Engine, EngineHandle) {
    let loaded = load(&tiny_model_dir(), &LoadOptions::default(), &mut |_, _| {}).unwrap();
    Engine::new(loaded.model, config, Box::new(Fcfs::default())).unwrap()
}

fn request(i: usize) -> GenerationRequest {
    let len = 1 + (i * 7) % 37;
    let prompt: Vec<u32> = (0..len).map(|j| ((i * 31 + j * 17) % 250) as u32 + 1).collect();
    let sampling = if i.is_multiple_of(3) {
        SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Default::default() }
    } else {
        SamplingParams::default()
    };
    GenerationRequest {
        prompt,
        max_tokens: 6 + i % 9,
        sampling,
        stop_token_ids: vec![],
        client: None,
        agent: None,
        weights: None,
        score: None,
    }
}

fn collect(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, Event) {
    let mut tokens = Vec::new();
    loop {
        match rx.try_recv().expect("the request has finished") {
            Event::Token(t) => tokens.push(t.id),
            end => return (tokens, end),
        }
    }
}

#[test]
fn batched_outputs_equal_outputs_served_alone() {
    let n = 16;
    let alone: Vec<(Vec<u32>, Event)> = (0..n)
        .map(|i| {
            let (mut e, h) = engine(EngineConfig { max_batch: 1, ..Default::default() });
            let mut rx = h.submit(request(i)).unwrap();
            e.run_until_idle();
            collect(&mut rx)
        })
        .collect();
    // 16 requests on 5 slots: some wait, prefill chunks and decodes mix in every step.
    let (mut e, h) = engine(EngineConfig { max_batch: 5, ..Default::default() });
    let mut rxs: Vec<_> = (0..n).map(|i| h.submit(request(i)).unwrap()).collect();
    e.run_until_idle();
    for (i, rx) in rxs.iter_mut().enumerate() {
        let got = collect(rx);
        assert_eq!(got, alone[i], "request {i} changed when batched");
        assert!(matches!(got.1, Event::Finished { reason: FinishReason::Length, .. }));
    }
    assert_eq!((h.waiting(), h.running()), (0, 0));
}

#[test]
fn cancelled_requests_free_their_slots() {
    let (mut e, h) = engine(EngineConfig { max_batch: 2, ..Default::default() });
    let long = GenerationRequest { max_tokens: 1000, ..request(3) };
    let rx_cancel = h.submit(long.clone()).unwrap();
    let rx_cancel_waiting = h.submit(long.clone()).unwrap();
    let mut rx = h.submit(request(4)).unwrap();
    e.step();
    e.step();
    drop(rx_cancel);
    drop(rx_cancel_waiting);
    e.run_until_idle();
    let (tokens, end) = collect(&mut rx);
    assert_eq!(tokens.len(), request(4).max_tokens);
    assert!(
        matches!(end, Event::Finished { reason: FinishReason::Length, usage } if usage.completion_tokens == tokens.len())
    );
    assert_eq!((h.waiting(), h.running()), (0, 0));
}

#[test]
fn stop_tokens_end_generation_without_being_returned() {
    let (mut e, h) = engine(EngineConfig::default());
    let mut rx = h.submit(request(1)).unwrap();
    e.run_until_idle();
    let (tokens, _) = collect(&mut rx);
    let stop = tokens[2];
    let first_stop = tokens.iter().position(|&t| t == stop).unwrap();
    let mut rx = h.submit(GenerationRequest { stop_token_ids: vec![stop], ..request(1) }).unwrap();
    e.run_until_idle();
    let (stopped, end) = collect(&mut rx);
    assert_eq!(stopped, tokens[..first_stop]);
    assert!(matches!(end, Event::Finished { reason: FinishReason::Stop, .. }));
}

#[test]
fn bad_requests_are_refused_precisely() {
    let (_e, h) = engine(EngineConfig { max_seq_len: 64, max_waiting: 2, ..Default::default() });
    let r = |prompt: Vec<u32>| GenerationRequest { prompt, ..request(0) };
    assert_eq!(h.submit(r(vec![])).unwrap_err(), EngineError::EmptyPrompt);
    assert_eq!(h.submit(r(vec![1; 64])).unwrap_err(), EngineError::PromptTooLong { prompt: 64, limit: 64 });
    assert!(matches!(h.submit(r(vec![1_000_000])).unwrap_err(), EngineError::Invalid(m) if m.contains("vocabulary")));
    let bad_sampling =
        GenerationRequest { sampling: SamplingParams { top_p: 0.0, ..Default::default() }, ..request(0) };
    assert!(matches!(h.submit(bad_sampling).unwrap_err(), EngineError::InvalidParam { param: "top_p", .. }));
    // Two may wait; the third is refused until the engine takes some.
    let _a = h.submit(request(1)).unwrap();
    let _b = h.submit(request(2)).unwrap();
    assert_eq!(h.submit(request(3)).unwrap_err(), EngineError::QueueFull(2));
}

#[test]
fn the_engine_thread_serves_and_shuts_down() {
    let (e, h) = engine(EngineConfig::default());
    let thread = e.spawn();
    let mut rxs: Vec<_> = (0..4).map(|i| h.submit(request(i)).unwrap()).collect();
    for (i, rx) in rxs.iter_mut().enumerate() {
        let mut n = 0;
        loop {
            match rx.blocking_recv().unwrap() {
                Event::Token(_) => n += 1,
                Event::Finished { usage, .. } => {
                    assert_eq!((n, usage.completion_tokens), (request(i).max_tokens, request(i).max_tokens));
                    break;
                }
                Event::Failed(m) => panic!("{m}"),
                Event::Scored(_) => {}
            }
        }
    }
    h.shutdown();
    assert_eq!(h.submit(request(0)).unwrap_err(), EngineError::ShuttingDown);
    thread.join().unwrap();
}

#[test]
fn a_handle_knows_when_its_engine_is_gone() {
    let (e, h) = engine(EngineConfig::default());
    assert!(h.is_alive());
    drop(e);
    assert!(!h.is_alive(), "/health must report an engine that stopped");
    assert_eq!(h.submit(request(1)).unwrap_err(), EngineError::ShuttingDown);
}

/// A policy with a bug: its third `pick` panics.
struct Flaky {
    picks: usize,
}

impl tandem_engine::SchedulingPolicy for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn pick(&mut self, waiting: &[tandem_engine::RequestInfo]) -> Option<usize> {
        self.picks += 1;
        if self.picks == 3 {
            panic!("a bug in the policy");
        }
        waiting.iter().enumerate().min_by_key(|(_, w)| w.id).map(|(i, _)| i)
    }
}

/// A panic inside a step (a bug outside the forward) fails the requests that were running with
/// an error naming it; the engine thread lives on and serves the next requests unchanged.
#[test]
fn a_panicking_step_fails_its_requests_not_the_engine() {
    let loaded = load(&tiny_model_dir(), &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let config = EngineConfig { max_batch: 2, ..Default::default() };
    let (flaky, h) = Engine::new(loaded.model, config, Box::new(Flaky { picks: 0 })).unwrap();
    let thread = flaky.spawn();
    let wait = |mut rx: UnboundedReceiver<Event>| loop {
        match rx.blocking_recv().expect("an end event") {
            Event::Token(_) => continue,
            end => return end,
        }
    };
    let (a, b) = (h.submit(request(1)).unwrap(), h.submit(request(2)).unwrap());
    let c = h.submit(request(4)).unwrap(); // the third pick panics
    let ends = [wait(a), wait(b), wait(c)];
    assert!(ends.iter().any(|e| matches!(e, Event::Failed(m) if m.contains("a bug in the policy"))), "{ends:?}");
    assert!(h.is_alive(), "the engine thread survived");
    let (mut alone, ah) = engine(EngineConfig { max_batch: 1, ..Default::default() });
    let mut rx = ah.submit(request(5)).unwrap();
    alone.run_until_idle();
    assert_eq!(wait_tokens(h.submit(request(5)).unwrap()), collect(&mut rx).0);
    h.shutdown();
    thread.join().unwrap();
}

fn wait_tokens(mut rx: UnboundedReceiver<Event>) -> Vec<u32> {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("events") {
            Event::Token(t) => tokens.push(t.id),
            Event::Finished { .. } => return tokens,
            Event::Failed(m) => panic!("{m}"),
            Event::Scored(_) => {}
        }
    }
}
