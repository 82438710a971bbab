//! Tensor operations of the transformer, each with one CPU implementation (fused kernels over
//! plain slices, run as candle custom ops) and one device-generic implementation built from candle
//! primitives (used on CUDA, and on CPU by the tests that prove both paths agree).
//!
//! This is the one place where the hardware decides the code path.
pub mod adamw;
mod grad;
pub mod head;
pub mod kernels;
pub mod latent;
pub mod layer;
pub mod lora;
mod products;
pub mod quant;
pub mod sink;
mod sum;
pub mod team;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp2, Layout, Shape, Storage, Tensor, D,
};
/// Query rows per block of the training attention backward (its memory is linear in t).
pub use grad::BWD_QUERY_BLOCK as ATTENTION_BWD_QUERY_BLOCK;
use kernels::KvElem;
pub use kernels::{CacheGeometry, TokenSlot};
use products::{gemm, gemm_new, gemm_on};
use std::sync::Arc;
pub use sum::add;

type CResult<T> = candle_core::Result<T>;

/// Which implementation the ops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpsPath {
    /// Fused CPU kernels (only on a CPU device).
    CpuKernels,
    /// candle primitives: any device.
    Generic,
}

impl OpsPath {
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            OpsPath::CpuKernels
        } else {
            OpsPath::Generic
        }
    }
}

/// Runs `f` (a whole forward) with the compute team helping its parallel loops (see `team`):
/// the ~150 products of a decode step then split work between threads that are already awake
/// instead of waking pool threads for each. A forward that finds the team busy (another model's
/// forward at the same moment) runs on the kernels' rayon pool; a caller already on a pool (the
/// drafter's trainer runs on its own low-priority one) keeps its own.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    if rayon::current_thread_index().is_some() {
        return f();
    }
    team::lead(f, |f| {
        let pool = POOL.get_or_init(|| {
            rayon::ThreadPoolBuilder::new().thread_name(|i| format!("tandem-compute-{i}")).build().ok()
        });
        match pool {
            Some(p) => p.install(f),
            None => f(),
        }
    })
}

/// The f32 values of a CPU tensor borrowed through its storage guard (no copy).
pub(crate) fn host<'a>(guard: &'a (candle_core::StorageRef<'a>, &'a candle_core::Layout)) -> CResult<&'a [f32]> {
    host_of::<f32>(guard)
}

/// The values of a CPU tensor of element type T borrowed through its storage guard (no copy).
pub(crate) fn host_of<'a, T: candle_core::WithDType>(
    guard: &'a (candle_core::StorageRef<'a>, &'a candle_core::Layout),
) -> CResult<&'a [T]> {
    let (storage, layout) = guard;
    let Storage::Cpu(cpu) = &**storage else { candle_core::bail!("tandem kernels need CPU tensors") };
    let v = cpu.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("tandem kernels need contiguous tensors"),
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("tandem kernels need contiguous f32 tensors"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> CResult<&'a mut [f32]> {
    let (a, b) = match l.contiguous_offsets() {
        Some(o) => o,
        None => candle_core::bail!("tandem kernels need contiguous f32 tensors"),
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("tandem kernels need f32 tensors"),
    }
}

// ---------------------------------------------------------------- embedding

/// Rows `ids` of a table [rows, cols] (an embedding lookup). On the CPU kernels a trained f32
/// table gathers through an op whose backward adds each row's gradient into the trainer's sum (one
/// row per token), where candle's index_select backward builds a dense table-sized gradient per
/// pass.
pub fn gather_rows(table: &Tensor, ids: &[u32], path: OpsPath) -> CResult<Tensor> {
    if path == OpsPath::CpuKernels && table.track_op() && table.dtype() == DType::F32 {
        return table.apply_op1(GatherRows(ids.to_vec()));
    }
    table.index_select(&Tensor::from_vec(ids.to_vec(), ids.len(), table.device())?, 0)
}

struct GatherRows(Vec<u32>);

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "tandem-gather-rows"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let table = f32_slice(s, l)?;
        let mut out = Vec::with_capacity(self.0.len() * cols);
        for &id in &self.0 {
            if id as usize >= rows {
                candle_core::bail!("row {id} is outside the table ({rows} rows)");
            }
            out.extend_from_slice(&table[id as usize * cols..(id as usize + 1) * cols]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.0.len(), cols))))
    }
    fn bwd(&self, table: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        grad::gather_rows_bwd(table, &self.0, g)
    }
}

