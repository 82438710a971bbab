//! The paged KV cache with prefix sharing changes no output: requests that share a system
//! prompt, the samples of one prompt and a repeated conversation start on cached blocks and
//! produce what computing everything gives, token for token (logprobs included), with every
//! drafter and under a KV pool too small for the batch (sequences then wait or are preempted).
mod common;
use tandem_engine::{Engine, EngineConfig, EngineHandle, Event, Fcfs, GenerationRequest};
use tandem_models::{load, LoadOptions, Model, BLOCK};
use tandem_runtime::speculative::{Drafter, EagleDrafter, NgramDrafter};
use tandem_runtime::{SampledToken, SamplingParams};

const TARGET: &str = "qwen3-qknorm-untied";

fn model() -> Model {
    load(&common::tiny_dir().join(TARGET), &LoadOptions::default(), &mut |_, _| {}).unwrap().model
}

/// Agents sharing a 45-token system prompt (greedy, different questions), and a group of five
/// samples of one prompt (seeded, temperature 1), as an RL step asks for them.
fn requests() -> Vec<GenerationRequest> {
    let system: Vec<u32> = (0..45).map(|i| (i * 29 % 250) as u32 + 1).collect();
    let mut all: Vec<GenerationRequest> = (0..6)
        .map(|i| {
            let question = (0..5 + i * 3).map(|j| ((i * 41 + j * 7) % 250) as u32 + 1);
            GenerationRequest {
                prompt: system.iter().copied().chain(question).collect(),
                max_tokens: 12 + i * 5,
                sampling: SamplingParams { top_logprobs: 2, ..Default::default() },
                // Tokens these outputs often reach: a stop met inside an accepted draft leaves
                // cache rows the history does not name.
                stop_token_ids: if i % 2 == 0 { vec![190, 85] } else { Vec::new() },
                client: Some(format!("agent-{}", i % 3)),
                agent: None,
                weights: None,
                score: None,
            }
        })
        .collect();
    let group: Vec<u32> = (0..37).map(|i| (i * 13 % 250) as u32 + 3).collect();
    all.extend((0..5).map(|i| GenerationRequest {
        prompt: group.clone(),
        max_tokens: 20,
        sampling: SamplingParams { temperature: 1.0, seed: Some(100 + i), ..Default::default() },
        stop_token_ids: Vec::new(),
        client: Some("rl".into()),
        agent: None,
        weights: None,
        score: None,
    }));
    all
}

type Output = (Vec<SampledToken>, String);

fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Output {
    let mut tokens = Vec::new();
    loop {
        match rx.try_recv().expect("the request has finished") {
            Event::Token(t) => tokens.push(t),
            Event::Finished { reason, .. } => return (tokens, format!("{reason:?}")),
            Event::Failed(m) => panic!("request failed: {m}"),
            Event::Scored(_) => {}
        }
    }
}

/// Serves `requests` twice on one engine (the second round finds the first's blocks cached).
fn serve_twice(config: EngineConfig, drafter: Option<Box<dyn Drafter>>) -> (Vec<Output>, Vec<Output>, EngineHandle) {
    let (mut e, h) = Engine::new(model(), config, Box::new(Fcfs::default())).unwrap();
    if let Some(d) = drafter {
        e = e.with_drafter(d).unwrap();
    }
    let mut round = || {
        let mut rxs: Vec<_> = requests().into_iter().map(|r| h.submit(r).unwrap()).collect();
        e.run_until_idle();
        rxs.iter_mut().map(collect).collect::<Vec<_>>()
    };
    let (first, second) = (round(), round());
    (first, second, h)
}

