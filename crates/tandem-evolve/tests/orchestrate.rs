//! The orchestrator against a fake, deterministic pair of models: which model each call goes to
//! (RSA, Squeeze Evolve at several percentiles, voting), the aggregation prompts, the majority
//! vote, the cost accounting, cancellation, and configuration errors.
use futures::future::BoxFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tandem_evolve::{evolve, Backend, Cost, EvolveConfig, GenerateCall, Generated, Outcome, Route, ScoreCall, Scored};

/// Answers "Answer: X" where X is the seed mod 5 for a question, and for an aggregation the
/// largest answer among its candidates (so evolution converges to 4). Scores a candidate's
/// confidence as its answer. Costs: one prompt token per 4 bytes, one output token per byte.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<GenerateCall>>,
    scores: Mutex<Vec<ScoreCall>>,
}

fn answer_of(text: &str) -> Option<i64> {
    text.rsplit("Answer: ").next()?.split_whitespace().next()?.parse().ok()
}

impl Backend for Fake {
    fn generate(&self, call: GenerateCall) -> BoxFuture<'static, Result<Generated, String>> {
        self.calls.lock().unwrap().push(call.clone());
        let answer = match call.prompt.contains("---- Solution") {
            false => (call.seed % 5) as i64,
            true => call.prompt.split("---- Solution").skip(1).filter_map(answer_of).max().unwrap_or(-1),
        };
        let text = format!("{} thinks. Answer: {answer}", call.model);
        let cost =
            Cost { calls: 1, prompt_tokens: call.prompt.len() / 4, cached_tokens: 0, completion_tokens: text.len() };
        Box::pin(async move { Ok(Generated { text, cost }) })
    }

    fn score(&self, call: ScoreCall) -> BoxFuture<'static, Result<Scored, String>> {
        self.scores.lock().unwrap().push(call.clone());
        let confidence = call.candidates.iter().map(|c| answer_of(c).unwrap_or(0) as f64).collect();
        let cost = Cost { calls: call.candidates.len(), prompt_tokens: 10 * call.candidates.len(), ..Cost::default() };
        Box::pin(async move { Ok(Scored { confidence, cost }) })
    }
}

fn config(json: &str) -> EvolveConfig {
    EvolveConfig::from_json(json).unwrap()
}

async fn run(fake: &Fake, c: &EvolveConfig) -> Outcome {
    let mut rounds = 0;
    let out = evolve(c, fake, "Q: what?", 42, &mut |r| {
        rounds += 1;
        assert_eq!(r.round, rounds, "progress arrives round by round");
    })
    .await
    .unwrap();
    assert_eq!(rounds, c.t);
    out
}

fn calls_to(fake: &Fake, model: &str) -> usize {
    fake.calls.lock().unwrap().iter().filter(|c| c.model == model).count()
}

#[tokio::test]
async fn rsa_aggregates_k_candidates_per_new_one_and_votes_at_the_end() {
    let fake = Fake::default();
    let c = config(r#"{"n": 6, "k": 3, "t": 4, "tiers": ["big"], "max_tokens": 64, "temperature": 0.7}"#);
    let out = run(&fake, &c).await;
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 6 * 4);
    assert!(calls.iter().all(|c| c.model == "big" && c.max_tokens == 64 && c.temperature == 0.7));
    for call in &calls[6..] {
        assert!(call.prompt.starts_with("Q: what?\n\n"), "the question comes first (a shared prefix)");
        assert_eq!(call.prompt.matches("---- Solution").count(), 3);
        for j in 1..=3 {
            assert!(call.prompt.contains(&format!("---- Solution {j} ----\nbig thinks.")));
        }
    }
    assert!(fake.scores.lock().unwrap().is_empty(), "RSA scores nothing");
    // Aggregation takes the largest answer seen: the population climbs to the best first answer.
    let best = out.rounds[0].answers.iter().flatten().max().unwrap().clone();
    assert_eq!(out.answer.as_deref(), Some(best.as_str()));
    assert_eq!(out.votes, 6);
    assert!(out.text.ends_with(&format!("Answer: {best}")));
    // Every call's tokens are in the cost, under its model.
    let spent: usize = calls.iter().map(|c| c.prompt.len() / 4).sum();
    assert_eq!(out.cost["big"].prompt_tokens, spent);
    assert_eq!(out.total().calls, 24);
    // Seeds differ per sample, and the same seed gives the same evolution.
    let seeds: std::collections::BTreeSet<u64> = calls.iter().map(|c| c.seed).collect();
    assert_eq!(seeds.len(), calls.len());
    let again = run(&Fake::default(), &c).await;
    assert_eq!(again.rounds[2].answers, out.rounds[2].answers);
}