// ---------------------------------------------------------------- linear

struct StreamingMatmul;

impl CustomOp2 for StreamingMatmul {
    fn name(&self) -> &'static str {
        "tandem-streaming-matmul"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let ((m, k), n) = (l1.shape().dims2()?, l2.shape().dims2()?.0);
        let y = dense_rows(f32_slice(s1, l1)?, m, k, s2, l2)?;
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        grad::matmul_xwt_bwd(x, w, g)
    }
}

/// A frozen projection of host rows x [m, k] into a new [m, out] vector: the streaming or
/// quantized kernel's own output, its bias added in place (the same values as `Linear::forward`
/// on the CPU kernels, without a tensor to copy out of). Other layouts go through `forward`.
pub(crate) fn linear_rows(l: &crate::linear::Linear, x: &[f32], m: usize, k: usize) -> CResult<Vec<f32>> {
    use crate::linear::Linear;
    let (mut y, bias) = match l {
        Linear::Dense { weight, bias } if matches!(weight.dtype(), DType::F32 | DType::BF16) => {
            let guard = weight.storage_and_layout();
            let Storage::Cpu(w) = &*guard.0 else { candle_core::bail!("linear rows: weights must be on the CPU") };
            (dense_rows(x, m, k, w, guard.1)?, bias)
        }
        Linear::Quantized { weight, bias } => (quant::matmul_xwt_new(x, weight, m), bias),
        other => {
            let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
            return other.forward(&xt, OpsPath::CpuKernels)?.flatten_all()?.to_vec1();
        }
    };
    if let Some(b) = bias {
        let b: Vec<f32> = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        y.chunks_exact_mut(b.len()).for_each(|row| row.iter_mut().zip(&b).for_each(|(o, b)| *o += b));
    }
    Ok(y)
}

/// x [m, k] times a dense f32 or bf16 weight [n, k] (as stored) transposed, by the streaming
/// kernel, into a new [m, n] vector.
fn dense_rows(x: &[f32], m: usize, k: usize, w: &CpuStorage, l: &Layout) -> CResult<Vec<f32>> {
    let (n, kw) = l.shape().dims2()?;
    if k != kw {
        candle_core::bail!("matmul inner dims differ: {k} vs {kw}");
    }
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("matmul weights must be contiguous") };
    match w {
        CpuStorage::F32(w) => Ok(kernels::matmul_xwt(x, &w[a..b], m, k, n)),
        CpuStorage::BF16(w) => Ok(kernels::matmul_xwt(x, &w[a..b], m, k, n)),
        _ => candle_core::bail!("matmul weights must be f32 or bf16"),
    }
}

/// True when a product of these tensors must be recorded for a backward pass.
fn differentiated(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// x: [m, k] (f32) times w: [n, k] (f32 or bf16) transposed -> [m, n] f32.
///
/// On CPU every product goes through the streaming kernel, whatever m: it is as fast as candle's
/// gemm at prefill sizes here (measured: within noise on SmolLM2, ~20% slower on Qwen2.5-0.5B) and
/// far faster at decode sizes, and its results do not depend on m, so a sequence's logits are the
/// same whether it is batched with others, chunked differently, or run alone.
pub fn matmul_xwt(x: &Tensor, w: &Tensor, path: OpsPath) -> CResult<Tensor> {
    match (path, w.dtype()) {
        (OpsPath::CpuKernels, DType::BF16 | DType::F32) if differentiated(&[x, w]) => {
            x.contiguous()?.apply_op2(w, StreamingMatmul)
        }
        (OpsPath::CpuKernels, DType::BF16 | DType::F32) => x.contiguous()?.apply_op2_no_bwd(w, &StreamingMatmul),
        (_, DType::F32) => x.matmul(&w.t()?),
        // The generic path on CPU (tests): widen, as candle's CPU gemm has no bf16.
        (_, _) if x.device().is_cpu() => x.matmul(&w.to_dtype(DType::F32)?.t()?),
        (_, dtype) => x.to_dtype(dtype)?.matmul(&w.t()?)?.to_dtype(DType::F32),
    }
}

/// x·wᵀ with w block-quantized; the weight is frozen (its gradient is never asked for), the
/// input's gradient is g·w.
struct QuantizedMatmul(Arc<quant::QWeight>);

impl CustomOp1 for QuantizedMatmul {
    fn name(&self) -> &'static str {
        "tandem-quantized-matmul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.0.cols {
            candle_core::bail!("quantized matmul: input has {k} columns, the weight {}", self.0.cols);
        }
        let y = quant::matmul_xwt_new(f32_slice(s, l)?, &self.0, m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.rows))))
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad::quantized_matmul_bwd(&self.0, g)?))
    }
}

