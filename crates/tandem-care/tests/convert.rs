//! CARE conversions of real and tiny checkpoints: exact at full rank, the activation error the
//! decomposition predicts, and a converted SmolLM2 written as a Hugging Face folder that loads
//! back to the same logits and matches the independent numpy reference (which multiplies the
//! factors back together in float64).
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_care::{Allocation, Method};
use tandem_models::{load, KvCache, KvDtype, LoadOptions, LoadedModel, LogitsFor, Model, OpsPath, SequenceInput};
use tandem_testkit::{python, repo_root, tiny};

/// A checkpoint with an f32 KV cache: these tests compare f32 logits (the f16 latent cache is
/// compared with a reference that rounds alike).
fn load_path(path: &Path) -> LoadedModel {
    let opts = LoadOptions { kv_dtype: KvDtype::F32, ..Default::default() };
    load(path, &opts, &mut |_, _| {}).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

fn logits(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(&model.config, 1, tokens.len(), model.device()).unwrap();
    let input = SequenceInput { slot: 0, tokens, logits: LogitsFor::All, siblings: &[] };
    model.forward(&[input], &mut cache, &[]).unwrap().logits.to_vec2().unwrap()
}

/// max |a - b| / max |b|.
fn relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let diff = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    diff / b.iter().flatten().map(|y| y.abs() as f64).fold(0.0, f64::max)
}

fn tiny_windows(seed: u32) -> Vec<Vec<u32>> {
    (0..24).map(|w| (0..32).map(|i| (w * 31 + i * 17 + seed) % 250 + 1).collect()).collect()
}

#[test]
fn full_rank_conversions_give_the_original_logits() {
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 5) % 250 + 1).collect();
    for name in ["llama-gqa-untied-sharded", "qwen2-tied-bias", "qwen3-qknorm-untied"] {
        let m = load_path(&tiny(name));
        let cal = tandem_care::calibrate(&m.model, &tiny_windows(3), &mut |_, _| {}).unwrap();
        for method in [Method::Care, Method::Asvd, Method::Svd] {
            let spectra = tandem_care::spectra(&m.model, &cal, method, &mut |_, _| {}).unwrap();
            let full = m.model.config.kv_size();
            let mut conv = tandem_care::convert(&m.model, &spectra, full, Allocation::Uniform).unwrap().model;
            assert!(conv.config.latent_kv.is_some());
            for path in [OpsPath::CpuKernels, OpsPath::Generic] {
                let mut orig = m.model.clone();
                orig.set_ops_path(path);
                conv.set_ops_path(path);
                let err = relative_error(&logits(&conv, &tokens), &logits(&orig, &tokens));
                assert!(err < 1e-4, "{name} {} {path:?}: full rank differs by {err:.2e}", method.name());
            }
        }
    }
}

/// Through the factors the converted model holds: ‖S(W − W_aW_b)‖² (S² the damped covariance of
/// the calibration activations) equals the tail energy Σ_{i>r} σ_i² the spectrum predicts, per
/// layer, for K and for V.
#[test]
fn the_activation_error_is_the_predicted_tail_energy() {
    let m = load_path(&tiny("qwen2-tied-bias"));
    let cal = tandem_care::calibrate(&m.model, &tiny_windows(9), &mut |_, _| {}).unwrap();
    let spectra = tandem_care::spectra(&m.model, &cal, Method::Care, &mut |_, _| {}).unwrap();
    let conv = tandem_care::convert(&m.model, &spectra, 7, Allocation::Energy).unwrap();
    let matrix = |t: &candle_core::Tensor| {
        let (r, c) = t.dims2().unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        nalgebra::DMatrix::from_row_iterator(r, c, v.into_iter().map(f64::from))
    };
    for (l, s) in spectra.iter().enumerate() {
        let c = tandem_care::factor::damped(&cal.covariances[l]);
        let (orig, approx) = (m.model.kv_projections(l).unwrap(), conv.model.kv_projections(l).unwrap());
        for (w, wh, spec, r) in
            [(&orig.k, &approx.k, &s.k, conv.k_ranks[l]), (&orig.v, &approx.v, &s.v, conv.v_ranks[l])]
        {
            let e = (matrix(w) - matrix(wh)).transpose(); // [hidden, kv]
            let measured = (e.transpose() * &c * &e).trace();
            let predicted = spec.tail_energy(r);
            let tol = 1e-4 * spec.energy();
            assert!((measured - predicted).abs() < tol, "layer {l} rank {r}: {measured} vs {predicted}");
        }
    }
}