#[test]
fn cached_prefixes_change_no_output() {
    // A step budget shorter than the prompts: the samples of one prompt wait for its blocks.
    let plain =
        EngineConfig { max_batch: 4, prefix_cache: false, spec_k: 0, step_token_budget: 16, ..Default::default() };
    let (expected, again, h) = serve_twice(plain.clone(), None);
    assert_eq!(expected, again);
    assert_eq!(h.kv_usage().prefix_hits, 0);
    let cached = EngineConfig { prefix_cache: true, ..plain };
    let (first, second, h) = serve_twice(cached.clone(), None);
    assert_eq!(first, expected, "the first round (shared system prompt and group) changed");
    assert_eq!(second, expected, "the second round (all cached) changed");
    let usage = h.kv_usage();
    let prompts: usize = requests().iter().map(|r| r.prompt.len()).sum();
    // Round one: agents 2..6 share two blocks of the system prompt, samples 2..5 two blocks of
    // theirs; round two also finds every prompt's full blocks.
    assert!(usage.prefix_hits as usize >= (5 + 4) * 2 * BLOCK, "{usage:?}");
    assert!(usage.prefix_hits as usize >= (5 + 4) * 2 * BLOCK + prompts / 2, "{usage:?}");
    assert_eq!(usage.held, 0, "every block is given back: {usage:?}");
    assert!(usage.cached > 0);
    // Drafters read the sequences that start on a cached prefix too. Greedy outputs equal plain
    // decoding; sampled ones draw differently once drafts are verified (lossless in
    // distribution, see speculation.rs), so they are compared with the same drafter without the
    // prefix cache where its drafts do not depend on the cache (n-gram lookup reads tokens only).
    let greedy = 6;
    type MakeDrafter = Box<dyn Fn() -> Box<dyn Drafter>>;
    let drafters: Vec<(&str, MakeDrafter)> = vec![
        ("ngram", Box::new(|| Box::new(NgramDrafter::default()))),
        (
            "eagle+lookup",
            Box::new(|| {
                let eagle = EagleDrafter::random(&model(), Some(200), 1).unwrap();
                Box::new(eagle.with_lookup(Some(NgramDrafter::default())))
            }),
        ),
    ];
    for (name, make) in drafters {
        let config = EngineConfig { spec_k: 3, ..cached.clone() };
        let (first, second, h) = serve_twice(config.clone(), Some(make()));
        assert_eq!(first[..greedy], expected[..greedy], "{name}: changed an output");
        assert_eq!(second[..greedy], expected[..greedy], "{name}: changed a cached output");
        assert!(h.spec_stats().drafted_tokens > 0, "{name}: drafted nothing");
        if name == "ngram" {
            let (uncached, _, _) = serve_twice(EngineConfig { prefix_cache: false, ..config }, Some(make()));
            assert_eq!(first, uncached, "{name}: the prefix cache changed a sampled output");
            assert_eq!(second, uncached, "{name}: the prefix cache changed a sampled output");
        }
    }
}

#[test]
fn a_kv_pool_smaller_than_the_batch_changes_no_output() {
    let plain = EngineConfig { max_batch: 6, prefix_cache: false, spec_k: 0, ..Default::default() };
    let (expected, _, _) = serve_twice(plain.clone(), None);
    // 10 blocks = 160 tokens: about two of these sequences at a time.
    for prefix_cache in [false, true] {
        let small = EngineConfig { kv_tokens: Some(160), max_seq_len: 160, prefix_cache, ..plain.clone() };
        let (first, second, h) = serve_twice(small, None);
        assert_eq!(first, expected, "prefix cache {prefix_cache}: changed an output");
        assert_eq!(second, expected, "prefix cache {prefix_cache}: changed a second-round output");
        assert!(h.preemptions() > 0, "prefix cache {prefix_cache}: the pool must run out");
        assert_eq!(h.kv_usage().blocks, 10);
        // A prompt the pool could never hold is refused at once, not left waiting.
        let long = GenerationRequest { prompt: vec![5; 200], ..requests()[0].clone() };
        let err = h.submit(long).expect_err("a 200-token prompt in a 160-token pool");
        assert!(err.to_string().contains("160"), "{err}");
    }
}

/// A stop token inside an accepted draft ends the output there while the cache holds the rows
/// of the draft tokens after it; only the positions the history names are offered for sharing.
#[test]
fn a_stop_inside_an_accepted_draft_is_never_cached_as_history() {
    let plain = EngineConfig { max_batch: 2, spec_k: 0, ..Default::default() };
    let prompt: Vec<u32> = (0..40).map(|i| (i * 29 % 250) as u32 + 1).collect();
    let long = GenerationRequest { max_tokens: 24, ..requests()[0].clone() };
    let long = GenerationRequest { prompt: prompt.clone(), stop_token_ids: Vec::new(), ..long };
    let (mut e, h) = Engine::new(model(), plain.clone(), Box::new(Fcfs::default())).unwrap();
    let mut rx = h.submit(long.clone()).unwrap();
    e.run_until_idle();
    let full: Vec<u32> = collect(&mut rx).0.iter().map(|t| t.id).collect();
    // The first output token that did not come before: stopping there cuts the output short.
    let at = (3..full.len()).find(|&i| !full[..i].contains(&full[i])).expect("a new token");
    let sequence: Vec<u32> = prompt.iter().chain(&full).copied().collect();
    let vocab = model().config.vocab_size;
    let oracle = tandem_runtime::speculative::OracleDrafter::new(vec![sequence], vocab);
    let config = EngineConfig { spec_k: 4, spec_adaptive: false, ..plain };
    let (e, h) = Engine::new(model(), config, Box::new(Fcfs::default())).unwrap();
    let mut e = e.with_drafter(Box::new(oracle)).unwrap();
    let stopped = GenerationRequest { stop_token_ids: vec![full[at]], ..long };
    let mut rxs: Vec<_> = (0..2).map(|_| h.submit(stopped.clone()).unwrap()).collect();
    e.run_until_idle();
    for rx in &mut rxs {
        let (tokens, reason) = collect(rx);
        assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), full[..at], "{reason}");
        assert_eq!(reason, "Stop");
    }
    assert!(h.spec_stats().accepted_tokens > 0);
}
