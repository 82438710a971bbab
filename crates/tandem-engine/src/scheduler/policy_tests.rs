//! Fairness properties, checked on the model-free simulator (milliseconds per test).
use super::sim::{SimStep, Simulator};
use super::{FairConfig, Fcfs, SchedulingPolicy, VirtualTokenCounter};
use std::collections::HashMap;

const SLOTS: usize = 8;
const BUDGET: usize = 64;

/// Deterministic pseudo-random lengths.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, lo: usize, hi: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) as usize % (hi - lo + 1)
    }
}

const MAX_PROMPT: usize = 256;
const MAX_OUTPUT: usize = 128;

fn fair(weights: &[(&str, f64)]) -> Box<dyn SchedulingPolicy> {
    let client_weights = weights.iter().map(|(c, w)| (c.to_string(), *w)).collect();
    Box::new(VirtualTokenCounter::new(FairConfig { client_weights, ..Default::default() }))
}

/// Weighted service (1 per input token, 2 per output token) per client, from a step's charges.
fn tally(step: &SimStep, owner: &HashMap<u64, String>, service: &mut HashMap<String, f64>) {
    for &(id, i, o) in &step.charged {
        *service.entry(owner[&id].clone()).or_default() += i as f64 + 2.0 * o as f64;
    }
}

