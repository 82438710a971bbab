//! An operator's controls of a running engine (what a fleet's gateway fans out): a paused engine
//! runs no step and queues new requests, then finishes them exactly as an engine never paused;
//! a flush forgets cached prefixes, and the next request computes what it would have anyway.
mod common;
use std::time::Duration;
use tandem_engine::{Control, Engine, EngineConfig, EngineHandle, Event, Fcfs, GenerationRequest};
use tandem_models::{load, LoadOptions};
use tandem_runtime::SamplingParams;

fn engine() -> (EngineHandle, std::thread::JoinHandle<()>) {
    let model =
        load(&common::tiny_dir().join("qwen3-qknorm-untied"), &LoadOptions::default(), &mut |_, _| {}).unwrap().model;
    let config = EngineConfig { max_batch: 4, max_seq_len: 256, ..Default::default() };
    let (engine, handle) = Engine::new(model, config, Box::new(Fcfs::default())).unwrap();
    (handle, engine.spawn())
}

fn request(seed: u32) -> GenerationRequest {
    GenerationRequest {
        prompt: (0..40).map(|i| (i * 17 + seed) % 250 + 1).collect(),
        max_tokens: 16,
        sampling: SamplingParams::default(),
        stop_token_ids: Vec::new(),
        client: None,
        agent: None,
        weights: None,
        score: None,
    }
}

/// The request's tokens, waiting for them on the calling thread.
fn tokens(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine answered") {
            Event::Token(t) => out.push(t.id),
            Event::Finished { .. } => return out,
            Event::Failed(m) => panic!("request failed: {m}"),
            Event::Scored(_) => {}
        }
    }
}

#[test]
fn a_paused_engine_queues_requests_and_resumes_them_unchanged() {
    let (handle, thread) = engine();
    let want = tokens(&mut handle.submit(request(3)).unwrap());
    assert_eq!(handle.control(Control::Pause), Some(1));
    assert!(handle.is_paused());
    let mut rx = handle.submit(request(3)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "a paused engine generated a token");
    assert_eq!(handle.waiting(), 1, "the request waits");
    assert_eq!(handle.control(Control::Resume), Some(1));
    assert!(!handle.is_paused());
    assert_eq!(tokens(&mut rx), want, "a pause changes no output");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_flush_forgets_cached_prefixes_and_changes_no_output() {
    let (handle, thread) = engine();
    let want = tokens(&mut handle.submit(request(5)).unwrap());
    // Published after the step that finished the request.
    std::thread::sleep(Duration::from_millis(50));
    let cached = handle.kv_usage().cached;
    assert!(cached > 0, "the finished request left its prompt's blocks cached");
    assert_eq!(handle.control(Control::FlushCache), Some(cached));
    assert_eq!(handle.kv_usage().cached, 0);
    let hits = handle.kv_usage().prefix_hits;
    assert_eq!(tokens(&mut handle.submit(request(5)).unwrap()), want);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.kv_usage().prefix_hits, hits, "nothing was found cached after the flush");
    handle.shutdown();
    thread.join().unwrap();
}

#[test]
fn a_paused_engine_still_shuts_down() {
    let (handle, thread) = engine();
    handle.control(Control::Pause);
    let mut rx = handle.submit(request(7)).unwrap();
    handle.shutdown();
    // Shutting down finishes what it has, paused or not.
    assert_eq!(tokens(&mut rx).len(), 16);
    thread.join().unwrap();
}