/// The whole weight as a dense f32 tensor [rows, cols] (backward passes, the generic path).
fn dequantized(w: &quant::QWeight, device: &Device) -> CResult<Tensor> {
    Tensor::from_vec(w.dequantize(), (w.rows, w.cols), device)
}

/// x: [m, k] (f32) times the quantized w: [n, k] transposed -> [m, n] f32. On CPU the input rows
/// are quantized to 8 bits and multiplied in integers (`quant`); the generic path multiplies by
/// the dequantized weight in f32 (the reference the tests compare with).
pub fn quantized_matmul_xwt(x: &Tensor, w: &Arc<quant::QWeight>, path: OpsPath) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels if differentiated(&[x]) => x.contiguous()?.apply_op1(QuantizedMatmul(w.clone())),
        OpsPath::CpuKernels => x.contiguous()?.apply_op1_no_bwd(&QuantizedMatmul(w.clone())),
        OpsPath::Generic => x.matmul(&dequantized(w, x.device())?.t()?),
    }
}

// ---------------------------------------------------------------- rms norm

struct RmsNorm {
    eps: f32,
}

/// dst [cols, rows] = src [rows, cols] transposed, 64 of src's rows at a time (read once, written
/// as `cols` short runs).
pub(crate) fn transpose_into(src: &[f32], (rows, cols): (usize, usize), dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols, "transpose: buffers too small");
    for i0 in (0..rows).step_by(64) {
        for j in 0..cols {
            for i in i0..(i0 + 64).min(rows) {
                dst[j * rows + i] = src[i * cols + j];
            }
        }
    }
}

/// Rows per work item of `rows_new`.
const ROW_BLOCK: usize = 16;

/// A new vector of `rows` rows `width` values wide, each block of rows written by
/// `fill(first_row, block)` on the team, in parallel (the block arrives zeroed). Serial
/// `vec![0; n]` zeroing and serial row loops over activations were most of a training pass's
/// main-thread time, while both pool threads waited.
pub(crate) fn rows_new(rows: usize, width: usize, fill: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    // SAFETY: every block is zeroed before `fill` sees it.
    unsafe { rows_in_blocks(rows, width, true, fill) }
}

/// `rows_new` for a `fill` that writes every value of its block: the blocks are not zeroed
/// first (that zeroing was 2-3.5% of a training pass, docs/performance.md).
///
/// # Safety
/// `fill(first_row, block)` writes every value of `block` before it reads any.
pub(crate) unsafe fn rows_written(rows: usize, width: usize, fill: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    rows_in_blocks(rows, width, false, fill)
}

