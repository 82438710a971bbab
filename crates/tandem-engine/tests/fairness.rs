//! The fair policy inside the real engine: preemption (recompute later) changes no output, the
//! client that trails in service is served first, and accounting matches what was generated.
mod common;
use std::path::PathBuf;
use tandem_engine::{
    Engine, EngineConfig, Event, FairConfig, Fcfs, GenerationRequest, SchedulingPolicy, VirtualTokenCounter,
};
use tandem_models::{load, LoadOptions};
use tandem_runtime::speculative::NgramDrafter;
use tandem_runtime::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;

fn tiny() -> PathBuf {
    common::tiny_dir().join("qwen2-tied-bias")
}

fn request(i: usize, client: &str) -> GenerationRequest {
    let prompt: Vec<u32> = (0..5 + (i * 13) % 60).map(|j| ((i * 29 + j * 7) % 250) as u32 + 1).collect();
    let sampling = if i.is_multiple_of(3) {
        SamplingParams { temperature: 0.9, seed: Some(i as u64), ..Default::default() }
    } else {
        SamplingParams::default()
    };
    GenerationRequest {
        prompt,
        max_tokens: 20 + (i * 17) % 60,
        sampling,
        stop_token_ids: vec![],
        client: Some(client.into()),
        agent: None,
        weights: None,
        score: None,
    }
}

fn collect(rx: &mut UnboundedReceiver<Event>) -> Vec<u32> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv().expect("finished") {
            Event::Token(t) => out.push(t.id),
            Event::Finished { usage, .. } => {
                assert_eq!(usage.completion_tokens, out.len());
                return out;
            }
            Event::Failed(m) => panic!("{m}"),
            Event::Scored(_) => {}
        }
    }
}

fn run(
    policy: Box<dyn SchedulingPolicy>,
    spec: bool,
    swap_bytes: Option<usize>,
    requests: &[GenerationRequest],
) -> (Vec<Vec<u32>>, usize) {
    let model = load(&tiny(), &LoadOptions::default(), &mut |_, _| {}).unwrap().model;
    let config = EngineConfig { max_batch: 3, step_token_budget: 16, swap_bytes, ..Default::default() };
    let (mut e, h) = Engine::new(model, config, policy).unwrap();
    if spec {
        e = e.with_drafter(Box::new(NgramDrafter::default())).unwrap();
    }
    let mut rxs: Vec<_> = requests.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
    e.run_until_idle();
    (rxs.iter_mut().map(collect).collect(), h.preemptions())
}

/// A small margin makes the fair policy preempt constantly; every output (greedy and seeded
/// sampling, with and without speculation, KV swapped out and restored or recomputed) is still
/// exactly what FCFS without preemption gives.
#[test]
fn preemption_and_recomputation_change_no_output() {
    // "heavy" floods first; "light" arrives behind it, so fairness must preempt heavy's requests.
    let mut requests: Vec<GenerationRequest> = (0..9).map(|i| request(i, "heavy")).collect();
    requests.extend((9..13).map(|i| request(i, "light")));
    let eager = || {
        Box::new(VirtualTokenCounter::new(FairConfig { preempt_margin: Some(8.0), ..Default::default() }))
            as Box<dyn SchedulingPolicy>
    };
    for spec in [false, true] {
        let (want, none) = run(Box::new(Fcfs::default()), spec, None, &requests);
        assert_eq!(none, 0);
        // Swapped out and restored (the default), or recomputed (no swap memory).
        for swap in [None, Some(0)] {
            let (got, preemptions) = run(eager(), spec, swap, &requests);
            assert!(preemptions >= 3, "only {preemptions} preemptions");
            assert_eq!(got, want, "speculation {spec}, swap {swap:?}");
        }
    }
}

/// A client arriving behind another's backlog takes the next free slot (FCFS would put it behind
/// all six waiting requests), and the accounting charges each prompt once and each output token.
#[test]
fn the_trailing_client_is_served_first() {
    let model = load(&tiny(), &LoadOptions::default(), &mut |_, _| {}).unwrap().model;
    let config = EngineConfig { max_batch: 2, step_token_budget: 16, ..Default::default() };
    let policy = Box::new(VirtualTokenCounter::new(FairConfig::default()));
    let (mut e, h) = Engine::new(model, config, policy).unwrap();
    let mut heavy: Vec<_> = (0..8).map(|i| h.submit(request(i, "heavy")).unwrap()).collect();
    e.step();
    e.step();
    let mut light = h.submit(request(20, "light")).unwrap();
    let mut heavy_started = [false; 8];
    loop {
        e.step();
        for (i, rx) in heavy.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                heavy_started[i] |= matches!(ev, Event::Token(_));
            }
        }
        if matches!(light.try_recv(), Ok(Event::Token(_))) {
            break;
        }
    }
    // Light took the first slot that freed: only the two heavy requests already running started.
    assert_eq!(heavy_started.iter().filter(|&&s| s).count(), 2, "{heavy_started:?}");
    e.run_until_idle();
    let service = h.service();
    let heavy_s = service.iter().find(|s| s.entity == "heavy").unwrap();
    let expected_prompt: usize = (0..8).map(|i| request(i, "heavy").prompt.len()).sum();
    let expected_output: usize = (0..8).map(|i| request(i, "heavy").max_tokens).sum();
    assert_eq!(heavy_s.input_tokens as usize, expected_prompt, "prompt tokens are charged once");
    assert_eq!(heavy_s.output_tokens as usize, expected_output);
}

