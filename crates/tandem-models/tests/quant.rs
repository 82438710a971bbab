//! The quantized kernels against the `gguf` package: its dequantization of random and real
//! blocks (every supported format), then a float64 product. Every implementation this CPU runs
//! (portable, AVX2, AVX-512 VNNI) is checked, and they must agree bit for bit with each other and
//! whatever the batch size.
mod common;
use common::{model_file, python, repo_root, QWEN_CODER, SMOLLM2};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use tandem_models::ops::quant::{matmul_xwt_with, Isa, QFormat, QWeight};

struct Case {
    name: String,
    weight: QWeight,
    /// gguf's dequantization, [rows, cols].
    reference: Vec<f32>,
}

fn format(name: &str) -> QFormat {
    match name {
        "Q4_0" => QFormat::Q4_0,
        "Q4_1" => QFormat::Q4_1,
        "Q5_0" => QFormat::Q5_0,
        "Q5_1" => QFormat::Q5_1,
        "Q8_0" => QFormat::Q8_0,
        "Q4_K" => QFormat::Q4K,
        "Q5_K" => QFormat::Q5K,
        "Q6_K" => QFormat::Q6K,
        other => panic!("unknown format {other}"),
    }
}

/// Random matrices of every format and real tensors of both default models.
fn cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        tandem_testkit::require_python(&["numpy", "gguf"]);
        let dir = std::env::temp_dir().join(format!("tandem-quant-{}", std::process::id()));
        let o = Command::new(python())
            .arg(repo_root().join("tests/reference/quant_cases.py"))
            .arg(&dir)
            .arg(model_file(SMOLLM2))
            .arg(model_file(QWEN_CODER))
            .output()
            .expect("python3 runs");
        assert!(o.status.success(), "quant_cases.py failed: {}", String::from_utf8_lossy(&o.stderr));
        let list: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
        let read = |name: &str, ext: &str| std::fs::read(dir.join(format!("{name}.{ext}"))).unwrap();
        let cases: Vec<Case> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let name = c["name"].as_str().unwrap().to_string();
                let (rows, cols) = (c["rows"].as_u64().unwrap() as usize, c["cols"].as_u64().unwrap() as usize);
                let weight = QWeight::new(format(c["format"].as_str().unwrap()), rows, cols, read(&name, "q")).unwrap();
                let reference =
                    read(&name, "f32").chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                Case { name, weight, reference }
            })
            .collect();
        let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
        // Eight random matrices and a real tensor of each format the two files hold (Q8_0, Q4_1;
        // Q8_0, Q5_0, Q4_K, Q6_K).
        assert!(cases.len() >= 14, "only {} cases", cases.len());
        cases
    })
}

/// Inputs with a spread of magnitudes (some blocks tiny, some large) and a few exact zeros.
fn inputs(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..m * k)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0;
            let scale = [0.01, 1.0, 30.0][(i / 32) % 3];
            if i % 97 == 0 {
                0.0
            } else {
                (u * scale) as f32
            }
        })
        .collect()
}

#[test]
fn dequantization_equals_gguf() {
    for c in cases() {
        let ours = c.weight.dequantize();
        for (i, (a, b)) in ours.iter().zip(&c.reference).enumerate() {
            // The same value up to the order of one multiply-add (scale·q + offset vs scale·(q - z)).
            let tol = 2e-6 * b.abs().max(1e-3);
            assert!((a - b).abs() <= tol, "{}: value {i}: {a} vs gguf {b}", c.name);
        }
    }
}

/// Every implementation's product of `m` rows of `inputs(m, k)` with the case's weight, each
/// output checked by `check(xr, wr, got, exact)` (the input row, gguf's weight row, the kernel's
/// value and the float64 product); `check` returns the allowed error.
fn check_products(inputs: impl Fn(usize, usize) -> Vec<f32>, ms: &[usize], tolerance: impl Fn(&[f32], &[f32]) -> f64) {
    for c in cases() {
        let (n, k) = (c.weight.rows, c.weight.cols);
        for &m in ms {
            let x = inputs(m, k);
            for isa in Isa::available() {
                let mut y = vec![0f32; m * n];
                matmul_xwt_with(isa, &x, &c.weight, m, &mut y);
                for i in 0..m {
                    for j in 0..n {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &c.reference[j * k..(j + 1) * k]);
                        let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let (got, allowed) = (y[i * n + j] as f64, tolerance(xr, wr));
                        assert!(
                            (got - exact).abs() <= allowed,
                            "{} {isa:?} m={m} [{i},{j}]: {got} vs {exact} (allowed error {allowed})",
                            c.name
                        );
                    }
                }
            }
        }
    }
}