/// Logits of `tokens` fed in chunks of 150, each in one forward with another sequence.
fn chunked_beside_another(model: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(&model.config, 2, tokens.len() + 64, model.device()).unwrap();
    let other: Vec<u32> = (0..40).map(|i| 500 + i * 7).collect();
    let mut rows = Vec::new();
    for (i, chunk) in tokens.chunks(150).enumerate() {
        let noise = &other[..10 + i * 7];
        let out = model
            .forward(
                &[
                    SequenceInput { slot: 1, tokens: noise, logits: LogitsFor::All, siblings: &[] },
                    SequenceInput { slot: 0, tokens: chunk, logits: LogitsFor::All, siblings: &[] },
                ],
                &mut cache,
                &[],
            )
            .unwrap();
        let all: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
        rows.extend_from_slice(&all[out.logit_rows[1].clone()]);
        cache.reset(1).unwrap();
    }
    rows
}

fn models_dir() -> PathBuf {
    match std::env::var_os("TANDEM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tandem/models"),
    }
}

fn numpy_reference(checkpoint: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    numpy_reference_kv(checkpoint, tokens, "f32")
}

/// The reference with a KV cache of `kv` ("f16": a latent checkpoint's latents rounded to half
/// precision before their expansion).
fn numpy_reference_kv(checkpoint: &Path, tokens: &[u32], kv: &str) -> Vec<Vec<f32>> {
    tandem_testkit::require_python(&["numpy"]);
    run_logits_script(&repo_root().join("tests/reference/reference.py"), checkpoint, tokens, &[kv])
}

/// Logits from the folder's own transformers loader (the file `tandem convert care` writes), in
/// float64: torch's float32 rounding over 600 positions varies with the CPU's kernels (CI measured
/// 1.5e-4 where this machine measures 6e-6) and is not what the comparison is about.
fn transformers_logits(folder: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    tandem_testkit::require_python(&["numpy", "torch", "transformers", "safetensors"]);
    run_logits_script(&folder.join(tandem_care::TRANSFORMERS_LOADER_FILE), folder, tokens, &["float64"])
}

