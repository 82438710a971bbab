//! Logits from tandem agree with an independent numpy implementation of the forward pass.
mod common;

use common::*;
use tandem_models::{KvCache, LogitsFor, OpsPath, SequenceInput};

const TOL: f64 = 1e-4;

fn tandem_logits(loaded: &tandem_models::LoadedModel, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut model_cache = KvCache::new(&loaded.model.config, 1, 64, loaded.model.device()).unwrap();
    let out = loaded
        .model
        .forward(&[SequenceInput { slot: 0, tokens, logits: LogitsFor::All, siblings: &[] }], &mut model_cache, &[])
        .unwrap();
    out.logits.to_vec2::<f32>().unwrap()
}

#[test]
fn tiny_checkpoints_match_the_numpy_reference_on_both_op_paths() {
    let tokens: Vec<u32> = vec![260, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 262, 5, 270];
    for name in TINY {
        let dir = tiny_dir().join(name);
        let reference = reference_logits(&dir, &tokens);
        let mut loaded = load_path(&dir);
        for path in [OpsPath::CpuKernels, OpsPath::Generic] {
            loaded.model.set_ops_path(path);
            let ours = tandem_logits(&loaded, &tokens);
            let err = relative_error(&ours, &reference);
            assert!(err < TOL, "{name} ({path:?}): relative error {err:.2e} exceeds {TOL:.0e}");
        }
    }
}

#[test]
fn smollm2_gguf_matches_the_numpy_reference() {
    let file = model_file(SMOLLM2);
    // "<|im_start|>user\nWhat is 2+2?" and a few ordinary ids.
    let tokens: Vec<u32> = vec![1, 4093, 198, 1780, 314, 216, 34, 33, 34, 47, 2, 198, 1, 520, 9531];
    let reference = reference_logits(&file, &tokens);
    let mut loaded = load_path(&file);
    for path in [OpsPath::CpuKernels, OpsPath::Generic] {
        loaded.model.set_ops_path(path);
        let ours = tandem_logits(&loaded, &tokens);
        let err = relative_error(&ours, &reference);
        assert!(err < TOL, "SmolLM2 ({path:?}): relative error {err:.2e} exceeds {TOL:.0e}");
    }
}

#[test]
fn a_wrong_rope_or_norm_detail_is_caught() {
    // The comparison must be able to fail: the common bug of a default rope theta (1e4 instead of
    // Qwen's 1e6) breaks agreement.
    let dir = tiny_dir().join("qwen2-tied-bias");
    let tokens: Vec<u32> = (1..20).collect();
    let reference = reference_logits(&dir, &tokens);
    let broken = tandem_testkit::tiny_copy("qwen2-tied-bias", "broken-rope");
    let cfg = std::fs::read_to_string(broken.join("config.json")).unwrap().replace("1000000.0", "10000.0");
    std::fs::write(broken.join("config.json"), cfg).unwrap();
    let loaded = load_path(&broken);
    let err = relative_error(&tandem_logits(&loaded, &tokens), &reference);
    eprintln!("error with the wrong theta: {err:.2e}");
    assert!(err > TOL, "a changed rope theta went unnoticed ({err:.2e})");
}

#[test]
fn quantized_smollm2_tracks_the_reference() {
    // Kept-quantized weights multiply 8-bit-quantized activations (as llama.cpp does), so agreement
    // is looser: a few percent of logit error (llama.cpp on this file and these tokens: 3.5%), and
    // the same most likely token wherever the reference's lead is clear of that error (at one
    // position here its lead is 0.26 and both engines' errors are of that size).
    let file = model_file(SMOLLM2);
    let tokens: Vec<u32> = vec![1, 4093, 198, 1780, 314, 216, 34, 33, 34, 47, 2, 198, 1, 520, 9531];
    let reference = reference_logits(&file, &tokens);
    let loaded = load_quantized(&file);
    let ours = tandem_logits(&loaded, &tokens);
    let err = relative_error(&ours, &reference);
    assert!(err < 0.05, "quantized SmolLM2: relative error {err:.2e}");
    let argmax = |r: &Vec<f32>| r.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let mut clear = 0;
    for (pos, (o, r)) in ours.iter().zip(&reference).enumerate() {
        let best = argmax(r);
        let runner_up = r.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, v)| *v).fold(f32::MIN, f32::max);
        if r[best] - runner_up > 1.0 {
            clear += 1;
            assert_eq!(argmax(o), best, "position {pos}: the reference leads by {}", r[best] - runner_up);
        }
    }
    assert!(clear >= 10, "only {clear} positions with a clear lead");
}

