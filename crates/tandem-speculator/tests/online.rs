//! Online speculator training end to end on a tiny checkpoint: traces are recorded while serving,
//! the trainer lowers its loss and raises acceptance, swaps under concurrent load change no greedy
//! output, a broken drafter is rolled back, and a full or busy trace buffer never stalls serving.
#[path = "../../tandem-engine/tests/common/mod.rs"]
mod common;
use std::sync::Arc;
use tandem_engine::online::{DrafterExchange, OnlineConfig, OnlineHooks, Trace, TraceBuffer, Version};
use tandem_engine::{Engine, EngineConfig, EngineHandle, Event, Fcfs, GenerationRequest};
use tandem_models::{load, LoadOptions, Model};
use tandem_runtime::speculative::eagle::DRAFT_CONTEXT;
use tandem_runtime::speculative::{EagleConfig, EagleDrafter, EagleWeights, NgramDrafter, ServeAs, WarmStart};
use tandem_runtime::SamplingParams;
use tandem_speculator::{distill, Batch, OnlineTrainer, OnlineTrainerConfig, TracePool, TrainConfig, Trainer};

const TARGET: &str = "llama-gqa-untied-sharded";

fn model() -> Model {
    load(&common::tiny_dir().join(TARGET), &LoadOptions::default(), &mut |_, _| {}).unwrap().model
}

fn request(i: usize, max_tokens: usize) -> GenerationRequest {
    let prompt: Vec<u32> = (0..6 + i % 7).map(|j| ((i * 31 + j * 17) % 240) as u32 + 3).collect();
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop_token_ids: vec![],
        client: None,
        agent: None,
        weights: None,
        score: None,
    }
}

fn hooks(capacity: usize, online: OnlineConfig) -> OnlineHooks {
    OnlineHooks {
        traces: Arc::new(TraceBuffer::new(capacity)),
        exchange: Arc::new(DrafterExchange::default()),
        config: online,
    }
}

fn engine_with(drafter: EagleDrafter, hooks: &OnlineHooks, config: EngineConfig) -> (Engine, EngineHandle) {
    let (e, h) = Engine::new(model(), config, Box::new(Fcfs::default())).unwrap();
    let e = e.with_trainable_drafter(Box::new(drafter)).unwrap().with_online(hooks.clone()).unwrap();
    (e, h)
}

/// Serves `requests` to completion in this thread; returns each output and the acceptance length.
fn serve(engine: &mut Engine, handle: &EngineHandle, requests: &[GenerationRequest]) -> (Vec<Vec<u32>>, f64) {
    let mut rxs: Vec<_> = requests.iter().map(|r| handle.submit(r.clone()).unwrap()).collect();
    engine.run_until_idle();
    let (mut emitted, mut steps) = (0usize, 0usize);
    let outs = rxs
        .iter_mut()
        .map(|rx| {
            let mut out = Vec::new();
            loop {
                match rx.try_recv().unwrap() {
                    Event::Token(t) => out.push(t.id),
                    Event::Finished { usage, .. } => {
                        let s = usage.speculation.unwrap();
                        emitted += usage.completion_tokens;
                        steps += s.decode_steps;
                        return out;
                    }
                    Event::Failed(m) => panic!("{m}"),
                    Event::Scored(_) => {}
                }
            }
        })
        .collect();
    (outs, emitted as f64 / steps.max(1) as f64)
}

fn plain_outputs(requests: &[GenerationRequest]) -> Vec<Vec<u32>> {
    let (mut e, h) = Engine::new(model(), EngineConfig::default(), Box::new(Fcfs::default())).unwrap();
    let mut rxs: Vec<_> = requests.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
    e.run_until_idle();
    rxs.iter_mut()
        .map(|rx| {
            let mut out = Vec::new();
            while let Ok(Event::Token(t)) = rx.try_recv() {
                out.push(t.id);
            }
            out
        })
        .collect()
}

/// A fresh drafter served online on its own thread (`saturated`: as a server with no idle time),
/// and a trainer for it, not started.
fn online_engine(saturated: bool) -> (OnlineHooks, EngineHandle, std::thread::JoinHandle<()>, Trainer) {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 3).unwrap();
    let trainer =
        Trainer::new(drafter.config.clone(), drafter.weights(), target.embedding_table().unwrap(), train_config())
            .unwrap();
    let h = hooks(1 << 30, OnlineConfig::default());
    if saturated {
        h.exchange.idle.assume_saturated();
    }
    let (engine, handle) = engine_with(drafter, &h, EngineConfig { spec_k: 4, max_batch: 6, ..Default::default() });
    (h, handle, engine.spawn(), trainer)
}

