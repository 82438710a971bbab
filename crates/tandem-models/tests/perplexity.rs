//! Perplexity of both default models on real text (Python's LICENSE.txt, the interpreter's own:
//! English prose no model here generated): tandem with the GGUF blocks kept (the serving
//! default), tandem dequantized to f32, and llama.cpp on the same file and the same token ids.
//! Kept-quantized tandem must be within 1% of llama.cpp (both multiply 8-bit activations), and
//! f32 no worse than either by more than noise.
mod common;
use common::{load_path, load_quantized, model_file, python, repo_root, QWEN_CODER, SMOLLM2};
use std::process::Command;
use tandem_models::{KvCache, LoadedModel, LogitsFor, SequenceInput};

const CHUNK: usize = 512;
const CHUNKS: usize = 4;

fn text() -> String {
    let o = Command::new(python())
        .args(["-c", "import os; print(open(os.path.join(os.path.dirname(os.__file__), 'LICENSE.txt')).read())"])
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "reading Python's LICENSE.txt failed");
    String::from_utf8(o.stdout).unwrap()
}

/// Negative log-likelihood summed over every position after each chunk's first.
fn tandem_nll(m: &LoadedModel, tokens: &[u32]) -> f64 {
    let mut total = 0f64;
    for ids in tokens.chunks_exact(CHUNK) {
        let mut cache = KvCache::new(&m.model.config, 1, CHUNK, m.model.device()).unwrap();
        let out = m
            .model
            .forward(&[SequenceInput { slot: 0, tokens: ids, logits: LogitsFor::All, siblings: &[] }], &mut cache, &[])
            .unwrap();
        let rows: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
        for (i, row) in rows.iter().enumerate().take(CHUNK - 1) {
            let max = row.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            total += lse - row[ids[i + 1] as usize] as f64;
        }
    }
    total
}

fn llama_nll(file: &std::path::Path, tokens: &[u32]) -> f64 {
    let path = std::env::temp_dir().join(format!("tandem-ppl-{}.json", std::process::id()));
    tandem_testkit::require_python(&["llama_cpp"]);
    std::fs::write(&path, serde_json::to_vec(tokens).unwrap()).unwrap();
    let o = Command::new(python())
        .arg(repo_root().join("tests/reference/llama_perplexity.py"))
        .arg(file)
        .arg(&path)
        .arg(CHUNK.to_string())
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&path);
    assert!(o.status.success(), "llama_perplexity.py failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"].as_u64().unwrap() as usize, CHUNKS * (CHUNK - 1));
    v["nll"].as_f64().unwrap()
}

#[test]
fn quantized_perplexity_is_within_one_percent_of_llama_cpp() {
    let text = text();
    for name in [SMOLLM2, QWEN_CODER] {
        let file = model_file(name);
        let quantized = load_quantized(&file);
        let ids = quantized.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert!(ids.len() >= CHUNK * CHUNKS, "{name}: the text has only {} tokens", ids.len());
        let tokens = &ids[..CHUNK * CHUNKS];
        let n = (CHUNKS * (CHUNK - 1)) as f64;
        let ppl = |nll: f64| (nll / n).exp();
        let ours = ppl(tandem_nll(&quantized, tokens));
        let dense = ppl(tandem_nll(&load_path(&file), tokens));
        let peer = ppl(llama_nll(&file, tokens));
        eprintln!(
            "{name}: perplexity over {} tokens: tandem quantized {ours:.4}, tandem f32 {dense:.4}, llama.cpp {peer:.4}",
            tokens.len()
        );
        assert!((ours / peer - 1.0).abs() < 0.01, "{name}: tandem quantized {ours:.4} vs llama.cpp {peer:.4}");
        assert!(dense < ours.max(peer) * 1.01, "{name}: f32 {dense:.4} is worse than the quantized runs");
    }
}