/// # Safety
/// With `zero` false, `fill` must write every value of its block before reading any.
unsafe fn rows_in_blocks(rows: usize, width: usize, zero: bool, fill: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(rows * width);
    let base = kernels::SharedMut(out.as_mut_ptr());
    team::for_each(rows.div_ceil(ROW_BLOCK), &|b| {
        #[allow(clippy::redundant_locals)]
        let base = &base;
        let (r0, r1) = (b * ROW_BLOCK, ((b + 1) * ROW_BLOCK).min(rows));
        // SAFETY: blocks are disjoint and within the capacity; each is zeroed before it is read,
        // or (the caller's promise) written before it is read.
        let block = unsafe {
            let p = base.0.add(r0 * width);
            if zero {
                std::ptr::write_bytes(p, 0, (r1 - r0) * width);
            }
            std::slice::from_raw_parts_mut(p, (r1 - r0) * width)
        };
        fill(r0, block);
    });
    // SAFETY: every block was written above.
    unsafe { out.set_len(rows * width) };
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "tandem-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1)?;
        let w = f32_slice(s2, l2)?;
        if x.len() % w.len() != 0 {
            candle_core::bail!("rms norm: {} values do not split into rows of {}", x.len(), w.len());
        }
        let width = w.len();
        // SAFETY: rms_norm writes each row of its block.
        let out = unsafe {
            rows_written(x.len() / width, width, &|r0, o| {
                kernels::rms_norm(&x[r0 * width..r0 * width + o.len()], w, self.eps, o);
            })
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        grad::rms_norm_bwd(x, w, g, self.eps as f64)
    }
}

/// RMSNorm over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, path: OpsPath) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels if differentiated(&[x, weight]) => {
            x.contiguous()?.apply_op2(weight, RmsNorm { eps: eps as f32 })
        }
        OpsPath::CpuKernels => x.contiguous()?.apply_op2_no_bwd(weight, &RmsNorm { eps: eps as f32 }),
        OpsPath::Generic => {
            let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
        }
    }
}

// ---------------------------------------------------------------- rope

/// cos/sin of every position up to the cache capacity, [max_pos, rotary_dim / 2].
#[derive(Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    cos_host: Arc<Vec<f32>>,
    sin_host: Arc<Vec<f32>>,
    pub interleaved: bool,
}

impl RopeTables {
    pub fn new(head_dim: usize, theta: f64, max_pos: usize, interleaved: bool, device: &Device) -> CResult<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let inv_freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let angle = p as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_slice(&cos, (max_pos, half), device)?,
            sin: Tensor::from_slice(&sin, (max_pos, half), device)?,
            cos_host: Arc::new(cos),
            sin_host: Arc::new(sin),
            interleaved,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

struct Rope<'a> {
    tables: &'a RopeTables,
    positions: &'a [usize],
}

impl CustomOp1 for Rope<'_> {
    fn name(&self) -> &'static str {
        "tandem-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_t, heads, d) = l.shape().dims3()?;
        let mut x = f32_slice(s, l)?.to_vec();
        kernels::rope(
            &mut x,
            heads,
            d,
            self.positions,
            &self.tables.cos_host,
            &self.tables.sin_host,
            self.tables.interleaved,
        );
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }
}

/// Rotary embedding of x: [tokens, heads, head_dim], token t at positions[t].
pub fn rope(x: &Tensor, positions: &[usize], tables: &RopeTables, path: OpsPath) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels if x.track_op() => {
            x.contiguous()?.apply_op1(grad::RopeGrad { tables: tables.clone(), positions: positions.to_vec() })
        }
        OpsPath::CpuKernels => x.contiguous()?.apply_op1_no_bwd(&Rope { tables, positions }),
        OpsPath::Generic => {
            let (t, h, d) = x.dims3()?;
            let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
            let idx = Tensor::from_vec(idx, t, x.device())?;
            let cos = tables.cos.index_select(&idx, 0)?.unsqueeze(1)?; // [t, 1, d/2]
            let sin = tables.sin.index_select(&idx, 0)?.unsqueeze(1)?;
            if tables.interleaved {
                let pairs = x.reshape((t, h, d / 2, 2))?;
                let a = pairs.narrow(3, 0, 1)?.squeeze(3)?;
                let b = pairs.narrow(3, 1, 1)?.squeeze(3)?;
                let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
                let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
                Tensor::stack(&[ra, rb], 3)?.reshape((t, h, d))
            } else {
                let a = x.narrow(2, 0, d / 2)?;
                let b = x.narrow(2, d / 2, d / 2)?;
                let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
                let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
                Tensor::cat(&[ra, rb], 2)
            }
        }
    }
}

// ---------------------------------------------------------------- mlp activation

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "tandem-silu-mul"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (t, two_i) = l.shape().dims2()?;
        let x = f32_slice(s, l)?;
        // SAFETY: silu_mul writes each row of its block.
        let out = unsafe {
            rows_written(t, two_i / 2, &|r0, o| {
                kernels::silu_mul(&x[r0 * two_i..r0 * two_i + 2 * o.len()], two_i / 2, o)
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((t, two_i / 2))))
    }
    fn bwd(&self, gate_up: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        grad::silu_mul_bwd(gate_up, g)
    }
}

