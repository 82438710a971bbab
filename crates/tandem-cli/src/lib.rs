//! What tandem's commands share: model names and where they come from (`models`, the default
//! models' cache and fetch; `hub`, the Hugging Face hub), loading with a progress bar, and the
//! argument groups of serving, speculation, online training and scheduling (one definition each,
//! used by `tandem serve`, `tandem generate`, `tandem train-drafter` and the benchmarks).
pub mod care_arg;
pub mod hub;
pub mod models;
pub mod online_arg;
pub mod schedule_arg;
pub mod spec_arg;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use tandem_models::{Device, LoadOptions, LoadedModel, WeightDtype};

/// How projection weights are held (`--dtype`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum DtypeArg {
    /// GGUF block-quantized weights as the file stores them (the fastest mode, in the file's own
    /// size), every other weight as f32.
    Auto,
    /// Every weight dequantized to f32.
    F32,
    /// Every projection dequantized to bf16 (half of f32's memory traffic; products accumulate
    /// in f32).
    Bf16,
}

impl DtypeArg {
    pub fn load_options(self, device: Device) -> LoadOptions {
        let (keep_quantized, weight_dtype) = match self {
            DtypeArg::Auto => (true, WeightDtype::F32),
            DtypeArg::F32 => (false, WeightDtype::F32),
            DtypeArg::Bf16 => (false, WeightDtype::Bf16),
        };
        LoadOptions { device, keep_quantized, weight_dtype, kv_dtype: Default::default() }
    }

    /// How benchmark tables name the mode.
    pub fn name(self) -> &'static str {
        match self {
            DtypeArg::Auto => "auto",
            DtypeArg::F32 => "f32",
            DtypeArg::Bf16 => "bf16",
        }
    }
}

/// What the KV cache holds (`--kv-dtype`; `tandem_models::KvDtype`, whose default it takes).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum KvDtypeArg {
    /// Keys and values exactly as computed.
    F32,
    /// Half the memory of f32, so a KV budget holds twice the tokens, and a faster decode step
    /// over long contexts; keys and values rounded once, as llama.cpp's default cache does.
    F16,
}

impl From<KvDtypeArg> for tandem_models::KvDtype {
    fn from(a: KvDtypeArg) -> Self {
        match a {
            KvDtypeArg::F16 => tandem_models::KvDtype::F16,
            KvDtypeArg::F32 => tandem_models::KvDtype::F32,
        }
    }
}

impl Default for KvDtypeArg {
    fn default() -> Self {
        match tandem_models::KvDtype::default() {
            tandem_models::KvDtype::F16 => KvDtypeArg::F16,
            tandem_models::KvDtype::F32 => KvDtypeArg::F32,
        }
    }
}

/// `--kv-dtype`, one definition for every command that loads a model to serve or score with it.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct CacheArgs {
    /// What the KV cache holds per key and value number: f32, or f16 (half the memory; llama.cpp's
    /// default cache).
    #[arg(long, value_enum, default_value_t = KvDtypeArg::default())]
    pub kv_dtype: KvDtypeArg,
}

impl CacheArgs {
    pub fn kv(self) -> tandem_models::KvDtype {
        self.kv_dtype.into()
    }

    /// `opts` with this cache type.
    pub fn apply(self, opts: LoadOptions) -> LoadOptions {
        LoadOptions { kv_dtype: self.kv(), ..opts }
    }
}

pub fn device(cuda: Option<usize>) -> Result<Device> {
    match cuda {
        None => Ok(Device::Cpu),
        Some(i) => Device::new_cuda(i).context("opening the CUDA device (was tandem built with --features cuda?)"),
    }
}

/// A progress bar for long work that, where stderr is not a terminal (a background job, CI) and
/// indicatif draws nothing, writes a line every tenth of the way instead.
pub struct Progress {
    bar: ProgressBar,
    what: &'static str,
    tty: bool,
    /// Tenths of the way already reported (without a terminal).
    reported: std::sync::atomic::AtomicU64,
}

impl Progress {
    /// `len` steps of work, each one `what` ("prompts answered by the target").
    pub fn new(len: u64, what: &'static str) -> Self {
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {what} {{msg}} [{{elapsed}} < {{eta}}]"))
                .expect("valid template"),
        );
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress { bar, what, tty, reported: 0.into() }
    }

    pub fn inc(&self, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bar.inc(n);
        let (pos, len) = (self.bar.position(), self.bar.length().unwrap_or(0).max(1));
        let tenth = pos * 10 / len;
        if !self.tty && tenth > self.reported.load(Relaxed) {
            self.reported.store(tenth, Relaxed);
            let secs = self.bar.elapsed().as_secs();
            let message = self.bar.message();
            let sep = if message.is_empty() { "" } else { " " };
            eprintln!("{pos}/{len} {}{sep}{message} [{}m{:02}s]", self.what, secs / 60, secs % 60);
        }
    }

    pub fn set_message(&self, message: String) {
        self.bar.set_message(message);
    }

    /// Runs `f` (which writes its own lines) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    pub fn finish(&self) {
        self.bar.finish();
    }

    pub fn finish_and_clear(&self) {
        self.bar.finish_and_clear();
    }
}

/// Loads a checkpoint with a progress bar.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("loading {}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let loaded = tandem_models::load(path, opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let loaded = loaded?;
    tracing::info!(model = %loaded.name, arch = loaded.model.config.architecture.name(), layers = loaded.model.config.num_layers, "model loaded");
    Ok(loaded)
}

/// Parses sizes like `512MiB`, `2GiB`, `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().with_context(|| format!("`{s}` is not a size like 512MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit `{other}` (use KiB, MiB or GiB)"),
    };
    Ok((num * mult) as usize)
}
