//! Real text that can be had offline, written by people (no model here wrote it): calibration
//! defaults to the Python Language Reference that ships inside every CPython
//! (`pydoc_data/topics.py`, ~460k characters of prose and examples); held-out evaluation
//! defaults to CPython's LICENSE.txt (the licence and the history of Python's releases), a
//! different document. Both are read through the `python3` on PATH (`$PYTHON`).
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn python_output(code: &str, what: &str) -> Result<String, String> {
    let out = Command::new(python())
        .args(["-c", code])
        .output()
        .map_err(|e| format!("running {} for {what}: {e}; give text files instead", python()))?;
    if !out.status.success() {
        return Err(format!("{} could not read {what}: {}", python(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("{what}: {e}"))
}

/// The Python Language Reference's topics, one after another.
pub fn python_reference() -> Result<String, String> {
    python_output(
        "import pydoc_data.topics as t\nfor k in sorted(t.topics): print(t.topics[k])",
        "the Python Language Reference (pydoc_data.topics)",
    )
}

/// CPython's LICENSE.txt.
pub fn python_license() -> Result<String, String> {
    python_output(
        "import os; print(open(os.path.join(os.path.dirname(os.__file__), 'LICENSE.txt')).read())",
        "CPython's LICENSE.txt",
    )
}

/// The text of files and folders (every file inside, sorted by path), one after another.
pub fn read_paths(paths: &[PathBuf]) -> Result<String, String> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut text = String::new();
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        text.push_str(&String::from_utf8_lossy(&bytes));
        text.push('\n');
    }
    if text.trim().is_empty() {
        return Err("the calibration text is empty".into());
    }
    Ok(text)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out)?;
        }
        Ok(())
    } else if p.is_file() {
        out.push(p.to_path_buf());
        Ok(())
    } else {
        Err(format!("{}: no such file or folder", p.display()))
    }
}