fn run_logits_script(script: &Path, checkpoint: &Path, tokens: &[u32], extra: &[&str]) -> Vec<Vec<f32>> {
    let out = std::env::temp_dir().join(format!("tandem-care-ref-{}.npy", std::process::id()));
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let o = Command::new(python())
        .arg(script)
        .arg(checkpoint)
        .arg(toks.join(","))
        .arg(&out)
        .args(extra)
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{} failed: {}", script.display(), String::from_utf8_lossy(&o.stderr));
    let t = candle_core::Tensor::read_npy(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    t.to_vec2::<f32>().unwrap()
}

/// SmolLM2 (a GGUF llama: rope rows permuted, which the folder undoes) converted at half rank
/// with energy allocation: the folder loads back to the same logits, numpy agrees with tandem's
/// latent kernels, the KV cache is 2x smaller by its tensors, and perplexity stays finite.
#[test]
fn a_converted_smollm2_folder_loads_back_and_matches_numpy() {
    let file = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.exists(), "{} is missing: run scripts/fetch-models.sh (CI does)", file.display());
    let m = load_path(&file);
    let text = tandem_care::text::python_reference().expect("python3 with pydoc_data");
    let tokens = m.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    let windows = tandem_care::windows(&tokens, 32, 32).unwrap();
    let cal = tandem_care::calibrate(&m.model, &windows, &mut |_, _| {}).unwrap();
    let spectra = tandem_care::spectra(&m.model, &cal, Method::Care, &mut |_, _| {}).unwrap();
    let conv = tandem_care::convert(&m.model, &spectra, 96, Allocation::Energy).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-care-smollm2-{}", std::process::id()));
    tandem_care::save(&m, &conv.model, serde_json::json!({"tandem_conversion": {}}), &dir).unwrap();
    let back = load_path(&dir);
    assert_eq!(back.model.config.latent_kv, conv.model.config.latent_kv);
    // Past 256 positions: a row's attention is the merge of several position ranges' partials.
    let probe: Vec<u32> = tokens[1000..1600].to_vec();
    let ours = logits(&conv.model, &probe);
    assert_eq!(chunked_beside_another(&conv.model, &probe), ours, "chunked and batched logits are not the same bits");
    let err = relative_error(&logits(&back.model, &probe), &ours);
    assert!(err < 1e-5, "the folder's logits differ by {err:.2e}");
    let numpy = numpy_reference(&dir, &probe);
    let err_numpy = relative_error(&ours, &numpy);
    assert!(err_numpy < 1e-4, "numpy differs from the latent kernels by {err_numpy:.2e}");
    // Another stack: stock transformers with the factored projections put in place.
    let tf = transformers_logits(&dir, &probe);
    let err = relative_error(&ours, &tf);
    let apart = relative_error(&tf, &numpy);
    eprintln!(
        "latent kernels against numpy {err_numpy:.2e}, against transformers {err:.2e} (those two apart {apart:.2e})"
    );
    assert!(
        err < 1e-4,
        "transformers differs from the latent kernels by {err:.2e} (numpy {err_numpy:.2e}; the two {apart:.2e})"
    );
    let bytes = |model: &Model| KvCache::with_blocks(&model.config, 1, 16, 1, model.device()).unwrap().bytes();
    assert_eq!(bytes(&m.model), 2 * bytes(&back.model), "the cache tensors are not half the size");
    // An f16 cache holds the latents rounded once, in half the bytes again; the reference rounds
    // them alike before expanding them.
    let opts = LoadOptions { kv_dtype: KvDtype::F16, ..Default::default() };
    let half = load(&dir, &opts, &mut |_, _| {}).unwrap();
    let ours16 = logits(&half.model, &probe);
    let err16 = relative_error(&ours16, &numpy_reference_kv(&dir, &probe, "f16"));
    let unrounded = relative_error(&ours16, &numpy);
    eprintln!("f16 latent cache against the rounding reference {err16:.2e}, against the unrounded one {unrounded:.2e}");
    // A value near a half-precision boundary may round the other way from tandem's f32 than from
    // the reference's f64, so the bound is loose; the unrounded reference must be further off
    // (measured 1.3e-4 against 4.1e-4 on a Xeon, 2026-12-07).
    assert!(err16 < 1e-3, "an f16 latent cache differs from the reference by {err16:.2e}");
    assert!(
        2.0 * err16 < unrounded,
        "the latents were not rounded as the reference rounds them ({err16:.2e}, {unrounded:.2e})"
    );
    assert_ne!(ours16, ours, "the f16 latent cache rounded nothing");
    assert_eq!(bytes(&back.model), 2 * bytes(&half.model), "the f16 latent cache is not half the f32 one");
    let (nll, n) =
        tandem_models::eval::negative_log_likelihood(&back.model, &tokens[..600], 300, &mut |_, _| {}).unwrap();
    assert!(tandem_models::eval::perplexity(nll, n).is_finite());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mean KL(p || q) over rows of logits.
fn kl(p_logits: &[Vec<f32>], q_logits: &[Vec<f32>]) -> f64 {
    let log_softmax = |row: &[f32]| {
        let max = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        row.iter().map(|&v| v as f64 - lse).collect::<Vec<_>>()
    };
    let total: f64 = p_logits
        .iter()
        .zip(q_logits)
        .map(|(p, q)| {
            let (lp, lq) = (log_softmax(p), log_softmax(q));
            lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>()
        })
        .sum();
    total / p_logits.len() as f64
}

/// Text the original writes: greedy continuations of short prompts.
fn written_by(model: &Model, prompts: usize, len: usize) -> Vec<u32> {
    let mut text = Vec::new();
    for p in 0..prompts as u32 {
        let mut seq: Vec<u32> = (0..4).map(|i| (p * 97 + i * 13) % 250 + 1).collect();
        while seq.len() < len {
            let rows = logits(model, &seq);
            let last = rows.last().unwrap();
            let next = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
            seq.push(next as u32);
        }
        text.extend(seq);
    }
    text
}

/// Healing through the training API's trainer brings a low-rank conversion's distribution back
/// toward the original's on text the original writes (full weights and LoRA), and its loss falls.
#[test]
fn healing_moves_a_conversion_back_toward_the_original() {
    let m = load_path(&tiny("llama-gqa-untied-sharded"));
    let cal = tandem_care::calibrate(&m.model, &tiny_windows(5), &mut |_, _| {}).unwrap();
    let spectra = tandem_care::spectra(&m.model, &cal, Method::Care, &mut |_, _| {}).unwrap();
    let conv = tandem_care::convert(&m.model, &spectra, 3, Allocation::Uniform).unwrap().model;
    let text = written_by(&m.model, 24, 48);
    let probe = written_by(&m.model, 2, 40)[44..].to_vec();
    let original = logits(&m.model, &probe);
    let before = kl(&original, &logits(&conv, &probe));
    let lora = tandem_models::LoraSpec {
        rank: 4,
        alpha: 4.0,
        targets: tandem_models::LoraTargets { attn: true, mlp: false, unembed: false },
    };
    for (mode, lr) in [(tandem_train::Mode::Full, 3e-4), (tandem_train::Mode::Lora(lora), 3e-3)] {
        let opts =
            tandem_care::heal::HealOptions { steps: 40, learning_rate: lr, windows: 4, window: 24, top_k: 3, mode };
        let (healed, losses) = tandem_care::heal::heal(&m.model, &conv, &text, &opts, &mut |_, _, _| {}).unwrap();
        let after = kl(&original, &logits(&healed, &probe));
        let (first, last) = (losses[..5].iter().sum::<f64>(), losses[35..].iter().sum::<f64>());
        assert!(last < first, "{mode:?}: loss {first} -> {last}");
        assert!(after < 0.9 * before, "{mode:?}: KL to the original {before:.3e} -> {after:.3e}");
    }
}