/// `clients` clients submit `requests` at once, each waiting for its answer before its next
/// request; returns (request index, output) for each.
fn serve_in_parallel(handle: &EngineHandle, requests: &[GenerationRequest], clients: usize) -> Vec<(usize, Vec<u32>)> {
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut got = Vec::new();
                    for i in (c..requests.len()).step_by(clients) {
                        let mut rx = handle.submit(requests[i].clone()).unwrap();
                        let mut out = Vec::new();
                        loop {
                            match rx.blocking_recv().expect("the engine answers") {
                                Event::Token(t) => out.push(t.id),
                                Event::Finished { .. } => break,
                                Event::Failed(m) => panic!("{m}"),
                                Event::Scored(_) => {}
                            }
                        }
                        got.push((i, out));
                    }
                    got
                })
            })
            .collect();
        joins.into_iter().flat_map(|j| j.join().unwrap()).collect()
    })
}

fn fixed_k() -> OnlineConfig {
    OnlineConfig { k_by_throughput: false, rollback_window: 60, ..Default::default() }
}

fn train_config() -> TrainConfig {
    TrainConfig { lr: 3e-3, batch_positions: 192, window: 64, ttt_steps: 3, ..Default::default() }
}

/// A drafter trained offline on traces of 48 requests for `steps` steps, scoring `sampled_vocab`
/// draft ids per step (0: all); returns it with the loss on a fixed batch before and after.
fn trained(steps: usize, sampled_vocab: usize) -> (EagleWeights, f64, f64) {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 7).unwrap();
    let (config, weights) = (drafter.config.clone(), (**drafter.weights()).clone());
    let hooks = hooks(1 << 30, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &hooks, EngineConfig { spec_k: 4, ..Default::default() });
    let requests: Vec<_> = (0..48).map(|i| request(i, 40)).collect();
    serve(&mut engine, &handle, &requests);
    let traces = hooks.traces.drain();
    assert_eq!(traces.len(), 48, "one trace per request");
    for t in &traces {
        assert_eq!(t.features.len(), t.positions() * t.feature_size);
        assert!(t.positions() + 1 >= t.tokens.len() && t.positions() <= t.tokens.len());
        assert!(
            t.soft.iter().skip(t.prompt_len).any(|s| !s.is_empty()),
            "output positions carry the target's distribution"
        );
    }
    assert!(traces.iter().any(|t| !t.rejected.is_empty()), "a random drafter gets rejected");
    let mut pool = TracePool::new(1 << 20);
    traces.into_iter().for_each(|t| pool.add(t));
    let tc = TrainConfig { sampled_vocab, ..train_config() };
    let mut trainer = Trainer::new(config, &weights, target.embedding_table().unwrap(), tc).unwrap();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let vd = trainer.config.draft_vocab_size;
    let fixed = pool.sample(&mut rng, 256, 64, vd, &|id| trainer.draft_id(id)).unwrap();
    let before = trainer.evaluate(&fixed).unwrap();
    for _ in 0..steps {
        let b = pool.sample(&mut rng, 192, 64, vd, &|id| trainer.draft_id(id)).unwrap();
        let s = trainer.step(&b).unwrap();
        assert!(s.loss.is_finite());
    }
    let after = trainer.evaluate(&fixed).unwrap();
    eprintln!(
        "fixed batch: loss {:.3} -> {:.3}, ce0 {:.3} -> {:.3}, top1 {:.3} -> {:.3}",
        before.loss, after.loss, before.ce0, after.ce0, before.top1, after.top1
    );
    (trainer.weights().unwrap(), before.loss, after.loss)
}

/// One draft step serves every sequence at once: drafting for three sequences together (catch-up
/// rows and each further token batched, fed one committed position per step as serving does, the
/// oldest keys dropped past DRAFT_CONTEXT) proposes exactly what three drafters, each drafting for
/// one of them alone, propose.
#[test]
fn batched_drafts_equal_drafts_made_alone() {
    use tandem_runtime::speculative::{DraftRequest, Drafter};
    let target = model();
    let fresh = || EagleDrafter::fresh(&target, None, WarmStart::Full, 11).unwrap().with_serving(ServeAs::F32).unwrap();
    let h = hooks(1 << 30, fixed_k());
    let (mut engine, handle) = engine_with(fresh(), &h, EngineConfig::default());
    serve(&mut engine, &handle, &[request(5, 100), request(6, 90), request(7, 110)]);
    let traces = h.traces.drain();
    assert_eq!(traces.len(), 3);
    let n = traces.iter().map(|t| t.positions().min(t.tokens.len() - 1)).min().unwrap();
    assert!(n > DRAFT_CONTEXT + 8, "traces of {n} positions should be longer than the drafter's context");
    let rows = |trace: &tandem_engine::online::Trace, t: usize| {
        let fs = trace.feature_size;
        let x =
            candle_core::Tensor::from_slice(&trace.features[t * fs..(t + 1) * fs], (1, fs), target.device()).unwrap();
        (0..3).map(|l| x.narrow(1, l * fs / 3, fs / 3).unwrap()).collect::<Vec<_>>()
    };
    let mut together = fresh();
    together.prepare(3, 512).unwrap();
    let mut alone: Vec<EagleDrafter> = (0..3).map(|_| fresh()).collect();
    for d in &mut alone {
        d.prepare(1, 512).unwrap();
    }
    let sampling = SamplingParams::default();
    for t in 0..n {
        let mut asks = Vec::new();
        for (slot, trace) in traces.iter().enumerate() {
            together.observe(slot, t, &rows(trace, t)).unwrap();
            alone[slot].observe(0, t, &rows(trace, t)).unwrap();
            // Different lengths per sequence, and one that skips a step now and then.
            let k = [1, 3, 4][slot] * usize::from(slot != 2 || t % 5 != 0);
            asks.push(DraftRequest {
                slot,
                tokens: &trace.tokens[..t + 2],
                k,
                copy_k: 0,
                alternatives: 0,
                sampling: &sampling,
            });
        }
        let batched = together.propose(&target, &asks).unwrap();
        for (slot, ask) in asks.iter().enumerate() {
            let solo = alone[slot].propose(&target, &[DraftRequest { slot: 0, ..ask.clone() }]).unwrap();
            assert_eq!(batched[slot].tokens, solo[0].tokens, "position {t}, sequence {slot}");
            assert_eq!(batched[slot].tokens.len(), ask.k);
        }
    }
}