/// silu(gate) * up for rows laid out as [gate | up].
pub fn silu_mul(gate_up: &Tensor, path: OpsPath) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels if gate_up.track_op() => gate_up.contiguous()?.apply_op1(SiluMul),
        OpsPath::CpuKernels => gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul),
        OpsPath::Generic => {
            let inter = gate_up.dim(1)? / 2;
            let gate = gate_up.narrow(1, 0, inter)?;
            let up = gate_up.narrow(1, inter, inter)?;
            candle_core::Tensor::silu(&gate)? * up
        }
    }
}

// ---------------------------------------------------------------- KV cache write + attention

struct CacheWrite<'a> {
    tokens: &'a [TokenSlot],
    tables: &'a [Vec<u32>],
    geometry: CacheGeometry,
}

impl InplaceOp2 for CacheWrite<'_> {
    fn name(&self) -> &'static str {
        "tandem-cache-write"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<()> {
        let Some((a, b)) = l1.contiguous_offsets() else { candle_core::bail!("the KV cache must be contiguous") };
        let (tokens, tables, g) = (self.tokens, self.tables, self.geometry);
        // New rows are f32; rows copied within the cache (a moved sibling, a shared block, a
        // snapshot) are of the cache's own type.
        match (s1, s2) {
            (CpuStorage::F32(cache), CpuStorage::F32(_)) => {
                kernels::cache_write(&mut cache[a..b], f32_slice(s2, l2)?, tokens, tables, g, <f32 as KvElem>::put)
            }
            (CpuStorage::F16(cache), CpuStorage::F32(_)) => kernels::cache_write(
                &mut cache[a..b],
                f32_slice(s2, l2)?,
                tokens,
                tables,
                g,
                <half::f16 as KvElem>::put,
            ),
            (CpuStorage::F16(cache), CpuStorage::F16(rows)) => {
                let Some((c, e)) = l2.contiguous_offsets() else { candle_core::bail!("cache rows must be contiguous") };
                kernels::cache_write(&mut cache[a..b], &rows[c..e], tokens, tables, g, |d, s| d.copy_from_slice(s))
            }
            _ => candle_core::bail!("a KV cache holds f32 or f16, and takes f32 rows or its own"),
        }
        Ok(())
    }
}

/// Writes rows [tokens, kv_heads, head_dim] in place into a cache of blocks
/// [blocks, kv_heads, block, head_dim], at each token's position in its slot's block table.
pub fn cache_write(
    cache: &Tensor,
    rows: &Tensor,
    tokens: &[TokenSlot],
    tables: &[Vec<u32>],
    path: OpsPath,
) -> CResult<()> {
    let (_blocks, kv_heads, block, head_dim) = cache.dims4()?;
    let geometry = CacheGeometry { kv_heads, block, head_dim };
    match path {
        OpsPath::CpuKernels => cache.inplace_op2(&rows.contiguous()?, &CacheWrite { tokens, tables, geometry }),
        OpsPath::Generic => {
            let rows = rows.to_dtype(cache.dtype())?;
            let mut idx = Vec::with_capacity(tokens.len() * kv_heads * head_dim);
            for ts in tokens {
                for h in 0..kv_heads {
                    let row = (geometry.at(&tables[ts.slot], h, ts.pos) / head_dim) as u32;
                    idx.extend(std::iter::repeat_n(row, head_dim));
                }
            }
            let n = tokens.len() * kv_heads;
            let idx = Tensor::from_vec(idx, (n, head_dim), cache.device())?;
            let flat = cache.reshape(((), head_dim))?;
            flat.scatter_set(&idx, &rows.reshape((n, head_dim))?.contiguous()?, 0)
        }
    }
}

