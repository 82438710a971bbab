//! A prompt stream in three domains from material available offline, for `tandem bench online`:
//! - code: top-level functions of the Python standard library found on this machine, to complete
//!   (the signature and first lines given) or to explain;
//! - math: generated arithmetic word problems;
//! - chat: general questions built from topic lists.
//!
//! Deterministic for a seed; the same stream for every configuration a benchmark compares.
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

mod chat;
use chat::{chat_prompts, distill_chat_prompts};

#[derive(Debug, Clone)]
pub struct Prompt {
    pub domain: &'static str,
    pub text: String,
}

/// The standard library folder of the first python3 found (or a common location).
fn stdlib_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    p.join("os.py").exists().then_some(p)
}

/// Top-level functions of 6 to 40 lines from the `.py` files directly in `dir`.
fn functions(dir: &Path) -> Vec<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "py")).collect()
        })
        .unwrap_or_default();
    files.sort();
    functions_in(&files)
}

/// Top-level functions of 6 to 40 lines from `files`.
fn functions_in(files: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if lines[i].starts_with("def ") {
                let mut j = i + 1;
                while j < lines.len()
                    && (lines[j].is_empty() || lines[j].starts_with(' ') || lines[j].starts_with('\t'))
                {
                    j += 1;
                }
                let body: Vec<&str> = lines[i..j].to_vec();
                let body_len = body.iter().rposition(|l| !l.trim().is_empty()).map_or(0, |p| p + 1);
                if (6..=40).contains(&body_len) {
                    out.push(body[..body_len].join("\n"));
                }
                i = j;
            } else {
                i += 1;
            }
        }
    }
    out
}

/// Python files in the standard library's packages (its subfolders; tests, IDLE and installed
/// packages left out): text a drafter can learn the target from before serving. Disjoint from the
/// code prompts, which come from the modules directly in the folder.
pub fn stdlib_package_files() -> Result<Vec<PathBuf>> {
    let Some(dir) = stdlib_dir() else { bail!("no Python standard library found (python3 is needed)") };
    let skip = ["test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"];
    let mut out = Vec::new();
    for p in std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())) {
        if p.is_dir() && !p.file_name().is_some_and(|n| skip.iter().any(|s| n == *s)) {
            files_under(&p, &["py"], &skip, &mut out)?;
        }
    }
    out.sort();
    Ok(out)
}

/// Appends the files under `dir` (recursively, in name order) whose extension is one of `exts`,
/// leaving out folders named in `skip`.
pub fn files_under(dir: &Path, exts: &[&str], skip: &[&str], out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if !p.file_name().is_some_and(|n| skip.iter().any(|s| n == *s)) {
                files_under(&p, exts, skip, out)?;
            }
        } else if p.extension().is_some_and(|e| exts.iter().any(|x| e == *x)) {
            out.push(p);
        }
    }
    Ok(())
}

fn code_prompts(rng: &mut StdRng, n: usize) -> Result<Vec<Prompt>> {
    let Some(dir) = stdlib_dir() else {
        bail!("no Python standard library found (python3 is needed for the code prompts)")
    };
    let funcs = functions(&dir);
    if funcs.len() < 20 {
        bail!("only {} functions found in {}", funcs.len(), dir.display());
    }
    Ok(code_prompts_from(funcs, rng, n))
}

/// `n` prompts to complete or explain one of `funcs` (shuffled).
fn code_prompts_from(mut funcs: Vec<String>, rng: &mut StdRng, n: usize) -> Vec<Prompt> {
    funcs.shuffle(rng);
    (0..n)
        .map(|i| {
            let f = &funcs[i % funcs.len()];
            let text = if i % 2 == 0 {
                let lines: Vec<&str> = f.lines().collect();
                let head = lines[..(lines.len() / 3).max(2)].join("\n");
                format!("Complete this Python function from the standard library. Output only the code.\n\n```python\n{head}\n")
            } else {
                format!("Explain what this Python function does, step by step.\n\n```python\n{f}\n```")
            };
            Prompt { domain: "code", text }
        })
        .collect()
}