#[test]
fn qwen_coder_gguf_matches_the_numpy_reference() {
    // qwen2 in GGUF: qkv bias, separate output matrix, rotate-half rope, q5_0/q6_K/q4_K/q8_0 blocks.
    let file = model_file(QWEN_CODER);
    let tokens: Vec<u32> = vec![151644, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198];
    let reference = reference_logits(&file, &tokens);
    let loaded = load_path(&file);
    let err = relative_error(&tandem_logits(&loaded, &tokens), &reference);
    assert!(err < TOL, "Qwen2.5-Coder: relative error {err:.2e} exceeds {TOL:.0e}");
}

#[test]
fn bf16_weights_match_the_reference_when_the_checkpoint_is_bf16() {
    // A bf16 checkpoint kept in bf16 loses nothing: the reference sees the same weight values, so
    // the f32-accumulating bf16 kernels must meet the same 1e-4 bound, on both op paths.
    let tokens: Vec<u32> = vec![260, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 262];
    let dir = tiny_dir().join("llama-bf16-tied");
    let reference = reference_logits(&dir, &tokens);
    let opts = tandem_models::LoadOptions { weight_dtype: tandem_models::WeightDtype::Bf16, ..f32_cache() };
    let mut loaded = tandem_models::load(&dir, &opts, &mut |_, _| {}).unwrap();
    for path in [OpsPath::CpuKernels, OpsPath::Generic] {
        loaded.model.set_ops_path(path);
        let err = relative_error(&tandem_logits(&loaded, &tokens), &reference);
        assert!(err < TOL, "bf16 ({path:?}): relative error {err:.2e} exceeds {TOL:.0e}");
    }
}

/// Bound for an f16 KV cache against the reference that rounds its keys and values alike: a value
/// within a rounding of a half-precision boundary may round the other way from tandem's f32 than
/// from the reference's f64, one f16 step (~5e-4 relative) in an element. Measured 2026-12-07:
/// tiny checkpoints 5e-7-8e-5, SmolLM2 2.9-3.6e-4, Qwen2.5-Coder 1.1-4.0e-4 (against the unrounded
/// reference Qwen is off by 1.8e-2: a cache that did not round would fail here).
const TOL_F16: f64 = 1e-3;

/// An f16 KV cache against the reference with keys (after rope) and values rounded to half
/// precision (numpy's rounding, float64 otherwise; a latent checkpoint's key and value latents,
/// before their expansion), on both op paths, for the tiny checkpoints, SmolLM2 and Qwen2.5-Coder.
#[test]
fn an_f16_kv_cache_matches_the_reference_with_rounded_keys_and_values() {
    let tokens: Vec<u32> = vec![260, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 262, 5, 270];
    let smol: Vec<u32> = vec![1, 4093, 198, 1780, 314, 216, 34, 33, 34, 47, 2, 198, 1, 520, 9531];
    let qwen: Vec<u32> = vec![151644, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198];
    let mut cases: Vec<(String, std::path::PathBuf, Vec<u32>)> =
        TINY.iter().map(|n| (n.to_string(), tiny_dir().join(n), tokens.clone())).collect();
    cases.push(("SmolLM2".into(), model_file(SMOLLM2), smol));
    cases.push(("Qwen2.5-Coder".into(), model_file(QWEN_CODER), qwen));
    let opts = tandem_models::LoadOptions { kv_dtype: tandem_models::KvDtype::F16, ..Default::default() };
    for (name, path, tokens) in cases {
        let mut loaded = tandem_models::load(&path, &opts, &mut |_, _| {}).unwrap();
        let reference = reference_logits_kv(&path, &tokens, "f16");
        for ops in [OpsPath::CpuKernels, OpsPath::Generic] {
            loaded.model.set_ops_path(ops);
            let err = relative_error(&tandem_logits(&loaded, &tokens), &reference);
            assert!(err < TOL_F16, "{name} ({ops:?}), f16 cache: relative error {err:.2e} exceeds {TOL_F16:.0e}");
        }
    }
}