/// The first `len` positions of a slot, gathered from its blocks: [kv_heads, len, head_dim].
fn gather_blocks(cache: &Tensor, table: &[u32], len: usize) -> CResult<Tensor> {
    let (_blocks, kv_heads, block, head_dim) = cache.dims4()?;
    let used = len.div_ceil(block);
    let ids = Tensor::from_slice(&table[..used], used, cache.device())?;
    let rows = cache.index_select(&ids, 0)?.transpose(0, 1)?.contiguous()?; // [kvh, used, block, d]
    rows.reshape((kv_heads, used * block, head_dim))?.narrow(1, 0, len)
}

struct Attention<'a> {
    tokens: &'a [TokenSlot],
    tables: &'a [Vec<u32>],
    heads: usize,
}

impl CustomOp3 for Attention<'_> {
    fn name(&self) -> &'static str {
        "tandem-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (_blocks, kv_heads, block, head_dim) = l2.shape().dims4()?;
        let geometry = CacheGeometry { kv_heads, block, head_dim };
        let t = self.tokens.len();
        let mut out = vec![0f32; t * self.heads * head_dim];
        let (q, tokens, tables, heads) = (f32_slice(s1, l1)?, self.tokens, self.tables, self.heads);
        match (s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (k, v) = (f32_slice(s2, l2)?, f32_slice(s3, l3)?);
                kernels::attention(q, k, v, tokens, tables, heads, geometry, &mut out)
            }
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let (Some((a, b)), Some((c, e))) = (l2.contiguous_offsets(), l3.contiguous_offsets()) else {
                    candle_core::bail!("the KV cache must be contiguous")
                };
                kernels::attention(q, &k[a..b], &v[c..e], tokens, tables, heads, geometry, &mut out)
            }
            _ => candle_core::bail!("a KV cache holds f32 or f16 keys and values"),
        }
        Ok((CpuStorage::F32(out), Shape::from((t, self.heads * head_dim))))
    }
}

/// Causal attention of q: [tokens, heads, head_dim] over each token's slot in the cache (read
/// through the slot's block table), keys 0..prefix and the token's own (see `TokenSlot`).
/// Returns [tokens, heads * head_dim].
pub fn attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tokens: &[TokenSlot],
    tables: &[Vec<u32>],
    path: OpsPath,
) -> CResult<Tensor> {
    let (t, heads, head_dim) = q.dims3()?;
    match path {
        OpsPath::CpuKernels => q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &Attention { tokens, tables, heads }),
        OpsPath::Generic => {
            let kv_heads = k_cache.dim(1)?;
            let group = heads / kv_heads;
            let scale = 1.0 / (head_dim as f64).sqrt();
            let mut outs = Vec::new();
            // Runs of consecutive positions in one slot share one masked product.
            let plain = |ts: &TokenSlot| ts.prefix >= ts.pos;
            let mut start = 0;
            while start < t {
                let mut end = start + 1;
                while end < t
                    && plain(&tokens[start])
                    && plain(&tokens[end])
                    && tokens[end].slot == tokens[start].slot
                    && tokens[end].pos == tokens[end - 1].pos + 1
                {
                    end += 1;
                }
                let run = end - start;
                let (slot, p0) = (tokens[start].slot, tokens[start].pos);
                let len = p0 + run;
                let k = gather_blocks(k_cache, &tables[slot], len)?.to_dtype(q.dtype())?; // [kvh, len, d]
                let v = gather_blocks(v_cache, &tables[slot], len)?.to_dtype(q.dtype())?;
                let qr = q.narrow(0, start, run)?.transpose(0, 1)?.contiguous()?; // [h, run, d]
                let qr = qr.reshape((kv_heads, group * run, head_dim))?;
                let scores = (qr.matmul(&k.t()?.contiguous()?)? * scale)?; // [kvh, group*run, len]
                let mut mask = vec![0f32; group * run * len];
                // A tree sibling (a run of one) does not see the rows between its prefix and itself.
                let hidden_from = tokens[start].prefix.min(p0);
                for g in 0..group {
                    for i in 0..run {
                        let row = &mut mask[(g * run + i) * len..(g * run + i + 1) * len];
                        row[p0 + i + 1..].fill(f32::NEG_INFINITY);
                        if run == 1 {
                            row[hidden_from..p0].fill(f32::NEG_INFINITY);
                        }
                    }
                }
                let mask = Tensor::from_vec(mask, (group * run, len), q.device())?;
                let scores = scores.broadcast_add(&mask)?;
                let max = scores.max_keepdim(D::Minus1)?;
                let e = scores.broadcast_sub(&max)?.exp()?;
                let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
                let o = p.matmul(&v.contiguous()?)?; // [kvh, group*run, d]
                let o = o.reshape((heads, run, head_dim))?.transpose(0, 1)?.reshape((run, heads * head_dim))?;
                outs.push(o);
                start = end;
            }
            Tensor::cat(&outs, 0)
        }
    }
}

