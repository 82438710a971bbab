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
