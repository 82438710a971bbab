// Ad-hoc: repeated forward_backward for profiling. args: model mode(lora|full) fwd|bwd reps batch len ; env Q=1 quantized base
use std::collections::BTreeMap;
use std::time::Instant;
use tandem_cli::{load_model, models, DtypeArg};
use tandem_models::lora::{LoraSpec, LoraTargets};
use tandem_train::{Datum, LossFn, Mode, TrainingModel};
fn main() -> anyhow::Result<()> {
    if std::env::var("GLIBC").is_err() {
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(
                libc::M_TRIM_THRESHOLD,
                std::env::var("TRIM").map(|v| v.parse().unwrap()).unwrap_or(i32::MAX),
            );
            libc::mallopt(libc::M_TOP_PAD, 512 << 20);
        }
    }
    let a: Vec<String> = std::env::args().collect();
    let path = models::resolve(Some(&a[1]))?;
    let dt = if std::env::var("Q").is_ok() { DtypeArg::Auto } else { DtypeArg::F32 };
    let base = load_model(&path, &dt.load_options(candle_core::Device::Cpu))?.model;
    let mode = if a[2] == "full" {
        Mode::Full
    } else {
        Mode::Lora(LoraSpec {
            rank: 16,
            alpha: 32.0 as _,
            targets: LoraTargets { attn: true, mlp: true, unembed: true },
        })
    };
    let fwd = a[3] == "fwd";
    let reps: usize = a[4].parse()?;
    let (batch, len): (usize, usize) = (a[5].parse()?, a[6].parse()?);
    let vocab = base.config.vocab_size;
    let data: Vec<Datum> = (0..batch)
        .map(|i| {
            let ids: Vec<u32> = (0..=len).map(|j| ((i * 7919 + j * 104729 + 13) % vocab) as u32).collect();
            Datum { tokens: ids[..len].to_vec(), targets: ids[1..].to_vec(), inputs: BTreeMap::new() }
        })
        .collect();
    let mut t = TrainingModel::new(&base, mode, 0)?;
    t.forward_backward(&data, &LossFn::CrossEntropy, fwd)?;
    for _ in 0..reps {
        if std::env::var("DISCARD").is_ok() {
            t.discard_gradients();
        }
        let cpu0 = cpu();
        let s = Instant::now();
        t.forward_backward(&data, &LossFn::CrossEntropy, fwd)?;
        let e = s.elapsed().as_secs_f64();
        println!("{:.3} s  {:.1} tok/s  cpu {:.2} cores", e, (batch * len) as f64 / e, (cpu() - cpu0) / e);
    }
    if std::env::var("OPT").is_ok() {
        for _ in 0..3 {
            t.forward_backward(&data, &LossFn::CrossEntropy, false)?;
            let s = Instant::now();
            t.optim_step(&tandem_train::AdamParams { grad_clip_norm: 1.0, ..Default::default() })?;
            println!("optim_step {:.3} s", s.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

fn cpu() -> f64 {
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(r.ru_utime) + tv(r.ru_stime)
}
#[path = "../../tandem/src/memory.rs"]
#[allow(dead_code)]
mod memory;
#[global_allocator]
static GLOBAL: memory::Allocator = memory::Allocator;