/// The trainer's forward is the drafter's: its first-step prediction at every position of a
/// recorded sequence is the token the serving drafter proposes there.
#[test]
fn trainer_and_drafter_agree() {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Full, 11).unwrap();
    let (config, weights) = (drafter.config.clone(), (**drafter.weights()).clone());
    let h = hooks(1 << 30, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig::default());
    serve(&mut engine, &handle, &[request(5, 100)]);
    let trace = h.traces.drain().pop().unwrap();
    let trainer = Trainer::new(config.clone(), &weights, target.embedding_table().unwrap(), train_config()).unwrap();
    let n = trace.positions().min(trace.tokens.len() - 1);
    assert!(n > DRAFT_CONTEXT + 8, "the trace ({n} positions) should be longer than the drafter's context");
    // The drafter attends to its last DRAFT_CONTEXT positions: the trainer's window for t is the same.
    let predicted: Vec<u32> = (0..n)
        .map(|t| {
            let start = (t + 1).saturating_sub(DRAFT_CONTEXT);
            let vd = config.draft_vocab_size;
            let batch = tandem_speculator::Batch::window(&trace, start, t + 1 - start, vd, &|id| trainer.draft_id(id));
            *trainer.predict(&batch).unwrap().last().unwrap()
        })
        .collect();
    use tandem_runtime::speculative::Drafter;
    let rows = |a: usize, b: usize| feature_rows(&trace, a, b, &target);
    // Served in f32 the drafter proposes the trainer's tokens but where the two are nearly tied
    // (the layer is one implementation, but drafting attends through the serving kernel over its
    // cache and training through candle's products: float sums in different orders, at most 1% of
    // positions); in bf16 (the serving default) or Q8_0 nearly always.
    // Fresh for every position (catching up on the last DRAFT_CONTEXT), or fed one position at a
    // time as serving does (its oldest keys dropped past DRAFT_CONTEXT): the same tokens.
    let cases = [
        (ServeAs::F32, true, n / 100),
        (ServeAs::F32, false, n / 100),
        (ServeAs::Bf16, true, n / 10),
        (ServeAs::Q8_0, false, n / 10),
    ];
    for (dtype, fresh, allowed) in cases {
        let drafter = EagleDrafter::new(config.clone(), weights.clone(), target.device()).unwrap();
        let mut drafter = drafter.with_serving(dtype).unwrap();
        drafter.prepare(1, 256).unwrap();
        let mut mismatches = 0;
        for (t, &want) in predicted.iter().enumerate().take(n) {
            if fresh {
                drafter.release(0);
                drafter.observe(0, 0, &rows(0, t + 1)).unwrap();
            } else {
                drafter.observe(0, t, &rows(t, t + 1)).unwrap();
            }
            mismatches += (draft_after(&mut drafter, &target, &trace.tokens[..t + 2], 1)[0] != want) as usize;
        }
        assert!(mismatches <= allowed, "{dtype:?} (fresh {fresh}): {mismatches} of {n} positions differ");
    }
}

/// The target, a fresh drafter (its configuration and weights) and the trace of one request
/// served with it.
fn one_trace() -> (Model, EagleConfig, EagleWeights, Trace) {
    one_trace_with(fixed_k())
}

fn one_trace_with(online: OnlineConfig) -> (Model, EagleConfig, EagleWeights, Trace) {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 5).unwrap();
    let weights = (**drafter.weights()).clone();
    let h = hooks(1 << 30, online);
    let config = drafter.config.clone();
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig { spec_k: 3, ..Default::default() });
    serve(&mut engine, &handle, &[request(4, 30)]);
    let trace = h.traces.drain().pop().unwrap();
    (target, config, weights, trace)
}

