//! The tokenizer tandem builds from GGUF metadata gives the same ids as llama.cpp's own tokenizer
//! for the same file, and decodes back to the input text.
mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

const TEXTS: &[&str] = &[
    "Hello world",
    "What is the capital of France?",
    "  leading spaces, and trailing   ",
    "runs of spaces     and\t\ttabs",
    "newlines\n\nand more\n\n\n\nlines\r\n",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "unicode: héllo wörld — naïve café, 日本語のテキスト, 한국어, emoji 🦀🚀👍🏽",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", vec![1, 2, 3].iter().sum::<i32>()); }",
    "It's, they're, we'll, I'd, you've, I'M, DON'T",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "x\u{a0}y\u{2003}z",
    "Ünïcödé NFC: e\u{301} vs é",
];

/// (ids, text as tokenized) per text.
fn reference_ids(file: &std::path::Path, nfc: bool) -> Vec<(Vec<u32>, String)> {
    tandem_testkit::require_python(&["llama_cpp"]);
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/reference/tokenize_reference.py"))
        .arg(file)
        .args(nfc.then_some("--nfc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(serde_json::to_string(TEXTS).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tokenize_reference.py failed (is llama-cpp-python installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(file_name: &str, nfc: bool) {
    let file = model_file(file_name);
    let expected = reference_ids(&file, nfc);
    let loaded = load_path(&file);
    for (text, (want, normalized)) in TEXTS.iter().zip(&expected) {
        let enc = loaded.tokenizer.encode(*text, false).unwrap();
        assert_eq!(enc.get_ids(), &want[..], "{file_name}: ids differ for {text:?}");
        let back = loaded.tokenizer.decode(enc.get_ids(), false).unwrap();
        assert_eq!(&back, normalized, "{file_name}: decode does not round-trip");
    }
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    check(SMOLLM2, false);
}

#[test]
fn qwen_coder_tokenizer_matches_llama_cpp() {
    // Qwen2's tokenizer.json normalizes to NFC (llama.cpp does not); tandem follows the original.
    check(QWEN_CODER, true);
}
