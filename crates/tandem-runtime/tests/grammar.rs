//! Structured outputs through the sampler, on the default models' real tokenizers: under random
//! logits (an adversary that prefers no token in particular) every output stays in its grammar and
//! ends, greedy or sampled; and a sampler asked about an output that went back (a rejected draft)
//! masks exactly as a fresh one.
mod common;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem_models::{load, LoadOptions, LoadedModel};
use tandem_runtime::{GrammarSpec, Grammars, Sampler, SamplingParams, Target};

fn loaded(name: &str) -> LoadedModel {
    let opts = LoadOptions { keep_quantized: true, ..Default::default() };
    load(&common::model_file(name), &opts, &mut |_, _| {}).unwrap()
}

fn grammars(m: &LoadedModel) -> Grammars {
    Grammars::for_model(m).unwrap()
}

fn random_logits(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>() * 8.0 - 4.0).collect()
}

/// Samples up to `limit` tokens under `spec` with random logits; the text before the stop token.
fn run(m: &LoadedModel, g: &Grammars, spec: &GrammarSpec, temperature: f32, seed: u64, limit: usize) -> String {
    let params =
        SamplingParams { temperature, seed: Some(seed), grammar: Some(g.compile(spec).unwrap()), ..Default::default() };
    let mut sampler = Sampler::new(params).ending_with(m.stop_token_ids.clone());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..limit {
        let id = sampler.sample(&random_logits(&mut rng, m.model.config.vocab_size), &out).id;
        if m.stop_token_ids.contains(&id) {
            return m.tokenizer.decode(&out, false).unwrap();
        }
        out.push(id);
    }
    panic!("no end after {limit} tokens: {:?}", m.tokenizer.decode(&out, false));
}

fn person() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "city": {"enum": ["Paris", "Tokyo"]},
            "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        },
        "required": ["name", "age", "city", "tags"],
        "additionalProperties": false,
    })
}

#[test]
fn random_logits_never_leave_the_grammar() {
    let rx = regex::Regex::new(r"^[0-9]{3}-[a-z]{2,4}( [A-Z]{1,5})?$").unwrap();
    for name in ["SmolLM2-135M-Instruct.Q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"] {
        let m = loaded(name);
        let g = grammars(&m);
        let choices = ["alpha", "beta gamma", "δ and \"quotes\""];
        for seed in 0..6 {
            let t = if seed % 2 == 0 { 0.0 } else { 1.0 };
            let json = run(&m, &g, &GrammarSpec::JsonSchema(person()), t, seed, 400);
            let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}: {json:?}"));
            let age = v["age"].as_i64().unwrap();
            assert!((0..=130).contains(&age) && v["name"].as_str().unwrap().chars().count() <= 12, "{v}");
            assert!(["Paris", "Tokyo"].contains(&v["city"].as_str().unwrap()), "{v}");
            assert!(v["tags"].as_array().unwrap().iter().all(|b| b.is_boolean()), "{v}");
            assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
            let text = run(&m, &g, &GrammarSpec::Regex(r"[0-9]{3}-[a-z]{2,4}( [A-Z]{1,5})?".into()), t, seed, 200);
            assert!(rx.is_match(&text), "{name}: {text:?}");
            let choice =
                run(&m, &g, &GrammarSpec::Choice(choices.iter().map(|c| c.to_string()).collect()), t, seed, 50);
            assert!(choices.contains(&choice.as_str()), "{name}: {choice:?}");
        }
    }
}

/// Verification asks the sampler about a draft's positions in order, then the next step starts from
/// what was accepted: the sampler must follow an output that went back as a fresh one would.
#[test]
fn a_sampler_follows_an_output_that_went_back() {
    let m = loaded("SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = grammars(&m);
    let grammar = g.compile(&GrammarSpec::JsonSchema(person())).unwrap();
    let params = SamplingParams { grammar: Some(grammar), ..Default::default() };
    let mut rng = StdRng::seed_from_u64(5);
    let vocab = m.model.config.vocab_size;
    // A valid output to walk along.
    let mut walker = Sampler::new(params.clone());
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..30 {
        let Target::Greedy(id) = walker.target(&random_logits(&mut rng, vocab), &out) else { panic!() };
        out.push(id);
    }
    let mut reused = Sampler::new(params.clone());
    for step in 0..40 {
        // Forward to some point, then back to an earlier one (as after a rejection).
        let ahead = rng.random_range(0..=out.len());
        let back = rng.random_range(0..=ahead);
        let logits = random_logits(&mut rng, vocab);
        let _ = reused.target(&logits, &out[..ahead]);
        let fresh = Sampler::new(params.clone()).target(&logits, &out[..back]);
        assert_eq!(reused.target(&logits, &out[..back]), fresh, "step {step}: {ahead} then {back}");
    }
}