/// Causal self-attention within each of several whole sequences packed one after another
/// (training: gradients flow to q, k and v), q: [t, heads, d], k and v: [t, kv_heads, d] ->
/// [t, heads * d]; `lens` sum to t. On CPU the forward is serving's attention kernel, so a trained
/// sequence's values equal the ones serving computes for it, whatever it is packed with.
/// `kv`: what serving's cache holds; keys and values are rounded as it holds them.
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    kv: crate::config::KvDtype,
    path: OpsPath,
) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels => {
            let op = grad::SelfAttention { lens: lens.to_vec(), kv };
            q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
        }
        OpsPath::Generic => {
            let (k, v) = (&as_cached(k, kv)?, &as_cached(v, kv)?);
            let mut outs = Vec::with_capacity(lens.len());
            let mut start = 0;
            for &n in lens {
                outs.push(generic_self_attention(
                    &q.narrow(0, start, n)?,
                    &k.narrow(0, start, n)?,
                    &v.narrow(0, start, n)?,
                )?);
                start += n;
            }
            Tensor::cat(&outs, 0)
        }
    }
}

/// `self_attention` straight from a layer's projection qkv [t, (heads + 2·kv_heads)·head_dim]
/// of whole sequences (`lens`) at `positions`: q and k roped, v as is -> [t, heads·head_dim]. On
/// CPU one op (its backward writes qkv's gradient directly) with the same values as the split.
pub fn packed_self_attention(
    qkv: &Tensor,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    positions: &[usize],
    tables: &RopeTables,
    lens: &[usize],
    kv: crate::config::KvDtype,
    path: OpsPath,
) -> CResult<Tensor> {
    if path == OpsPath::CpuKernels {
        let op = grad::PackedSelfAttention::new((heads, kv_heads, head_dim), positions, tables, lens, kv);
        let qkv = qkv.contiguous()?;
        return if qkv.track_op() { qkv.apply_op1(op) } else { qkv.apply_op1_no_bwd(&op) };
    }
    let (t, qw, kw) = (qkv.dim(0)?, heads * head_dim, kv_heads * head_dim);
    let q = qkv.narrow(1, 0, qw)?.reshape((t, heads, head_dim))?;
    let k = qkv.narrow(1, qw, kw)?.reshape((t, kv_heads, head_dim))?;
    let v = qkv.narrow(1, qw + kw, kw)?.reshape((t, kv_heads, head_dim))?;
    self_attention(&rope(&q, positions, tables, path)?, &rope(&k, positions, tables, path)?, &v, lens, kv, path)
}

/// x rounded through the cache's element type and back, as a KV cache of that type holds it; the
/// gradient passes the rounding unchanged (x + (r - x) is r exactly: r - x is exact for r this
/// close to x).
pub fn as_cached(x: &Tensor, kv: crate::config::KvDtype) -> CResult<Tensor> {
    if kv.dtype() == x.dtype() {
        return Ok(x.clone());
    }
    let r = x.to_dtype(kv.dtype())?.to_dtype(x.dtype())?;
    x + (r - x)?.detach()
}

fn generic_self_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> CResult<Tensor> {
    let (t, heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let qg = q.transpose(0, 1)?.contiguous()?.reshape((kv_heads, group * t, d))?;
    let kt = k.transpose(0, 1)?.contiguous()?;
    let vt = v.transpose(0, 1)?.contiguous()?;
    let p = grad::causal_probs(&qg, &kt, group)?;
    let o = p.matmul(&vt)?; // [kvh, group*t, d]
    o.reshape((heads, t, d))?.transpose(0, 1)?.reshape((t, heads * d))
}