/// Training work (a Tinker client's forward_backward, here 0.2 ms of stand-in work per turn)
/// takes turns inside the fair policy beside a serving client's backlog: it runs only while its
/// client trails in service, so while both have work it stays within a few turns' charge of the
/// serving client, and it is not starved either. Under FCFS (charged,
/// never held back) the same trainer runs far ahead. A turn granted while another client is served
/// says so (the trainer keeps such passes short), as it does a moment after; later it does not.
#[test]
fn training_turns_share_the_machine_with_serving() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let turn_tokens = 64;
    let fair = FairConfig::default();
    let one_turn = fair.train_weight * turn_tokens as f64;
    let policies: Vec<Box<dyn SchedulingPolicy>> =
        vec![Box::new(VirtualTokenCounter::new(fair.clone())), Box::new(Fcfs::default())];
    for policy in policies {
        let name = policy.name();
        let model = load(&tiny(), &LoadOptions::default(), &mut |_, _| {}).unwrap().model;
        let config = EngineConfig { max_batch: 2, step_token_budget: 16, ..Default::default() };
        let (e, h) = Engine::new(model, config, policy).unwrap();
        let engine = e.spawn();
        let mut rxs: Vec<_> = (0..100).map(|i| h.submit(request(i, "serve")).unwrap()).collect();
        let serving = Arc::new(AtomicBool::new(true));
        let trainer = {
            let (h, serving) = (h.clone(), serving.clone());
            std::thread::spawn(move || {
                let (mut waited, mut shared) = (std::time::Duration::ZERO, 0);
                while serving.load(Ordering::SeqCst) {
                    let turn = h.training_turn("train", None);
                    waited += turn.waited;
                    shared += turn.shared as usize;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    turn.charge(turn_tokens, true);
                }
                (waited, shared)
            })
        };
        // Service while both still have work (the serving client's last requests queued): once its
        // queue drains, the trainer's turns run freely beside the last ones in flight, longer the
        // slower this machine is at that moment, and those are not the policy's.
        let mut at_check = None;
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Some(ev) = rx.blocking_recv() {
                if !matches!(ev, Event::Token(_)) {
                    break;
                }
            }
            if i == 90 {
                at_check = Some(h.service());
            }
        }
        let at_check = at_check.unwrap();
        serving.store(false, Ordering::SeqCst);
        let (waited, shared) = trainer.join().unwrap();
        assert!(shared > 0, "{name}: no turn was granted beside serving");
        assert!(h.training_turn("probe", None).shared, "{name}: serving ended a moment ago");
        std::thread::sleep(tandem_engine::scheduler::RECENT_SERVING + std::time::Duration::from_millis(300));
        assert!(!h.training_turn("probe", None).shared, "{name}: turns still say serving has work after it ended");
        h.shutdown();
        engine.join().unwrap();
        let of = |e: &str| at_check.iter().find(|s| s.entity == e).cloned().unwrap();
        let (serve, train) = (of("serve"), of("train"));
        let serve_counter =
            fair.input_weight * serve.input_tokens as f64 + fair.output_weight * serve.output_tokens as f64;
        let train_counter = fair.train_weight * train.train_tokens as f64;
        println!("{name}: serving {serve_counter}, training {train_counter}, the trainer waited {waited:?}");
        assert!(train.train_tokens > 0 && serve.output_tokens > 0, "{name}: {at_check:?}");
        if name == "fair" {
            assert!(train_counter <= serve_counter + 8.0 * one_turn, "{name}: training ran ahead: {at_check:?}");
            assert!(train_counter >= serve_counter / 2.0, "{name}: training was starved: {at_check:?}");
            assert!(waited > std::time::Duration::ZERO);
        } else {
            assert!(train_counter > 3.0 * serve_counter, "{name}: the trainer should run unchecked: {at_check:?}");
        }
    }
}