fn math_prompts(rng: &mut StdRng, n: usize) -> Vec<Prompt> {
    let names = ["Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"];
    let items = ["apples", "books", "marbles", "stamps", "pencils", "cookies", "coins", "shells"];
    (0..n)
        .map(|_| {
            let who = names[rng.random_range(0..names.len())];
            let other = names[rng.random_range(0..names.len())];
            let item = items[rng.random_range(0..items.len())];
            let (a, b, c) = (rng.random_range(12..500), rng.random_range(2..60), rng.random_range(2..12));
            let text = match rng.random_range(0..5) {
                0 => format!("{who} has {a} {item}. {who} buys {b} more and then gives {c} to {other}. How many {item} does {who} have now? Show your reasoning."),
                1 => format!("A box holds {c} {item}. {who} needs {a} {item}. How many boxes must {who} buy, and how many {item} are left over? Explain."),
                2 => format!("{who} saves {b} dollars every week. How many weeks until {who} has saved {a} dollars? Solve step by step."),
                3 => format!("A train travels at {b} km per hour for {c} hours, then at {} km per hour for {} hours. How far does it travel in total? Show the calculation.", b + 10, c + 1),
                _ => format!("What is {a} multiplied by {b}, minus {c}? Work it out step by step."),
            };
            Prompt { domain: "math", text }
        })
        .collect()
}

/// Prompts for a drafter to learn its target from before serving (`tandem train-drafter
/// --self-distill`): the three domains in the benchmark's proportions, shuffled, code from the
/// standard library's packages (disjoint from the benchmark's code prompts), chat from lists and
/// forms of its own (disjoint from the benchmark's chat), math drawn with their own seed.
pub fn distill_prompts(n: usize, seed: u64) -> Result<Vec<Prompt>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let funcs = functions_in(&stdlib_package_files()?);
    if funcs.len() < 20 {
        bail!("only {} functions found in the standard library's packages", funcs.len());
    }
    let (code, math) = (n / 2, n / 4);
    let mut out = code_prompts_from(funcs, &mut rng, code);
    out.extend(math_prompts(&mut rng, math));
    out.extend(distill_chat_prompts(&mut rng, n - code - math));
    out.shuffle(&mut rng);
    Ok(out)
}

/// The benchmark's stream seed (`tandem bench online`).
pub const STREAM_SEED: u64 = 7;

/// Requests per domain (code, math, chat) of `tandem bench online --reduced`.
pub const REDUCED_DOMAINS: [usize; 3] = [30, 15, 15];

/// `code` code prompts, then `math`, then `chat` (the domain shifts of the benchmark).
pub fn stream(code: usize, math: usize, chat: usize, seed: u64) -> Result<Vec<Prompt>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = code_prompts(&mut rng, code)?;
    out.extend(math_prompts(&mut rng, math));
    out.extend(chat_prompts(&mut rng, chat));
    Ok(out)
}

/// Each prompt as the user's message in the model's chat template, tokenized.
pub fn chat_ids(loaded: &tandem_models::LoadedModel, prompts: &[Prompt]) -> Result<Vec<Vec<u32>>> {
    use tandem_runtime::{ChatTemplate, Message};
    let template =
        ChatTemplate::new(loaded.chat_template.as_deref(), loaded.bos_token.as_deref(), loaded.eos_token.as_deref())
            .map_err(anyhow::Error::msg)?;
    prompts
        .iter()
        .map(|p| {
            let text = template.render(&[Message::new("user", &p.text)], true).map_err(anyhow::Error::msg)?;
            Ok(loaded.tokenizer.encode(text.as_str(), false).map_err(anyhow::Error::msg)?.get_ids().to_vec())
        })
        .collect()
}
