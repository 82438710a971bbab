//! Scoring requests (`GenerationRequest::score`): a prompt's tail is scored from the prefill, and
//! every reported logprob and top-k entry equals what the slow way gives (the whole sequence's
//! logits through `Model::forward_sequence`, log-softmax per row) — in chunks, beside generating
//! requests, after the prefix cache holds the prompt, and under a KV pool that forces waiting.
mod common;
use tandem_engine::{Engine, EngineConfig, EngineError, Event, Fcfs, GenerationRequest, ScoreSpec, TokenScore};
use tandem_models::{load, LoadOptions, Model};
use tandem_runtime::sampling::{log_softmax, top_n};
use tandem_runtime::SamplingParams;

const TARGET: &str = "qwen3-qknorm-untied";

fn model() -> Model {
    load(&common::tiny_dir().join(TARGET), &LoadOptions::default(), &mut |_, _| {}).unwrap().model
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len).map(|j| ((i * 37 + j * 13) % 250) as u32 + 2).collect()
}

fn scoring(prompt: Vec<u32>, from: usize, top_k: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 1,
        sampling: SamplingParams::default(),
        stop_token_ids: vec![],
        client: Some("scorer".into()),
        agent: None,
        weights: None,
        score: Some(ScoreSpec { from, top_k }),
    }
}

fn generating(prompt: Vec<u32>) -> GenerationRequest {
    GenerationRequest { max_tokens: 9, score: None, client: Some("writer".into()), ..scoring(prompt, 1, 0) }
}

/// Scores of positions `from..` the slow way: one forward over the whole prompt.
fn slow(model: &Model, prompt: &[u32], from: usize, top_k: usize) -> Vec<TokenScore> {
    let rows = model.forward_sequence(prompt).unwrap().to_vec2::<f32>().unwrap();
    (from..prompt.len())
        .map(|p| {
            let lp = log_softmax(&rows[p - 1]);
            TokenScore { token: prompt[p], logprob: lp[prompt[p] as usize], top: top_n(&lp, top_k) }
        })
        .collect()
}

/// A scoring request's scores and usage (panics unless it finished without output).
fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> (Vec<TokenScore>, tandem_engine::Usage) {
    let mut scores = Vec::new();
    loop {
        match rx.try_recv().expect("the request has finished") {
            Event::Scored(s) => scores.extend(s),
            Event::Finished { usage, .. } => return (scores, usage),
            Event::Token(t) => panic!("a scoring request generated token {}", t.id),
            Event::Failed(m) => panic!("request failed: {m}"),
        }
    }
}

fn assert_close(got: &[TokenScore], want: &[TokenScore]) {
    assert_eq!(got.len(), want.len(), "positions scored");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.token, w.token, "position {i}");
        assert!((g.logprob - w.logprob).abs() < 1e-4, "position {i}: {} vs {}", g.logprob, w.logprob);
        assert_eq!(g.top.len(), w.top.len());
        for ((gi, gl), (wi, wl)) in g.top.iter().zip(&w.top) {
            // Near-ties may swap; their logprobs may not differ.
            assert!(gi == wi || (gl - wl).abs() < 1e-4, "position {i}: top {gi}:{gl} vs {wi}:{wl}");
            assert!((gl - wl).abs() < 1e-4, "position {i}: top {gl} vs {wl}");
        }
    }
}

#[test]
fn scores_equal_the_slow_way_in_chunks_beside_generation_and_from_the_prefix_cache() {
    let reference = model();
    let config = EngineConfig { step_token_budget: 16, max_batch: 4, ..Default::default() };
    let (mut e, h) = Engine::new(model(), config, Box::new(Fcfs::default())).unwrap();
    // (prompt, first scored position, top-k): scoring from the start, from a question's end, the
    // last token alone; a prompt longer than a step, so its scores arrive over several chunks.
    let cases = [(prompt(0, 70), 1, 20), (prompt(1, 45), 30, 5), (prompt(2, 20), 19, 1), (prompt(3, 50), 17, 0)];
    for round in 0..2 {
        // The second round finds every prompt's blocks cached, and must score them all the same.
        let mut rxs: Vec<_> = cases.iter().map(|(p, f, k)| h.submit(scoring(p.clone(), *f, *k)).unwrap()).collect();
        let mut writers: Vec<_> = (0..3).map(|i| h.submit(generating(prompt(10 + i, 25))).unwrap()).collect();
        e.run_until_idle();
        for (rx, (p, from, k)) in rxs.iter_mut().zip(&cases) {
            let (scores, usage) = collect(rx);
            assert_close(&scores, &slow(&reference, p, *from, *k));
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (p.len(), 0));
            if round == 1 {
                // The prompt's whole cached blocks, cut at the position before the first scored
                // token (whose logits it needs).
                let whole = p.len() / tandem_models::BLOCK * tandem_models::BLOCK;
                assert_eq!(usage.cached_tokens, whole.min(from - 1), "round 2 reused the cache");
            }
        }
        for rx in &mut writers {
            let mut n = 0;
            while let Ok(ev) = rx.try_recv() {
                n += matches!(ev, Event::Token(_)) as usize;
            }
            assert_eq!(n, 9, "generation beside scoring is unchanged in length");
        }
    }
}

#[test]
fn scores_survive_a_kv_pool_too_small_for_all_of_them() {
    let reference = model();
    // Room for about two of the 60-token prompts at once: the rest wait (or are preempted).
    let config = EngineConfig {
        step_token_budget: 24,
        max_batch: 6,
        kv_tokens: Some(128),
        max_seq_len: 96,
        ..Default::default()
    };
    let (mut e, h) = Engine::new(model(), config, Box::new(Fcfs::default())).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(20 + i, 60)).collect();
    let mut rxs: Vec<_> = prompts.iter().map(|p| h.submit(scoring(p.clone(), 8, 4)).unwrap()).collect();
    e.run_until_idle();
    for (rx, p) in rxs.iter_mut().zip(&prompts) {
        assert_close(&collect(rx).0, &slow(&reference, p, 8, 4));
    }
}

#[test]
fn a_scoring_request_must_leave_a_token_to_score_and_a_token_before_it() {
    let (_e, h) = Engine::new(model(), EngineConfig::default(), Box::new(Fcfs::default())).unwrap();
    for from in [0, 10] {
        let err = h.submit(scoring(prompt(0, 10), from, 3)).unwrap_err();
        assert!(matches!(err, EngineError::Invalid(ref m) if m.contains("scoring starts")), "{err}");
    }
    let err = h.submit(scoring(prompt(0, 10), 1, 101)).unwrap_err();
    assert!(matches!(err, EngineError::InvalidParam { param: "top_k", .. }), "{err}");
}