#[test]
fn prompt_positions_are_labelled_with_the_targets_own_distribution() {
    labels_derive_from_the_last_hidden_state(false);
}

/// With `labels_from_hidden` the engine keeps no distributions at all: every position's label is
/// derived by the trainer from the recorded last residual stream, and equals the target's own.
#[test]
fn every_position_can_be_labelled_from_the_recorded_hidden_state() {
    labels_derive_from_the_last_hidden_state(true);
}

fn labels_derive_from_the_last_hidden_state(from_hidden: bool) {
    let (target, config, weights, trace) =
        one_trace_with(OnlineConfig { labels_from_hidden: from_hidden, ..fixed_k() });
    let hs = config.hidden_size;
    assert_eq!(trace.final_size(), hs, "the last residual stream is recorded at every position");
    assert_eq!(
        trace.soft.iter().all(|s| s.is_empty()),
        from_hidden,
        "top entries kept only without labels_from_hidden"
    );
    let (rows, norm) = target.unembedding_rows(&weights.d2t).unwrap();
    let trainer = Trainer::new(config.clone(), &weights, target.embedding_table().unwrap(), train_config())
        .unwrap()
        .with_target_head(rows, norm)
        .unwrap();
    let n = trace.positions().min(trace.tokens.len() - 1);
    let batch = Batch::window(&trace, 0, n, config.draft_vocab_size, &|id| trainer.draft_id(id));
    // Every position without a recorded distribution (the prompt's, or all) gets one derived.
    let unrecorded: Vec<usize> = (0..n).filter(|&t| !batch.soft_label[t] && t + 1 < trace.positions()).collect();
    let expected = if from_hidden { n.min(trace.positions() - 1) } else { trace.prompt_len - 2 };
    assert!(unrecorded.len() >= expected, "{} of {n}: {unrecorded:?}", unrecorded.len());
    assert_eq!(batch.derived, unrecorded);
    let labelled = trainer.target_labels(&batch).unwrap();
    // Reference: the target's own forward over the whole sequence, without a cache.
    let logits = target.forward_sequence(&trace.tokens[..n + 1]).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec2::<f32>().unwrap();
    let vd = config.draft_vocab_size;
    for &t in &unrecorded {
        let want = &probs[t + 1];
        let got = &labelled.labels[t * vd..(t + 1) * vd];
        let diff = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "position {t}: largest difference {diff}");
        let best = want.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(labelled.top_label[t], best as i64);
    }
}

#[test]
fn trainer_lowers_loss_and_raises_acceptance() {
    let (weights, before, after) = trained(150, 0);
    assert!(after < before * 0.7, "loss {before} -> {after}");
    // Served with the trained weights, drafts are accepted more often than with the random ones.
    let target = model();
    let fresh = EagleDrafter::fresh(&target, None, WarmStart::Head, 7).unwrap();
    let config = fresh.config.clone();
    let h = hooks(1 << 30, fixed_k());
    let (mut e, handle) = engine_with(fresh, &h, EngineConfig { spec_k: 4, ..Default::default() });
    let eval: Vec<_> = (0..24).map(|i| request(i, 40)).collect();
    let (plain, cold) = serve(&mut e, &handle, &eval);
    let good = EagleDrafter::new(config, weights, target.device()).unwrap();
    let (mut e, handle) = engine_with(good, &h, EngineConfig { spec_k: 4, ..Default::default() });
    let (outs, warm) = serve(&mut e, &handle, &eval);
    assert_eq!(outs, plain);
    assert!(warm > cold + 0.15, "acceptance length {cold:.2} -> {warm:.2}");
}

/// Training over a sampled vocabulary (a third of the ids scored per step) lowers the loss over
/// the whole vocabulary as well.
#[test]
fn a_trainer_scoring_a_sampled_vocabulary_learns_the_whole_one() {
    let (_, before, after) = trained(150, tandem_testkit::tiny::VOCAB / 3);
    assert!(after < before * 0.7, "loss {before} -> {after}");
}

#[test]
fn swaps_under_concurrent_load_change_no_output() {
    let requests: Vec<_> = (0..40).map(|i| request(i, 30 + i % 20)).collect();
    let expected = plain_outputs(&requests);
    let (h, handle, thread, trainer) = online_engine(false);
    let trainer = OnlineTrainer::spawn(
        trainer,
        h.traces.clone(),
        h.exchange.clone(),
        OnlineTrainerConfig {
            publish_every: 1,
            min_positions: 32,
            cpu_share: 1.0,
            min_share: 1.0,
            ..Default::default()
        },
    );
    // Four clients submit concurrently, wave after wave, while the trainer publishes a version per
    // step. The engine takes a version only while it steps, so a version number read between waves
    // was swapped in under load; go on until two were, and one more wave ran after (bounded in
    // time: the trainer lives on idle cores, and other tests running beside this one take them).
    let version = || h.exchange.weights.serving_version.load(std::sync::atomic::Ordering::Relaxed);
    let mut waves = 0;
    let mut swapped_at = None;
    let started = std::time::Instant::now();
    loop {
        let outs = serve_in_parallel(&handle, &requests, 4);
        assert_eq!(outs.len(), requests.len(), "no request lost");
        for (i, out) in outs {
            assert_eq!(out, expected[i], "request {i} changed under hot swaps (wave {waves})");
        }
        waves += 1;
        if swapped_at.is_none() && version() >= 2 {
            swapped_at = Some(waves);
        }
        if swapped_at.is_some_and(|w| waves > w) || started.elapsed().as_secs() >= 120 {
            break;
        }
    }
    let status = trainer.status();
    trainer.shutdown();
    handle.shutdown();
    thread.join().unwrap();
    assert!(swapped_at.is_some(), "no version swapped in during {waves} waves (trainer steps {})", status.steps);
    assert!(h.exchange.weights.history().len() >= 2);
}

