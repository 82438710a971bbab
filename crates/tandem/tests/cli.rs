//! The built `tandem` binary, driven like a user drives it.
use std::path::PathBuf;
use std::process::Command;

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn tiny_model() -> PathBuf {
    tandem_testkit::tiny("qwen2-tied-bias")
}

#[test]
fn help_explains_the_commands() {
    let out = tandem().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["generate", "models", "bench", "TANDEM_CACHE"] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let out = tandem().args(["generate", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--model", "--prompt", "--chat", "--max-tokens", "--temperature", "--seed", "--dtype"] {
        assert!(text.contains(flag), "generate --help lacks {flag}");
    }
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let model = tiny_model();
    let out = tandem()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "the cat", "--max-tokens", "12", "--temperature", "0.8", "--seed", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prompt: 6 tokens") && stderr.contains("decode: 12 tokens"), "{stderr}");
    // Same seed, same text.
    let again = tandem()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", "the cat", "--max-tokens", "12", "--temperature", "0.8", "--seed", "3"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, again.stdout);
    let chat = tandem()
        .args(["generate", "--chat", "--max-tokens", "4", "--prompt", "hi", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
}

/// `--kv-dtype f16` on the quantized default model: speculation leaves the greedy text as plain
/// decoding over the same f16 cache writes it, and the option is refused with a clear error when
/// misspelt.
#[test]
fn an_f16_kv_cache_decodes_the_same_text_with_and_without_drafts() {
    let run = |more: &[&str]| {
        let out = tandem()
            .args(["generate", "--model"])
            .arg(tandem_testkit::smollm2())
            .args(["--prompt", "def add(a, b):\n    return a + b\n\ndef add(a, b):", "--max-tokens", "40"])
            .args(["--temperature", "0", "--kv-dtype", "f16"])
            .args(more)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let plain = run(&[]);
    assert!(!plain.trim().is_empty());
    assert_eq!(run(&["--spec", "ngram"]), plain);
    let bad = tandem().args(["generate", "--prompt", "x", "--kv-dtype", "f8"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("f16"));
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let out = tandem().args(["generate", "--model", "/no/such/model.gguf", "--prompt", "x"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/model.gguf") && stderr.contains("no such file"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let model = tiny_model();
    let out = tandem().args(["generate", "--top-p", "0", "--prompt", "x", "--model"]).arg(&model).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
}

/// Structured output on the command line: the random tiny model writes only what the grammar
/// allows; a grammar that does not compile is a clear error.
#[test]
fn generate_holds_the_output_to_a_grammar() {
    let model = tiny_model();
    for (flag, value) in [("--regex", "[a-z]{2,5}-[0-9]{2}"), ("--choice", "north,south,east west")] {
        let out = tandem()
            .args(["generate", "--max-tokens", "20", "--temperature", "0.9", "--seed", "4", "--prompt", "the cat"])
            .args([flag, value, "--model"])
            .arg(&model)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        let ok = match flag {
            "--regex" => regex_like(&text),
            _ => ["north", "south", "east west"].contains(&text.as_str()),
        };
        assert!(ok, "{flag} {value}: {text:?}");
    }
    let out = tandem()
        .args(["generate", "--prompt", "x", "--json-schema", "{\"type\": \"object\", \"properties\": 3}", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("invalid grammar") && !stderr.contains("panicked"), "{stderr}");
}

/// `[a-z]{2,5}-[0-9]{2}`, checked by hand (an independent reading of the pattern).
fn regex_like(text: &str) -> bool {
    let Some((word, digits)) = text.split_once('-') else { return false };
    (2..=5).contains(&word.len())
        && word.chars().all(|c| c.is_ascii_lowercase())
        && digits.len() == 2
        && digits.chars().all(|c| c.is_ascii_digit())
}

#[test]
fn bench_grammar_prints_its_table_and_json() {
    let dir = std::env::temp_dir().join(format!("tandem-bench-grammar-{}", std::process::id()));
    let json = dir.join("grammar.json");
    let out = tandem()
        .args(["bench", "grammar", "--max-tokens", "24", "--model"])
        .arg(tiny_model())
        .arg("--out")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("json_schema") && table.contains("regex") && !table.contains(" NO"), "{table}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["rows"].as_array().unwrap().len(), 3, "{v}");
    std::fs::remove_dir_all(dir).ok();
}

/// A self-distillation run stopped part way (`--stop-after`) and run again goes on from its saved
/// state and answers, and writes the same drafter, bit for bit, as a run that never stopped;
/// another command does not mix into its progress.
#[test]
fn train_drafter_goes_on_after_a_stop() {
    let dir = std::env::temp_dir().join(format!("tandem-train-resume-{}", std::process::id()));
    let model = tandem_testkit::smollm2();
    let run = |out: &str, more: &[&str]| {
        let args = ["train-drafter", "--self-distill", "12", "--answer-tokens", "8", "--steps", "6"];
        let out = tandem()
            .args(args)
            .args(["--checkpoint-every", "2", "--report-every", "2", "--train-batch", "32", "--replay-positions", "50"])
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(dir.join(out))
            .args(more)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, log) = run("whole", &[]);
    assert!(ok, "{log}");
    let (ok, log) = run("parts", &["--stop-after", "3"]);
    assert!(ok && log.contains("stopped after step 3"), "{log}");
    assert!(!dir.join("parts/model.safetensors").exists(), "{log}");
    let (ok, log) = run("parts", &["--seed", "3"]);
    assert!(!ok && log.contains("holds the progress of another run"), "{log}");
    let (ok, log) = run("parts", &[]);
    assert!(ok && log.contains("continuing from step 3"), "{log}");
    // The answers were kept, not made again.
    assert!(log.contains("part 1 of 1: kept from an earlier run"), "{log}");
    for f in ["model.safetensors", "config.json"] {
        let (a, b) =
            (std::fs::read(dir.join("whole").join(f)).unwrap(), std::fs::read(dir.join("parts").join(f)).unwrap());
        assert!(a == b, "{f} differs between the run in parts and the whole run");
    }
    assert!(!dir.join("parts/progress").exists(), "the progress outlived the run");
    std::fs::remove_dir_all(dir).ok();
}
