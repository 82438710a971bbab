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