#[test]
fn a_broken_drafter_is_rolled_back() {
    broken_drafter_rolled_back(1 << 30);
}

/// A worker whose drafter versions come from elsewhere (a fleet trainer) keeps no traces: it makes
/// none (they cost the engine thread every step), and still judges each version it serves.
#[test]
fn without_a_trace_buffer_no_traces_are_made_and_versions_are_still_judged() {
    let h = broken_drafter_rolled_back(0);
    assert_eq!(h.traces.pushed(), 0);
    // With a buffer, every finished request leaves one.
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 7).unwrap();
    let h = hooks(1 << 30, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig { spec_k: 4, ..Default::default() });
    let requests: Vec<_> = (0..5).map(|i| request(i, 20)).collect();
    serve(&mut engine, &handle, &requests);
    assert_eq!(h.traces.pushed(), 5);
}

/// A good drafter serves, a broken version is published, the engine rolls it back; returns the
/// hooks (traces kept in a buffer of `capacity` bytes).
fn broken_drafter_rolled_back(capacity: usize) -> OnlineHooks {
    let (good, _, _) = trained(60, 0);
    let target = model();
    let config = EagleDrafter::fresh(&target, None, WarmStart::Head, 7).unwrap().config;
    let drafter = EagleDrafter::new(config, good.clone(), target.device()).unwrap();
    let h = hooks(capacity, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig { spec_k: 4, ..Default::default() });
    let warmup: Vec<_> = (200..230).map(|i| request(i, 40)).collect();
    let (_, good_len) = serve(&mut engine, &handle, &warmup);
    // A broken version: its head puts all mass on one token.
    let mut broken = good.clone();
    broken.tensors.lm_head = broken.tensors.lm_head.zeros_like().unwrap();
    h.exchange.weights.publish(Version { number: 1, weights: Arc::new(broken) });
    let more: Vec<_> = (300..340).map(|i| request(i, 40)).collect();
    let expected = plain_outputs(&more);
    let (outs, _) = serve(&mut engine, &handle, &more);
    assert_eq!(outs, expected);
    let ex = &h.exchange;
    assert_eq!(ex.weights.rollbacks.load(std::sync::atomic::Ordering::Relaxed), 1, "{:?}", ex.weights.history());
    assert_eq!(ex.weights.serving_version.load(std::sync::atomic::Ordering::Relaxed), 0);
    let rec = &ex.weights.history()[0];
    assert!(rec.rolled_back && rec.accept_after.unwrap() < rec.accept_before.unwrap(), "{rec:?}");
    assert_eq!(ex.weights.take_rejected(), vec![1]);
    // After the rollback the good drafter serves again.
    let (_, back_len) = serve(&mut engine, &handle, &warmup);
    assert!((back_len - good_len).abs() < 0.3, "{good_len} vs {back_len}");
    h
}

#[test]
fn a_full_or_busy_trace_buffer_never_stalls_serving() {
    let requests: Vec<_> = (0..12).map(|i| request(i, 20)).collect();
    let expected = plain_outputs(&requests);
    // Room for about one trace: the rest are dropped, oldest first.
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 1).unwrap();
    let h = hooks(20_000, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig::default());
    let (outs, _) = serve(&mut engine, &handle, &requests);
    assert_eq!(outs, expected);
    assert_eq!(h.traces.pushed(), 12);
    assert!(h.traces.dropped() >= 10, "dropped {}", h.traces.dropped());
    // A consumer holding the buffer: serving goes on (in this very thread) and drops the traces.
    let guard = h.traces.lock_for_test();
    let (outs, _) = serve(&mut engine, &handle, &requests);
    drop(guard);
    assert_eq!(outs, expected);
    assert_eq!(h.traces.pushed(), 12, "nothing pushed while the buffer was busy");
}

