//! What tandem's tests share: the tiny random Hugging Face checkpoints (Llama, Qwen2 and Qwen3
//! shapes: GQA, tied and untied embeddings, q/k norm, qkv bias, f32 / f16 / bf16 storage, a
//! sharded variant), written once per test process by Rust (`tiny`, so the engine's, scheduler's,
//! speculator's and trainer's tests need no Python), and the Python interpreter the
//! independent-reference tests run (numpy, the gguf package, llama.cpp, the API clients).
pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every tiny checkpoint, by folder name.
pub const TINY: [&str; 10] = {
    let c = tiny::CHECKPOINTS;
    [c[0].name, c[1].name, c[2].name, c[3].name, c[4].name, c[5].name, c[6].name, c[7].name, c[8].name, c[9].name]
};

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root")
}

/// The default model's GGUF file in tandem's model cache (`$TANDEM_CACHE`, else
/// ~/.cache/tandem/models); fails the test with what to run when it is missing.
pub fn smollm2() -> PathBuf {
    let dir = match std::env::var_os("TANDEM_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/tandem/models"),
    };
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-models.sh (CI does)", p.display());
    p
}

/// `$PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A Python process that runs `script` (a path from the repository's root).
///
/// The OpenAI SDK builds its pydantic response models on first use unless
/// `DEFER_PYDANTIC_BUILD=false`, and that build is not thread-safe: a script whose first requests
/// ran in threads failed at random in CI ("BaseModel cannot be instantiated directly", pydantic
/// 2.13). Here they are built at import, before any thread starts.
pub fn python_script(script: &str) -> Command {
    let mut cmd = Command::new(python());
    cmd.arg(repo_root().join(script)).env("DEFER_PYDANTIC_BUILD", "false");
    cmd
}

/// Fails the calling test with what to install when Python or one of `modules` is missing
/// (instead of an obscure error further on).
pub fn require_python(modules: &[&str]) {
    let check = format!("import {}", if modules.is_empty() { "sys".to_string() } else { modules.join(", ") });
    let ok = Command::new(python()).args(["-c", &check]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        ok,
        "this test needs {} with {} (the independent reference tools): run .ci/run once, or pip install {}",
        python(),
        if modules.is_empty() { "no extra modules".to_string() } else { modules.join(", ") },
        modules.join(" ")
    );
}

/// A fresh folder `tandem-{tag}-{pid}` in the temp dir for this process. Test processes cannot
/// clean up after themselves (a static is never dropped, a failing test unwinds past its cleanup),
/// so each call first removes the `tandem-{tag}-*` folders of processes that are gone: a test suite
/// run again and again leaves one set of folders, not one per run.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let prefix = format!("tandem-{tag}-");
    let temp = std::env::temp_dir();
    let gone = |pid: &str| Path::new("/proc").is_dir() && !Path::new("/proc").join(pid).exists();
    for entry in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else { continue };
        if pid.parse::<u32>().is_ok() && gone(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = temp.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch folder in the temp dir");
    dir
}

/// The folder holding every tiny checkpoint (one subfolder each), written once per process.
pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("tiny");
        tiny::write_all(&dir).expect("writing the tiny checkpoints");
        dir
    })
}

/// One tiny checkpoint's folder.
pub fn tiny(name: &str) -> PathBuf {
    assert!(TINY.contains(&name), "no tiny checkpoint is called {name}");
    tiny_dir().join(name)
}

/// A copy of tiny checkpoint `name` in a fresh scratch folder `tandem-{tag}-{pid}`, for a test
/// that breaks or edits a checkpoint without touching the shared one.
pub fn tiny_copy(name: &str, tag: &str) -> PathBuf {
    let dst = scratch_dir(tag);
    for f in std::fs::read_dir(tiny(name)).expect("reading a tiny checkpoint") {
        let f = f.expect("reading a tiny checkpoint").path();
        std::fs::copy(&f, dst.join(f.file_name().expect("a file name"))).expect("copying a tiny checkpoint");
    }
    dst
}
