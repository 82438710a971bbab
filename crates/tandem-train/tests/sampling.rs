//! Sampling from the weights being trained, through the engine's scheduler and batched with the
//! served model's traffic: the logprobs the sampler reports equal what training computes for the
//! same tokens, and the served model's outputs are untouched by the versions beside them.
mod common;
use common::tiny;
use std::collections::BTreeMap;
use std::sync::Arc;
use tandem_engine::{Engine, EngineConfig, Event, Fcfs, GenerationRequest, WeightVersion};
use tandem_models::{LoraSpec, LoraTargets, Model};
use tandem_runtime::SamplingParams;
use tandem_train::{AdamParams, Datum, LossFn, Mode, TrainingModel};

fn request(i: usize, weights: Option<WeightVersion>) -> GenerationRequest {
    let prompt: Vec<u32> = (0..5 + i % 7).map(|j| ((i * 37 + j * 11) % 200) as u32 + 30).collect();
    GenerationRequest {
        prompt,
        max_tokens: 10 + i % 5,
        sampling: SamplingParams { temperature: 1.0, seed: Some(i as u64), ..Default::default() },
        stop_token_ids: vec![],
        client: None,
        agent: None,
        weights,
        score: None,
    }
}

fn run(base: &Model, reqs: Vec<GenerationRequest>) -> Vec<Vec<(u32, f32)>> {
    let (mut e, h) =
        Engine::new(base.clone(), EngineConfig { max_batch: 4, ..Default::default() }, Box::new(Fcfs::default()))
            .unwrap();
    let mut rxs: Vec<_> = reqs.into_iter().map(|r| h.submit(r).unwrap()).collect();
    e.run_until_idle();
    rxs.iter_mut()
        .map(|rx| {
            let mut out = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Token(t) => out.push((t.id, t.logprob)),
                    Event::Finished { .. } => return out,
                    Event::Failed(m) => panic!("failed: {m}"),
                    Event::Scored(_) => {}
                }
            }
            panic!("unfinished")
        })
        .collect()
}

#[test]
fn sampler_and_trainer_logprobs_agree_and_versions_batch_with_base_traffic() {
    let spec = LoraSpec { rank: 4, alpha: 32.0, targets: LoraTargets { attn: true, mlp: true, unembed: false } };
    check(&tiny("qwen2-tied-bias"), spec, 2e-2);
}

#[test]
fn qlora_over_the_quantized_smollm2_samples_and_trains_with_equal_logprobs() {
    // The served GGUF blocks stay frozen and quantized; gradients flow through them to adapters on
    // every projection and the unembedding, and the trainer's forward runs the serving kernels.
    let file = common::smollm2_file();
    let opts = tandem_models::LoadOptions { keep_quantized: true, ..Default::default() };
    let base = tandem_models::load(&file, &opts, &mut |_, _| {}).unwrap().model;
    assert!(!base.is_dense());
    let err = TrainingModel::new(&base, Mode::Full, 0).err().expect("full training of quantized blocks is refused");
    assert!(err.to_string().contains("quantized models train adapters only"), "{err}");
    let spec = LoraSpec { rank: 8, alpha: 32.0, targets: LoraTargets { attn: true, mlp: true, unembed: true } };
    check(&base, spec, 5e-3);
}

/// Trains adapters a few steps on `base`, samples the result batched with the base's traffic,
/// and checks that batching changes nothing and that training sees the sampler's logprobs.
fn check(base: &Model, spec: LoraSpec, lr: f64) {
    let base = base.clone();
    let mut t = TrainingModel::new(&base, Mode::Lora(spec), 5).unwrap();
    let v = base.config.vocab_size as u32;
    let d = Datum { tokens: (1..15).collect(), targets: (2..16).map(|x| x % v).collect(), inputs: BTreeMap::new() };
    for _ in 0..3 {
        t.forward_backward(std::slice::from_ref(&d), &LossFn::CrossEntropy, false).unwrap();
        t.optim_step(&AdamParams { learning_rate: lr, ..Default::default() }).unwrap();
    }
    let version = WeightVersion { id: 1, family: "policy".into(), model: Arc::new(t.snapshot().unwrap()) };
    let n = 10;
    let mixed: Vec<_> = (0..n).map(|i| request(i, (i % 2 == 1).then(|| version.clone()))).collect();
    let outs = run(&base, mixed.clone());
    let base_alone = run(&base, (0..n).filter(|i| i % 2 == 0).map(|i| request(i, None)).collect());
    let version_alone = run(&version.model, (0..n).filter(|i| i % 2 == 1).map(|i| request(i, None)).collect());
    for i in 0..n {
        let alone = if i % 2 == 0 { &base_alone[i / 2] } else { &version_alone[i / 2] };
        assert_eq!(&outs[i], alone, "request {i}: batching with another version changed it");
    }
    assert_ne!(outs[1], run(&base, vec![request(1, None)])[0], "the version samples like the base");

    // Training sees exactly the sampler's logprobs for the sampled tokens.
    let mut worst = 0f32;
    for i in (1..n).step_by(2) {
        let r = &mixed[i];
        let sampled: Vec<u32> = outs[i].iter().map(|x| x.0).collect();
        let mut seq = r.prompt.clone();
        seq.extend(&sampled);
        let p = r.prompt.len();
        let mut q = vec![0f32; seq.len() - 1];
        for (j, (_, lp)) in outs[i].iter().enumerate() {
            q[p - 1 + j] = *lp;
        }
        let mut inputs = BTreeMap::new();
        let mask: Vec<f32> = (0..seq.len() - 1).map(|j| if j + 1 >= p { 1.0 } else { 0.0 }).collect();
        inputs.insert("logprobs".to_string(), q.clone());
        inputs.insert("advantages".to_string(), mask.clone());
        let datum = Datum { tokens: seq[..seq.len() - 1].to_vec(), targets: seq[1..].to_vec(), inputs };
        let out = t.forward_backward(&[datum], &LossFn::ImportanceSampling, true).unwrap();
        for (a, b) in out.logprobs[0].iter().zip(&q).skip(p - 1) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("largest |trainer logprob - sampler logprob|: {worst:e}");
    assert!(worst == 0.0, "trainer and sampler disagree by {worst}");
}