/// With prompt lookup in front of the learned drafter, copied drafts are verified like any other
/// (outputs unchanged) but never recorded as the learned drafter's rejected proposals.
#[test]
fn copied_drafts_are_not_held_against_the_learned_drafter() {
    // Prompts that repeat themselves, so lookup has matches to copy.
    let requests: Vec<_> = (0..10)
        .map(|i| {
            let mut r = request(i, 40);
            let head: Vec<u32> = r.prompt.iter().take(4).copied().collect();
            r.prompt.extend_from_slice(&head);
            r.prompt.extend_from_slice(&head);
            r
        })
        .collect();
    let expected = plain_outputs(&requests);
    let target = model();
    let lookup = NgramDrafter { max_ngram: 4, min_ngram: 2 };
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 2).unwrap().with_lookup(Some(lookup.clone()));
    let h = hooks(1 << 30, fixed_k());
    let (mut engine, handle) = engine_with(drafter, &h, EngineConfig { spec_k: 3, ..Default::default() });
    let (outs, _) = serve(&mut engine, &handle, &requests);
    assert_eq!(outs, expected);
    let traces = h.traces.drain();
    assert_eq!(traces.len(), requests.len());
    let (mut copied_steps, mut rejections) = (0, 0);
    for t in &traces {
        // Decode steps whose draft lookup would have copied (the sequence then ended in a repeat).
        copied_steps +=
            (t.prompt_len..t.tokens.len()).filter(|&n| !lookup.lookup(&t.tokens[..n], 3).is_empty()).count();
        for r in &t.rejected {
            rejections += 1;
            // The draft was asked for with the sequence up to the pending token, pos - depth.
            let history = &t.tokens[..r.pos - r.depth + 1];
            assert!(lookup.lookup(history, 3).is_empty(), "a copied draft was recorded as rejected: {r:?}");
        }
    }
    assert!(copied_steps > 20, "lookup had too little to copy ({copied_steps} steps)");
    assert!(rejections > 0, "the learned drafter's own rejections are still recorded");
}

/// The draft-length controller times decode steps only: a step that finishes a prompt (and emits
/// its first token) costs what the prompt costs and would charge it to whichever k was chosen; a
/// step whose draft the output limit cut short is not a step at the chosen k either.
#[test]
fn the_k_controller_times_decode_steps_only() {
    // Prompts of 16 tokens fed in chunks of 5: the last chunk's step emits the first token.
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let mut r = request(i, 12);
            r.prompt = (0..16).map(|j| ((i * 13 + j * 7) % 200) as u32 + 3).collect();
            r
        })
        .collect();
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 3).unwrap();
    let h = hooks(1 << 30, OnlineConfig::default());
    let config = EngineConfig { spec_k: 3, step_token_budget: 5, max_batch: 1, ..Default::default() };
    let (mut engine, handle) = engine_with(drafter, &h, config);
    let mut decode_steps = 0;
    for r in &requests {
        let mut rx = handle.submit(r.clone()).unwrap();
        engine.run_until_idle();
        loop {
            match rx.try_recv().unwrap() {
                Event::Token(_) => {}
                Event::Finished { usage, .. } => {
                    decode_steps += usage.speculation.unwrap().decode_steps;
                    break;
                }
                Event::Failed(m) => panic!("{m}"),
                Event::Scored(_) => {}
            }
        }
    }
    let table = h.exchange.metrics.k_table.lock().unwrap().clone();
    let timed: u64 = table.iter().map(|s| s.steps).sum();
    // Only the last few steps of each request can be cut short (at most spec_k of them).
    let decode_steps = decode_steps as u64;
    assert!(
        timed <= decode_steps && timed + 3 * requests.len() as u64 >= decode_steps,
        "{timed} of {decode_steps}: {table:?}"
    );
    assert!(table.iter().all(|s| s.tokens_per_step >= 0.99 && s.step_secs > 0.0), "{table:?}");
}

/// Text read by the target becomes traces whose every position carries the target's features and
/// last residual stream; the labels derived from them are the target's own distribution, and
/// reading chunks together or one by one gives the same numbers.
#[test]
fn text_traces_carry_the_targets_distribution_at_every_position() {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 5).unwrap();
    let config = drafter.config.clone();
    let chunks: Vec<Vec<u32>> = (0..5).map(|i| request(i, 1).prompt.repeat(3)).collect();
    let mut calls = 0;
    let traces = distill::text_traces(&target, &config.target_layers, &chunks, 3, |_| calls += 1).unwrap();
    assert_eq!(calls, 2, "two forwards of up to three chunks");
    let one_by_one = distill::text_traces(&target, &config.target_layers, &chunks, 1, |_| {}).unwrap();
    assert_eq!(traces, one_by_one, "batching changed the recorded numbers");
    let weights = (**drafter.weights()).clone();
    let (rows, norm) = target.unembedding_rows(&weights.d2t).unwrap();
    let trainer = Trainer::new(config.clone(), &weights, target.embedding_table().unwrap(), train_config())
        .unwrap()
        .with_target_head(rows, norm)
        .unwrap();
    let vd = config.draft_vocab_size;
    for (trace, chunk) in traces.iter().zip(&chunks) {
        assert_eq!(&trace.tokens, chunk);
        assert_eq!(trace.positions(), chunk.len());
        assert_eq!(trace.feature_size, config.target_layers.len() * config.hidden_size);
        let n = chunk.len() - 1;
        let batch = Batch::window(trace, 0, n, vd, &|id| trainer.draft_id(id));
        let labelled = trainer.target_labels(&batch).unwrap();
        let logits = target.forward_sequence(chunk).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap().to_vec2::<f32>().unwrap();
        // Row t predicts token t + 2 from the target's distribution at t + 1.
        for t in 0..n - 1 {
            assert!(labelled.soft_label[t], "position {t} has no derived label");
            let got = &labelled.labels[t * vd..(t + 1) * vd];
            let diff = probs[t + 1].iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "position {t}: largest difference {diff}");
        }
    }
}

