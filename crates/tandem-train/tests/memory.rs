//! Training memory on the real SmolLM2: the estimate a request is admitted by bounds what a pass
//! really takes (and is not vacuous), a datum longer than the served context or a pass over the
//! budget is refused with a clear error before any work. Its own test binary: it reads the
//! process's peak RSS, which other tests running beside it would disturb.
mod common;
use std::collections::BTreeMap;
use tandem_models::{load, LoadOptions, LoraSpec, LoraTargets};
use tandem_train::{Datum, Limits, LossFn, Mode, TrainingModel};

/// VmRSS or VmHWM (peak) of this process, in bytes.
fn rss(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

fn datum(n: usize, vocab: usize) -> Datum {
    let v = vocab as u32;
    Datum {
        tokens: (0..n as u32).map(|i| (i * 7919 + 11) % v).collect(),
        targets: (0..n as u32).map(|i| (i * 104729 + 3) % v).collect(),
        inputs: BTreeMap::new(),
    }
}

#[test]
fn the_memory_estimate_bounds_a_real_pass_and_limits_refuse_before_any_work() {
    let file = common::smollm2_file();
    let loaded = load(&file, &LoadOptions::default(), &mut |_, _| {}).unwrap();
    let vocab = loaded.model.config.vocab_size;
    let spec = LoraSpec { rank: 16, alpha: 32.0, targets: LoraTargets { attn: true, mlp: true, unembed: true } };
    let mut t = TrainingModel::new(&loaded.model, Mode::Lora(spec), 1).unwrap();

    // A 512-token datum: the measured growth of the peak stays under the estimate, and the
    // estimate is not a wild overstatement.
    let long = datum(512, vocab);
    let estimate = t.peak_bytes(std::slice::from_ref(&long), false);
    let before = rss("VmRSS:");
    t.forward_backward(std::slice::from_ref(&long), &LossFn::CrossEntropy, false).unwrap();
    let grown = rss("VmHWM:").saturating_sub(before);
    assert!(grown <= estimate, "a 512-token LoRA pass took {grown} bytes, more than its estimate {estimate}");
    assert!(grown * 2 >= estimate, "the estimate {estimate} is over twice the {grown} bytes measured");

    // Limits: the served context, then the memory budget, each refused before any work.
    t.set_limits(Limits { max_tokens: 256, memory_bytes: estimate });
    let err = t.forward_backward(&[datum(300, vocab)], &LossFn::CrossEntropy, false).unwrap_err();
    assert!(err.is_user() && err.to_string().contains("served context (256 tokens)"), "{err}");
    t.set_limits(Limits { max_tokens: 4096, memory_bytes: estimate });
    let err = t.forward_backward(&[datum(1024, vocab)], &LossFn::CrossEntropy, false).unwrap_err();
    let msg = err.to_string();
    assert!(err.is_user() && msg.contains("training budget") && msg.contains("--training-memory"), "{msg}");
    assert!(t.pending_gradients().unwrap().values().count() > 0, "the first pass's gradients are kept");
    // Within the budget, work goes on.
    t.forward_backward(&[datum(64, vocab)], &LossFn::CrossEntropy, true).unwrap();
}
