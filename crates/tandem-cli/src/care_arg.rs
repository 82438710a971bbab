//! The arguments and steps a KV conversion shares between `tandem convert care` and
//! `tandem bench care`: the calibration text, its windows, the covariance pass and the
//! decompositions, each with a progress bar.
use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use tandem_care::{Calibration, LayerSpectra, Method};
use tandem_models::{LoadedModel, Model};

#[derive(clap::Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// Calibration text: files or folders (every file inside). Default: the Python Language
    /// Reference shipped with CPython (pydoc_data/topics.py, read through python3), text people
    /// wrote, not a model.
    #[arg(long, num_args = 1..)]
    pub calibration: Vec<PathBuf>,
    /// Calibration tokens, taken as windows of --calibration-window tokens at seeded random
    /// offsets (the CARE paper: 256 windows of 32).
    #[arg(long, default_value_t = tandem_care::DEFAULT_TOKENS)]
    pub calibration_tokens: usize,
    #[arg(long, default_value_t = tandem_care::DEFAULT_WINDOW)]
    pub calibration_window: usize,
}

/// A progress bar for `what`, counting `unit`.
pub fn bar(what: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(1);
    let template = format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}}");
    bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}

/// The calibration text (the files given, else the default) as the model's tokens.
pub fn calibration_tokens(loaded: &LoadedModel, args: &CalibrationArgs) -> Result<Vec<u32>> {
    let text = match args.calibration.is_empty() {
        true => tandem_care::text::python_reference(),
        false => tandem_care::text::read_paths(&args.calibration),
    }
    .map_err(|e| anyhow!(e))?;
    encode(loaded, &text)
}

/// Text as the model's token ids.
pub fn encode(loaded: &LoadedModel, text: &str) -> Result<Vec<u32>> {
    Ok(loaded.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
}

/// The covariance pass over the calibration windows.
pub fn calibrate(model: &Model, tokens: &[u32], args: &CalibrationArgs) -> Result<Calibration> {
    if args.calibration_tokens < args.calibration_window {
        bail!("--calibration-tokens must be at least one window ({})", args.calibration_window);
    }
    let count = args.calibration_tokens / args.calibration_window;
    let windows = tandem_care::windows(tokens, args.calibration_window, count).map_err(|e| anyhow!(e))?;
    let bar = bar(&format!("calibrating on {} tokens", count * args.calibration_window), "batches");
    let cal = tandem_care::calibrate(model, &windows, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(cal?)
}

/// Every layer's K and V spectra under `method`.
pub fn spectra(model: &Model, cal: &Calibration, method: Method) -> Result<Vec<LayerSpectra>> {
    let bar = bar(&format!("decomposing ({})", method.name()), "layers");
    let s = tandem_care::spectra(model, cal, method, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(s?)
}

/// The average rank from `--rank` or `--kv-ratio` (the cache's size reduction: kv_size / rank).
pub fn average_rank(model: &Model, rank: Option<usize>, kv_ratio: Option<f64>) -> Result<usize> {
    let width = model.config.kv_size();
    let r = match (rank, kv_ratio) {
        (Some(r), None) => r,
        (None, Some(x)) if x >= 1.0 => (width as f64 / x).round() as usize,
        (None, Some(x)) => bail!("--kv-ratio {x} would grow the cache: give a ratio of at least 1"),
        (None, None) => bail!("give --rank (average per K and per V, at most {width}) or --kv-ratio"),
        (Some(_), Some(_)) => bail!("give --rank or --kv-ratio, not both"),
    };
    if r == 0 || r > width {
        bail!(
            "rank {r} is outside 1..={width} (this model's K/V width: {} KV heads x {})",
            model.config.num_kv_heads,
            model.config.head_dim
        );
    }
    Ok(r)
}