/// In a batch where prompt lookup copies for some sequence at almost every step, the draft-length
/// controller still gets its measurements: a step counts unless every sequence in it copied.
/// (When any copy excluded the whole step, a batch of RL rollouts left it at k = 0 for good,
/// its first sweep never finished.)
#[test]
fn the_k_controller_measures_batches_with_copies() {
    // Sequences that repeat a short unit: lookup has matches nearly everywhere.
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let mut r = request(i, 60);
            let unit: Vec<u32> = r.prompt.iter().take(3).copied().collect();
            r.prompt = unit.iter().cycle().take(24).copied().collect();
            r
        })
        .collect();
    let target = model();
    let lookup = NgramDrafter { max_ngram: 4, min_ngram: 2 };
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 3).unwrap().with_lookup(Some(lookup));
    let h = hooks(1 << 30, OnlineConfig::default());
    let config = EngineConfig { spec_k: 3, max_batch: 8, ..Default::default() };
    let (mut engine, handle) = engine_with(drafter, &h, config);
    let (_, _) = serve(&mut engine, &handle, &requests);
    let table = h.exchange.metrics.k_table.lock().unwrap().clone();
    let timed: u64 = table.iter().map(|s| s.steps).sum();
    assert!(timed >= 16, "the controller measured {timed} steps: {table:?}");
}