/// Keeps each listed client backlogged with `depth` outstanding requests for `steps` steps;
/// returns the service per client after each step.
fn backlogged(
    policy: Box<dyn SchedulingPolicy>,
    clients: &[&str],
    depth: usize,
    steps: usize,
) -> Vec<HashMap<String, f64>> {
    let mut sim = Simulator::new(policy, SLOTS, BUDGET);
    let mut rng = Lcg(7);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    let mut history = Vec::new();
    for _ in 0..steps {
        for c in clients {
            while sim.active(c) < depth {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        let step = sim.step();
        assert_eq!(step.idle_slots_while_waiting, 0, "a slot idled while requests waited");
        tally(&step, &owner, &mut service);
        history.push(service.clone());
    }
    history
}

/// The largest cost of one request: w_in * longest prompt + w_out * longest output.
const U: f64 = MAX_PROMPT as f64 + 2.0 * MAX_OUTPUT as f64;

#[test]
fn the_service_gap_of_two_backlogged_clients_stays_bounded() {
    let margin = FairConfig::default().preempt_margin.unwrap();
    // The bound: the preemption margin plus one request's cost.
    let bound = margin + U;
    let history = backlogged(fair(&[]), &["a", "b"], 20, 4000);
    let worst = history
        .iter()
        .map(|s| (s.get("a").copied().unwrap_or(0.0) - s.get("b").copied().unwrap_or(0.0)).abs())
        .fold(0.0, f64::max);
    assert!(worst <= bound, "gap {worst} exceeds the bound {bound}");
    // FCFS has no such bound: the client with more queued requests pulls ahead without limit.
    let fcfs = backlogged_uneven(Box::new(Fcfs::default()));
    let fair_uneven = backlogged_uneven(fair(&[]));
    assert!(fcfs > 4.0 * bound, "FCFS gap {fcfs}");
    assert!(fair_uneven <= bound, "fair gap with uneven queues {fair_uneven}");
}

/// Client "a" keeps 30 requests outstanding, "b" 10 (both more than the 8 slots, so both stay
/// backlogged): the largest service gap.
fn backlogged_uneven(policy: Box<dyn SchedulingPolicy>) -> f64 {
    let mut sim = Simulator::new(policy, SLOTS, BUDGET);
    let mut rng = Lcg(11);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    let mut worst: f64 = 0.0;
    for _ in 0..3000 {
        for (c, depth) in [("a", 30), ("b", 10)] {
            while sim.active(c) < depth {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        let step = sim.step();
        assert_eq!(step.idle_slots_while_waiting, 0);
        tally(&step, &owner, &mut service);
        worst = worst.max((service.get("a").copied().unwrap_or(0.0) - service.get("b").copied().unwrap_or(0.0)).abs());
    }
    worst
}

#[test]
fn weights_two_to_one_give_service_two_to_one() {
    let history = backlogged(fair(&[("a", 2.0)]), &["a", "b"], 20, 6000);
    let last = history.last().unwrap();
    let ratio = last["a"] / last["b"];
    assert!((ratio - 2.0).abs() / 2.0 < 0.05, "service ratio {ratio}");
}

#[test]
fn a_client_returning_from_idle_gains_no_credit() {
    let mut sim = Simulator::new(fair(&[]), SLOTS, BUDGET);
    let mut rng = Lcg(3);
    let mut owner = HashMap::new();
    let mut service: HashMap<String, f64> = HashMap::new();
    // "a" alone for a long time, then "b" arrives; both stay backlogged.
    for step in 0..3000 {
        let clients: &[&str] = if step < 1500 { &["a"] } else { &["a", "b"] };
        for c in clients {
            while sim.active(c) < 20 {
                let id = sim.submit(c, None, rng.next(16, MAX_PROMPT), rng.next(8, MAX_OUTPUT));
                owner.insert(id, c.to_string());
            }
        }
        if step == 1500 {
            service.clear(); // measure only from b's arrival on
        }
        let s = sim.step();
        assert_eq!(s.idle_slots_while_waiting, 0);
        tally(&s, &owner, &mut service);
        if step > 1500 {
            // b never gets far ahead of a, though a was served alone for 1500 steps.
            let lead = service.get("b").copied().unwrap_or(0.0) - service.get("a").copied().unwrap_or(0.0);
            assert!(lead <= FairConfig::default().preempt_margin.unwrap() + U, "b leads by {lead} at step {step}");
        }
    }
    let share = service["b"] / (service["a"] + service["b"]);
    assert!((share - 0.5).abs() < 0.05, "b's share after returning: {share}");
}

/// With one client every policy is FCFS: identical admissions, preemptions and completions.
#[test]
fn fair_and_fcfs_agree_for_a_single_client() {
    let run = |policy: Box<dyn SchedulingPolicy>| {
        let mut sim = Simulator::new(policy, SLOTS, BUDGET);
        let mut rng = Lcg(5);
        let mut log = Vec::new();
        for step in 0..2000 {
            if rng.next(0, 3) == 0 || step % 50 < 5 {
                sim.submit("only", None, rng.next(1, 300), rng.next(1, 100));
            }
            log.push(sim.step());
        }
        log
    };
    let fcfs = run(Box::<Fcfs>::default());
    let fair = run(fair(&[]));
    assert!(fcfs.iter().map(|s| s.finished.len()).sum::<usize>() > 100);
    assert_eq!(fcfs, fair);
}

/// An agent that fans out many calls is one entity: a one-call agent of the same client and weight
/// is admitted at once rather than behind the fan-out.
#[test]
fn a_many_call_agent_cannot_crowd_out_a_one_call_agent() {
    let wait_of_single = |policy: Box<dyn SchedulingPolicy>| {
        let mut sim = Simulator::new(policy, SLOTS, BUDGET);
        let mut rng = Lcg(9);
        let mut worst_wait = 0;
        let mut pending: Option<(u64, usize)> = None; // the one-call agent's request and submit step
        for step in 0..3000 {
            while sim.active("team/swarm") < 32 {
                sim.submit("team", Some("swarm"), rng.next(16, 128), rng.next(8, 64));
            }
            if pending.is_none() && sim.active("team/solo") == 0 {
                pending = Some((sim.submit("team", Some("solo"), 32, 16), step));
            }
            let s = sim.step();
            if let Some((id, at)) = pending {
                if s.admitted.contains(&id) {
                    worst_wait = worst_wait.max(step - at);
                    pending = None;
                }
            }
        }
        worst_wait
    };
    let fair_wait = wait_of_single(fair(&[]));
    let fcfs_wait = wait_of_single(Box::<Fcfs>::default());
    // Without preemption-worthy gaps the solo call takes the next free slot ...
    assert!(fair_wait * 4 < fcfs_wait, "fair: {fair_wait} steps, FCFS: {fcfs_wait} steps behind the swarm");
    // ... and with a small preemption margin it runs almost at once.
    let eager = Box::new(VirtualTokenCounter::new(FairConfig { preempt_margin: Some(32.0), ..Default::default() }));
    let eager_wait = wait_of_single(eager);
    assert!(eager_wait <= 3, "the solo agent waited {eager_wait} steps");
}