/// Σ|x·w| over a row pair: the scale of float rounding in a product.
fn magnitude(xr: &[f32], wr: &[f32]) -> f64 {
    xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum()
}

#[test]
fn products_match_float64_within_the_input_quantization_bound() {
    // Rounding each input to 8 bits moves it by at most half its block's step (max|x| / 127 / 2),
    // so the product moves by at most Σ_blocks step/2 · Σ|w| over the block; the float sums add a
    // relative 1e-5 of Σ|w·x|.
    let bound = |xr: &[f32], wr: &[f32]| {
        let mut bound = 0f64;
        for (xb, wb) in xr.chunks_exact(32).zip(wr.chunks_exact(32)) {
            let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
            bound += step / 2.0 * wb.iter().map(|w| w.abs() as f64).sum::<f64>();
        }
        bound + 1e-5 * magnitude(xr, wr) + 1e-12
    };
    check_products(|m, k| inputs(m, k, (m * 31 + k) as u64), &[1, 2, 3, 7, 8, 9, 16], bound);
}

/// Inputs the 8-bit quantization holds exactly: integers up to ±127 (each block reaching 127)
/// times a power of two per block.
fn exact_inputs(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let q = if i % 32 == 5 { 127 } else { ((i * 7919 + 13) % 255) as i32 - 127 };
            q as f32 * [0.25f32, 1.0 / 64.0, 2.0][(i / 32) % 3]
        })
        .collect()
}

#[test]
fn with_exactly_quantizable_inputs_products_equal_float64_to_rounding() {
    // Then only the kernels' integer sums and float accumulation are left: any slip in a scale,
    // an offset or a slice's values shows far above this tolerance.
    check_products(exact_inputs, &[1, 5, 8], |xr, wr| 2e-6 * magnitude(xr, wr) + 1e-12);
}

#[test]
fn every_implementation_and_batch_size_gives_the_same_bits() {
    // 13 rows: a full group and a partial one; 3, 6 and 7: partial groups alone; 37: inputs
    // quantized by the team in runs of 16 rows, the last one short.
    for (c, m) in cases().iter().flat_map(|c| [13, 3, 6, 7, 37].map(|m| (c, m))) {
        let (n, k) = (c.weight.rows, c.weight.cols);
        let x = inputs(m, k, 99);
        let mut first: Option<Vec<f32>> = None;
        for isa in Isa::available() {
            let mut all = vec![0f32; m * n];
            matmul_xwt_with(isa, &x, &c.weight, m, &mut all);
            // Each row alone, and rows in a different grouping, give the batch's bits.
            for i in 0..m {
                let mut alone = vec![0f32; n];
                matmul_xwt_with(isa, &x[i * k..(i + 1) * k], &c.weight, 1, &mut alone);
                assert_eq!(alone, all[i * n..(i + 1) * n], "{} {isa:?}: row {i} alone differs", c.name);
            }
            match &first {
                None => first = Some(all),
                Some(f) => assert_eq!(f, &all, "{} {isa:?}: differs from the portable path", c.name),
            }
        }
    }
}

#[test]
fn a_quantized_models_layer_weights_are_its_dequantized_blocks() {
    // Drafters warm-start from the target's last layer: from the quantized default they must get
    // what the f32 load of the same file gives (candle's dequantization there, ours here).
    let file = model_file(SMOLLM2);
    let (dense, quantized) = (common::load_path(&file), common::load_quantized(&file));
    let last = dense.model.config.num_layers - 1;
    let (a, b) = (dense.model.layer_weights(last).unwrap(), quantized.model.layer_weights(last).unwrap());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let scale = t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (t - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff <= 2e-6 * scale, "{name}: differs by {diff} (scale {scale})");
    }
}
