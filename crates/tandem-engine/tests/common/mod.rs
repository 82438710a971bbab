//! Shared by the engine's integration tests: the tiny random checkpoints, generated once per test
//! binary by tests/reference/make_tiny.py.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The folder holding every tiny checkpoint (one subfolder each).
pub fn tiny_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("tandem-engine-tiny-{}", std::process::id()));
        let ok = Command::new("python3").arg(root.join("tests/reference/make_tiny.py")).arg(&dir).status().unwrap();
        assert!(ok.success(), "make_tiny.py failed");
        dir
    })
}
