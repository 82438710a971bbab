//! Broken or unsupported checkpoints give errors that name the file and the problem.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use tandem_models::{load, LoadOptions, ModelError};

fn copy_tiny(name: &str, tag: &str) -> PathBuf {
    tandem_testkit::tiny_copy(name, &format!("broken-{tag}"))
}

fn load_err(path: &Path) -> ModelError {
    match load(path, &LoadOptions::default(), &mut |_, _| {}) {
        Ok(_) => panic!("{} loaded although it is broken", path.display()),
        Err(e) => e,
    }
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let dir = copy_tiny("qwen2-tied-bias", "arch");
    edit(&dir.join("config.json"), "\"model_type\": \"qwen2\"", "\"model_type\": \"mamba\"");
    let e = load_err(&dir).to_string();
    assert!(e.contains("config.json") && e.contains("mamba") && e.contains("unsupported architecture"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_tiny("qwen2-tied-bias", "missing");
    edit(&dir.join("config.json"), "\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    let e = load_err(&dir);
    assert!(matches!(e, ModelError::MissingTensor { ref name, .. } if name.starts_with("model.layers.2.")), "{e}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = copy_tiny("llama-bf16-tied", "shape");
    edit(&dir.join("config.json"), "\"intermediate_size\": 128", "\"intermediate_size\": 96");
    let e = load_err(&dir).to_string();
    assert!(e.contains("gate_proj.weight") && e.contains("[128, 64]") && e.contains("[96, 64]"), "{e}");
}

#[test]
fn truncated_safetensors_names_the_shard() {
    let dir = copy_tiny("llama-gqa-untied-sharded", "trunc");
    let shard = dir.join("model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
}

#[test]
fn missing_shard_and_missing_files_are_named() {
    let dir = copy_tiny("llama-gqa-untied-sharded", "shard");
    std::fs::remove_file(dir.join("model-00003-of-00003.safetensors")).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("model-00003-of-00003.safetensors") && e.contains("missing"), "{e}");

    let dir = copy_tiny("qwen2-tied-bias", "tok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("tokenizer.json"), "{e}");

    let dir = copy_tiny("qwen2-tied-bias", "cfg");
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    let e = load_err(&dir).to_string();
    assert!(e.contains("config.json") && e.contains("invalid"), "{e}");

    let e = load_err(Path::new("/nonexistent/model.gguf")).to_string();
    assert!(e.contains("/nonexistent/model.gguf") && e.contains("no such"), "{e}");
}

#[test]
fn truncated_and_garbage_gguf_files_are_errors() {
    let src = model_file(SMOLLM2);
    let dst = std::env::temp_dir().join(format!("tandem-trunc-{}.gguf", std::process::id()));
    let bytes = std::fs::read(&src).unwrap();
    // Header and metadata intact, tensor data cut short.
    std::fs::write(&dst, &bytes[..bytes.len() - 1_000_000]).unwrap();
    let e = load_err(&dst).to_string();
    assert!(e.contains(dst.to_str().unwrap()) && e.contains("remaining"), "{e}");
    // Cut inside the metadata.
    std::fs::write(&dst, &bytes[..5_000]).unwrap();
    let e = load_err(&dst).to_string();
    assert!(e.contains(dst.to_str().unwrap()), "{e}");
    std::fs::write(&dst, b"definitely not a gguf file").unwrap();
    let e = load_err(&dst).to_string();
    assert!(e.contains("GGUF"), "{e}");
    let _ = std::fs::remove_file(&dst);
}