/// A step taken in parts (the online trainer's idle steps, which pause between parts while
/// serving runs) is the step on their union: two halves of weight one half each equal the whole.
#[test]
fn a_step_in_parts_is_the_step_on_their_union() {
    let (target, config, weights, trace) = one_trace();
    let new_trainer =
        || Trainer::new(config.clone(), &weights, target.embedding_table().unwrap(), train_config()).unwrap();
    let (mut whole, mut halves) = (new_trainer(), new_trainer());
    let n = trace.positions().min(trace.tokens.len() - 1);
    let batch = Batch::window(&trace, 0, n, config.draft_vocab_size, &|id| whole.draft_id(id));
    let a = whole.step_unrolled(&batch, 3).unwrap();
    let mut pauses = 0;
    let b = halves.step_in_parts(&[batch.clone(), batch.clone()], 3, &mut || pauses += 1).unwrap();
    assert_eq!(pauses, 1, "a pause between the two parts, none after the last");
    assert!((a.loss - b.loss).abs() < 1e-5 * a.loss.abs().max(1.0), "{} against {}", a.loss, b.loss);
    assert!((a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm, "{} against {}", a.grad_norm, b.grad_norm);
    let (wa, wb) = (whole.weights().unwrap(), halves.weights().unwrap());
    let mut largest = 0f32;
    for (x, y) in tensors(&wa).into_iter().zip(tensors(&wb)) {
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        largest = largest.max(d);
    }
    assert!(largest < 1e-5, "the weights after the two steps differ by up to {largest}");
}

fn tensors(w: &EagleWeights) -> Vec<candle_core::Tensor> {
    let mut out = Vec::new();
    w.tensors.map(|_, t| out.push(t.clone()));
    out
}

/// A client's training work is work: while a training turn runs, the engine is not idle to the
/// drafter trainer (which takes every core in idle time), and its time counts as busy.
#[test]
fn a_running_training_turn_is_not_idle_time() {
    let target = model();
    let drafter = EagleDrafter::fresh(&target, None, WarmStart::Head, 5).unwrap();
    let h = hooks(1 << 20, fixed_k());
    let (engine, handle) = engine_with(drafter, &h, EngineConfig::default());
    let thread = engine.spawn();
    let grace = std::time::Duration::from_secs_f64(tandem_engine::online::IDLE_GRACE * 3.0);
    std::thread::sleep(grace);
    assert!(h.exchange.idle.is_idle(), "nothing served, nothing trained");
    let turn = handle.training_turn("trainer", None);
    std::thread::sleep(grace);
    assert!(!h.exchange.idle.is_idle(), "a training turn runs");
    let busy = h.exchange.idle.busy_secs();
    assert!(busy >= grace.as_secs_f64() * 0.9, "busy {busy} s");
    drop(turn);
    std::thread::sleep(grace);
    assert!(h.exchange.idle.is_idle(), "the turn ended");
    handle.shutdown();
    thread.join().unwrap();
}

/// On a saturated server (no idle time) the trainer learns only in turns the engine lends it
/// between steps: it makes steps, publishes versions, the engine takes them, and every output
/// stays the plain engine's.
#[test]
fn a_saturated_server_lends_the_trainer_turns() {
    let requests: Vec<_> = (0..24).map(|i| request(i, 30 + i % 10)).collect();
    let expected = plain_outputs(&requests);
    let (h, handle, thread, trainer) = online_engine(true);
    let config = OnlineTrainerConfig {
        publish_every: 1,
        min_positions: 32,
        cpu_share: 0.5,
        min_share: 0.5,
        ..Default::default()
    };
    let trainer = OnlineTrainer::spawn(trainer, h.traces.clone(), h.exchange.clone(), config);
    let version = || h.exchange.weights.serving_version.load(std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    let mut waves = 0;
    while version() < 1 && started.elapsed().as_secs() < 120 {
        for (i, out) in serve_in_parallel(&handle, &requests, 3) {
            assert_eq!(out, expected[i], "request {i} changed while the trainer took turns (wave {waves})");
        }
        waves += 1;
    }
    let status = trainer.status();
    trainer.shutdown();
    handle.shutdown();
    thread.join().unwrap();
    let lent = h.exchange.turns.lent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(status.steps >= 1 && lent >= 1, "steps {} in {lent} turns over {waves} waves", status.steps);
    assert!(version() >= 1, "no version served after {waves} waves ({} steps)", status.steps);
}

/// A version the trainer prepares in the engine's served form (on its own thread) drafts exactly
/// as the same weights converted by the engine, and a frozen head is the same tensor in every
/// version, so its served form is made once.
#[test]
fn a_version_prepared_by_the_trainer_drafts_as_one_the_engine_converts() {
    let (target, config, weights, trace) = one_trace();
    let tc = TrainConfig { freeze_head: true, ..train_config() };
    let mut trainer = Trainer::new(config.clone(), &weights, target.embedding_table().unwrap(), tc).unwrap();
    let mut pool = TracePool::new(1 << 20);
    pool.add(trace.clone());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let vd = config.draft_vocab_size;
    let v1 = trainer.weights().unwrap();
    let b = pool.sample(&mut rng, 64, 32, vd, &|id| trainer.draft_id(id)).unwrap();
    trainer.step(&b).unwrap();
    let v2 = trainer.weights().unwrap();
    assert_eq!(v1.tensors.lm_head.id(), v2.tensors.lm_head.id(), "the frozen head is shared");
    assert_ne!(v1.tensors.fc.id(), v2.tensors.fc.id(), "trained tensors are copied");
    v1.prepare(ServeAs::Q8_0, None).unwrap();
    v2.prepare(ServeAs::Q8_0, Some(&v1)).unwrap();
    let unprepared = EagleWeights { served: Default::default(), ..v2.clone() };
    use tandem_runtime::speculative::{Drafter, TrainableDrafter};
    let drafts = |w: EagleWeights| -> Vec<Vec<u32>> {
        let d = EagleDrafter::new(config.clone(), weights.clone(), target.device()).unwrap();
        let mut d = d.with_serving(ServeAs::Q8_0).unwrap();
        d.update(Arc::new(w)).unwrap();
        d.prepare(1, 256).unwrap();
        let n = trace.positions().min(trace.tokens.len() - 2).min(40);
        (0..n)
            .map(|t| {
                d.observe(0, t, &feature_rows(&trace, t, t + 1, &target)).unwrap();
                draft_after(&mut d, &target, &trace.tokens[..t + 2], 3)
            })
            .collect()
    };
    assert_eq!(drafts(v2), drafts(unprepared));
}

/// The target features `trace` recorded at positions `a..b`, one tensor per target layer, as a
/// drafter observes them.
fn feature_rows(trace: &Trace, a: usize, b: usize, target: &Model) -> Vec<candle_core::Tensor> {
    let fs = trace.feature_size;
    let t = candle_core::Tensor::from_slice(&trace.features[a * fs..b * fs], (b - a, fs), target.device()).unwrap();
    (0..3).map(|l| t.narrow(1, l * fs / 3, fs / 3).unwrap()).collect()
}

/// The `k` tokens `drafter` proposes (slot 0, greedy) after `tokens`.
fn draft_after(drafter: &mut EagleDrafter, target: &Model, tokens: &[u32], k: usize) -> Vec<u32> {
    use tandem_runtime::speculative::{DraftRequest, Drafter};
    let sampling = SamplingParams::default();
    let ask = DraftRequest { slot: 0, tokens, k, copy_k: 0, alternatives: 0, sampling: &sampling };
    drafter.propose(target, &[ask]).unwrap().swap_remove(0).tokens
}