#[tokio::test]
async fn squeeze_routes_the_least_confident_groups_to_the_expensive_model() {
    for (p, to_big) in [(0.0, 0), (10.0, 1), (30.0, 3), (50.0, 5), (100.0, 10)] {
        let fake = Fake::default();
        let c = config(&format!(r#"{{"n": 10, "k": 2, "t": 3, "tiers": ["big", "small"], "percentile": {p}}}"#));
        let out = run(&fake, &c).await;
        assert_eq!(calls_to(&fake, "big"), 10 + 2 * to_big, "p = {p}");
        assert_eq!(calls_to(&fake, "small"), 2 * (10 - to_big), "p = {p}");
        // p = 0 and 100 need no scores; between them every later round scores its predecessor.
        let scored = fake.scores.lock().unwrap().clone();
        assert_eq!(scored.len(), if p == 0.0 || p == 100.0 { 0 } else { 2 }, "p = {p}");
        assert!(scored.iter().all(|s| s.model == "small" && s.top_k == 20 && s.prompt == "Q: what?"));
        for r in &out.rounds[1..] {
            let Some(conf) = &r.confidence else { continue };
            // Every group sent to the big model is at most as confident as every group sent small.
            let fit = |g: &tandem_evolve::Group| g.members.iter().map(|&m| conf[m]).sum::<f64>() / 2.0;
            let big = r.groups.iter().filter(|g| g.route == Route::Tier(0)).map(fit).fold(f64::MIN, f64::max);
            let small = r.groups.iter().filter(|g| g.route == Route::Tier(1)).map(fit).fold(f64::MAX, f64::min);
            assert!(big <= small, "p = {p}: {big} > {small}");
            assert!(r.groups.iter().all(|g| g.fitness == Some(fit(g))));
        }
        if to_big > 0 && to_big < 10 {
            assert!(out.cost.contains_key("small (score)"));
        }
    }
}

#[tokio::test]
async fn the_most_confident_groups_can_take_a_vote_instead_of_a_generation() {
    let fake = Fake::default();
    let c = config(r#"{"n": 10, "k": 3, "t": 2, "tiers": ["big", "small"], "percentile": 20, "vote_percentile": 30}"#);
    let out = run(&fake, &c).await;
    let r = &out.rounds[1];
    let routes = |x: Route| r.groups.iter().filter(|g| g.route == x).count();
    assert_eq!((routes(Route::Tier(0)), routes(Route::Tier(1)), routes(Route::Vote)), (2, 5, 3));
    assert_eq!(calls_to(&fake, "big") + calls_to(&fake, "small"), 10 + 7);
    let first = &out.rounds[0];
    for (i, g) in r.groups.iter().enumerate().filter(|(_, g)| g.route == Route::Vote) {
        // The voted candidate is a member's own text, carrying the members' majority answer.
        let answers: Vec<Option<String>> = g.members.iter().map(|&m| first.answers[m].clone()).collect();
        let (winner, _) = tandem_evolve::majority(&answers).unwrap();
        assert!(g.members.iter().any(|&m| first.texts[m] == r.texts[i]));
        assert_eq!(r.answers[i].as_deref(), Some(winner.as_str()));
    }
}

/// Generations that never finish, counting how many were started and how many dropped.
#[derive(Default)]
struct Stuck {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct CountDrop(Arc<AtomicUsize>);
impl Drop for CountDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Backend for Stuck {
    fn generate(&self, _call: GenerateCall) -> BoxFuture<'static, Result<Generated, String>> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let guard = CountDrop(self.dropped.clone());
        Box::pin(async move {
            let _guard = guard;
            futures::future::pending::<()>().await;
            unreachable!()
        })
    }

    fn score(&self, _call: ScoreCall) -> BoxFuture<'static, Result<Scored, String>> {
        Box::pin(futures::future::pending())
    }
}

#[tokio::test]
async fn dropping_an_evolution_cancels_every_call_in_flight() {
    let stuck = Stuck::default();
    let c = config(r#"{"n": 8, "k": 2, "t": 3, "tiers": ["big"]}"#);
    let mut progress = |_: &tandem_evolve::Round| {};
    let run = evolve(&c, &stuck, "Q", 1, &mut progress);
    let timed = tokio::time::timeout(std::time::Duration::from_millis(50), run).await;
    assert!(timed.is_err(), "the evolution cannot finish");
    assert_eq!(stuck.started.load(Ordering::SeqCst), 8);
    assert_eq!(stuck.dropped.load(Ordering::SeqCst), 8, "every started call was dropped (cancelled)");
}

#[test]
fn a_malformed_configuration_is_a_clear_error() {
    let err = |json: &str| EvolveConfig::from_json(json).unwrap_err();
    assert!(err(r#"{"n": 4, "k": 5, "tiers": ["a"]}"#).contains("`k` must be between 1 and 4"));
    assert!(err(r#"{"tiers": []}"#).contains("`tiers` lists one model"));
    assert!(err(r#"{"tiers": ["a", "b", "c"]}"#).contains("`tiers` lists one model"));
    assert!(err(r#"{"tiers": ["a"], "percentile": 150}"#).contains("`percentile` must be between 0 and 100"));
    assert!(err(r#"{"tiers": ["a"], "percentile": 80, "vote_percentile": 30}"#).contains("at most 100"));
    assert!(err(r#"{"tiers": ["a"], "populaton": 3}"#).contains("unknown field `populaton`"));
    assert!(err(r#"{"n": 4}"#).contains("missing field `tiers`"));
    assert!(err("not json").contains("invalid evolve configuration"));
    let c = config(r#"{"n": 4, "k": 4, "t": 2, "tiers": ["big", "small"], "max_tokens": 1000}"#);
    let ctx = |name: &str| match name {
        "big" => Some(32768),
        "small" => Some(2048),
        _ => None,
    };
    let e = c.check_models(ctx).unwrap_err();
    assert!(e.contains("`small` holds 2048") && e.contains("lower k or max_tokens"), "{e}");
    let c = config(r#"{"tiers": ["big", "nope"], "max_tokens": 100}"#);
    assert!(c.check_models(ctx).unwrap_err().contains("model `nope` is not served"));
    assert_eq!(c.scorer(), "nope");
}
