//! The output head fused with the logprob of each target token: what every training loss reads,
//! computed without keeping vocabulary-sized logits.
//!
//! Autograd over plain logits keeps [tokens, vocab] alive several times over (logits, their
//! log-softmax, the gradients of each): 50 MB apiece per 256 tokens on SmolLM2, 155 MB on
//! Qwen2.5, and faulting those pages in was a fifth of a training pass. Here the forward runs the
//! served head over a few rows at a time (the very logits the sampler sees, so the logprobs a
//! training step reports are bit-equal to the sampler's) and keeps only each row's log-sum-exp.
//! The backward recomputes the logits one slice of the vocabulary at a time and folds each slice
//! straight into the gradients of the hidden states and of what the head trains (its dense weight
//! in full training, its adapter with LoRA): memory stays linear in tokens.
//!
//! Every training loss is a sum of per-token terms of the logprob, so a row's loss gradient is
//! known as soon as its logprob is. A trainer that says how (`with_loss_gradient`) gets the
//! backward folded into the forward: each block of rows' logits become their gradients in place
//! and go into the gradients of the hidden states and of what the head trains (adapter, or dense
//! weight summed block by block), and the backward, finding the gradient it was predicted, only
//! hands them over. That saves recomputing the logits (a third of the head's work in a pass:
//! SmolLM2 LoRA 1.0 -> 0.7 s of a 1,024-token pass, full 4.7 -> 4.0 s a pass). Any other
//! gradient (a loss the prediction does not cover) takes the recomputing backward.
use super::{gemm, host, kernels, sink, CResult, OpsPath};
use crate::linear::{Linear, LoraPart};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Mutex;

/// The loss's gradient with respect to the target logprob of each row of a pass, from those
/// logprobs: called with the first row's index and the logprobs of rows first.. (a block at a
/// time); returns one gradient per row.
pub type LossGradient = dyn Fn(usize, &[f32]) -> CResult<Vec<f32>>;

thread_local! {
    /// The loss gradient of the forward running on this thread (`with_loss_gradient`).
    static LOSS_GRADIENT: RefCell<Option<Rc<LossGradient>>> = const { RefCell::new(None) };
    /// Backward passes on this thread that found their work folded into the forward.
    static FOLDED: Cell<usize> = const { Cell::new(0) };
}

/// How many of the fused head's backward passes on this thread found their work folded into the
/// forward (the others recomputed the logits): how a test sees that a loss's gradient was
/// predicted.
pub fn folded_backwards() -> usize {
    FOLDED.get()
}

/// Runs `f` (a training pass's forward) with the fused head told the loss's gradient, so it
/// folds its backward into the forward (see the module's notes).
pub fn with_loss_gradient<R>(gradient: Rc<LossGradient>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Rc<LossGradient>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOSS_GRADIENT.with(|g| *g.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(LOSS_GRADIENT.with(|g| g.borrow_mut().replace(gradient)));
    f()
}

/// Rows of logits the forward holds at once.
const FORWARD_ROWS: usize = 64;
/// Rows of logits a forward that folds in the backward holds at once (turned into their
/// gradients in place): the product of their gradients with the head's weight runs at ~110
/// GFLOP/s over 64 rows and ~230 over 256 on a Xeon (the weight is repacked for every block).
const FOLD_ROWS: usize = 256;
/// Vocabulary entries per slice of the backward.
const BACKWARD_VOCAB: usize = 4096;

/// The logprob of `targets[i]` under the head's logits of row i of `h` ([tokens, hidden]) -> [tokens].
/// Differentiable in `h` and in whatever the head trains.
pub fn target_logprobs(h: &Tensor, head: &Linear, targets: &[u32], path: OpsPath) -> CResult<Tensor> {
    if h.dim(0)? != targets.len() {
        candle_core::bail!("target logprobs: {} rows, {} targets", h.dim(0)?, targets.len());
    }
    let vocab = head.out_features();
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target {bad} is outside the vocabulary ({vocab})");
    }
    let Some(trained) = Trained::of(head).filter(|_| path == OpsPath::CpuKernels) else {
        return generic(&head.forward(h, path)?, targets);
    };
    let h = h.contiguous()?;
    let op = FusedHead { head: head.detached(), trained, targets: targets.to_vec(), folded: Mutex::new(None) };
    let out = match (trained, head) {
        (Trained::Nothing, _) => h.apply_op1(op)?,
        (Trained::Weight, Linear::Dense { weight, .. }) => h.apply_op2(weight, op)?,
        (Trained::Adapter, Linear::Lora { parts, .. }) => h.apply_op3(&parts[0].a, &parts[0].b, op)?,
        _ => unreachable!("Trained::of matched the head's shape"),
    };
    out.narrow(1, 0, 1)?.squeeze(1)
}

/// log-softmax(logits)[target] per row with candle primitives (any device; heads the fused op
/// does not cover).
pub fn generic(logits: &Tensor, targets: &[u32]) -> CResult<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let idx = Tensor::from_vec(targets.to_vec(), (targets.len(), 1), logits.device())?;
    shifted.gather(&idx, D::Minus1)?.sub(&lse)?.squeeze(D::Minus1)
}

/// What a head trains, for the shapes the fused op covers: a frozen base (dense or quantized,
/// its bias frozen) alone, or with one adapter.
#[derive(Clone, Copy, PartialEq)]
enum Trained {
    Nothing,
    Weight,
    Adapter,
}

impl Trained {
    fn of(head: &Linear) -> Option<Trained> {
        let frozen_bias = |b: &Option<Tensor>| b.as_ref().is_none_or(|b| !b.track_op());
        match head {
            Linear::Dense { weight, bias } if frozen_bias(bias) => {
                Some(if weight.track_op() { Trained::Weight } else { Trained::Nothing })
            }
            Linear::Quantized { bias, .. } if frozen_bias(bias) => Some(Trained::Nothing),
            Linear::Lora { base, parts, .. } if parts.len() == 1 && Trained::of(base) == Some(Trained::Nothing) => {
                let p = &parts[0];
                Some(if p.a.track_op() || p.b.track_op() { Trained::Adapter } else { Trained::Nothing })
            }
            _ => None,
        }
    }
}

/// The gradients of h, of a trained dense weight, and of an adapter's (a, b).
type HeadGrads = (Tensor, Option<Tensor>, Option<(Tensor, Tensor)>);

/// Output [tokens, 2]: each row's target logprob and the log-sum-exp of its logits (the
/// backward's softmax normaliser; its gradient is ignored).
struct FusedHead {
    /// The head with every tensor detached (the op's inputs carry the autograd links).
    head: Linear,
    trained: Trained,
    targets: Vec<u32>,
    /// The backward folded into the forward, waiting for the backward.
    folded: Mutex<Option<Folded>>,
}

impl FusedHead {
    fn forward(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (t, hidden) = l.shape().dims2()?;
        let h = super::f32_slice(s, l)?;
        let mut out = vec![0f32; t * 2];
        let gradient = LOSS_GRADIENT.with(|g| g.borrow().clone());
        let mut fold = gradient.map(|g| Fold::new(self, g, h, t, hidden)).transpose()?;
        let block = if fold.is_some() { FOLD_ROWS } else { FORWARD_ROWS };
        for r0 in (0..t).step_by(block) {
            let r1 = (r0 + block).min(t);
            let mut logits = logit_rows(&self.head, &h[r0 * hidden..r1 * hidden], r1 - r0, hidden)?;
            let vocab = logits.len() / (r1 - r0);
            out[r0 * 2..r1 * 2].par_chunks_exact_mut(2).zip(logits.par_chunks_exact(vocab)).enumerate().for_each(
                |(i, (o, row))| {
                    // Exactly the sampler's logprob: the row's target minus its log-sum-exp.
                    let lse = kernels::log_sum_exp(row);
                    o[0] = row[self.targets[r0 + i] as usize] - lse;
                    o[1] = lse;
                },
            );
            if let Some(fold) = fold.as_mut() {
                fold.rows(self, r0, &mut logits, &out[r0 * 2..r1 * 2], &h[r0 * hidden..r1 * hidden])?;
            }
        }
        if let Some(fold) = fold {
            *self.folded.lock().unwrap_or_else(|p| p.into_inner()) = Some(fold.finish(h)?);
        }
        Ok((CpuStorage::F32(out), Shape::from((t, 2))))
    }

    /// Gradients of h, and of the head's trained weight or adapter (a, b), from the gradient of
    /// the output's logprob column.
    fn backward(&self, h: &Tensor, w: Option<&Tensor>, res: &Tensor, g: &Tensor) -> CResult<HeadGrads> {
        let (t, hidden) = h.dims2()?;
        let gl: Vec<f32> = g.detach().narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        let folded = self.folded.lock().unwrap_or_else(|p| p.into_inner()).take();
        // f32 equality (-0 == 0): the gradient the rows were folded with is the one that came.
        if let Some(f) = folded.filter(|f| f.gradient == gl) {
            FOLDED.set(FOLDED.get() + 1);
            let dh = Tensor::from_vec(f.dh, (t, hidden), h.device())?;
            // A trained weight's gradient goes into the trainer's sum when it collects one.
            let dw = match (f.dw, w.and_then(sink::lease)) {
                (Some(dw), Some(mut sum)) => sum.put(dw).map(|_| None)?,
                (Some(dw), None) => Some(Tensor::from_vec(dw, (self.head.out_features(), hidden), h.device())?),
                (None, _) => None,
            };
            return Ok((dh, dw, f.adapter));
        }
        let h = h.detach().contiguous()?;
        let lse: Vec<f32> = res.detach().narrow(1, 1, 1)?.flatten_all()?.to_vec1()?;
        let guard = h.storage_and_layout();
        let hs = host(&guard)?;
        let (base, adapter) = match &self.head {
            Linear::Lora { base, parts, scale } => (&**base, Some((&parts[0], *scale as f32))),
            other => (other, None),
        };
        let vocab = base.out_features();
        let bias: Option<Vec<f32>> = match base {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => {
                bias.as_ref().map(|b| b.to_dtype(DType::F32)?.to_vec1()).transpose()?
            }
            _ => None,
        };
        let mut dh = vec![0f32; t * hidden];
        // A trained weight's gradient goes into the trainer's sum when it collects one.
        let mut sum = w.filter(|_| self.trained == Trained::Weight).and_then(sink::lease);
        let mut own = (self.trained == Trained::Weight && sum.is_none()).then(|| vec![0f32; vocab * hidden]);
        let mut dw: Option<(&mut [f32], bool)> = match (&mut sum, &mut own) {
            (Some(s), _) => {
                let accumulate = !s.fresh;
                Some((s.values(), accumulate))
            }
            (None, Some(v)) => Some((v, false)),
            (None, None) => None,
        };
        let mut lora = match adapter {
            Some((p, s)) if self.trained == Trained::Adapter => Some(LoraHost::new(p, s, hs, t, hidden)?),
            _ => None,
        };
        let (mut wc, mut logits, mut dlog) = (Vec::new(), Vec::new(), Vec::new());
        for v0 in (0..vocab).step_by(BACKWARD_VOCAB) {
            let vc = BACKWARD_VOCAB.min(vocab - v0);
            weight_rows(base, v0, vc, &mut wc)?;
            logits.resize(t * vc, 0.0);
            gemm(t, vc, hidden, &mut logits, false, 1.0, (hs, hidden, 1), (&wc, 1, hidden));
            if let Some(l) = &lora {
                // + s·u·b[v0..]ᵀ
                gemm(t, vc, l.rank, &mut logits, true, l.scale, (&l.u, l.rank, 1), (&l.b[v0 * l.rank..], 1, l.rank));
            }
            dlog.clear();
            dlog.resize(t * vc, 0.0);
            dlog.par_chunks_exact_mut(vc).zip(logits.par_chunks_exact_mut(vc)).enumerate().for_each(|(i, (d, z))| {
                if let Some(b) = &bias {
                    z.iter_mut().zip(&b[v0..v0 + vc]).for_each(|(z, b)| *z += b);
                }
                // d logprob(target) / d logits = onehot(target) - softmax, times the row's gradient.
                kernels::add_scaled_exp(z, lse[i], -gl[i], d);
                let target = self.targets[i] as usize;
                if (v0..v0 + vc).contains(&target) {
                    d[target - v0] += gl[i];
                }
            });
            gemm(t, hidden, vc, &mut dh, true, 1.0, (&dlog, vc, 1), (&wc, hidden, 1));
            if let Some((dw, accumulate)) = dw.as_mut() {
                gemm(
                    vc,
                    hidden,
                    t,
                    &mut dw[v0 * hidden..(v0 + vc) * hidden],
                    *accumulate,
                    1.0,
                    (&dlog, 1, vc),
                    (hs, hidden, 1),
                );
            }
            if let Some(l) = lora.as_mut() {
                l.add_slice(&dlog, v0, vc, t);
            }
        }
        let device = h.device();
        let adapter_grads = match lora {
            Some(l) => Some(l.finish(hs, &mut dh, t, hidden, device)?),
            None => None,
        };
        let dw = own.map(|w| Tensor::from_vec(w, (vocab, hidden), device)).transpose()?;
        Ok((Tensor::from_vec(dh, (t, hidden), device)?, dw, adapter_grads))
    }
}

/// What the forward folded in: the loss gradient of each row it assumed, the hidden states'
/// gradient and the trained weight's or the adapter's (a, b).
struct Folded {
    gradient: Vec<f32>,
    dh: Vec<f32>,
    dw: Option<Vec<f32>>,
    adapter: Option<(Tensor, Tensor)>,
}

/// The backward done a block of rows at a time in the forward, from the served logits.
struct Fold {
    loss_gradient: Rc<LossGradient>,
    /// Each row's loss gradient so far, in order.
    gradient: Vec<f32>,
    dh: Vec<f32>,
    /// A trained weight's gradient [vocab, hidden], summed over blocks of rows.
    dw: Option<Vec<f32>>,
    lora: Option<LoraHost>,
    /// The adapter's dbᵀ [rank, vocab], summed over blocks of rows.
    dbt: Vec<f32>,
    /// A converted slice of the weight.
    wc: Vec<f32>,
    hidden: usize,
}

impl Fold {
    fn new(op: &FusedHead, loss_gradient: Rc<LossGradient>, h: &[f32], t: usize, hidden: usize) -> CResult<Self> {
        let lora = match &op.head {
            Linear::Lora { parts, scale, .. } if op.trained == Trained::Adapter => {
                Some(LoraHost::new(&parts[0], *scale as f32, h, t, hidden)?)
            }
            _ => None,
        };
        let dbt = vec![0f32; lora.as_ref().map_or(0, |l| l.db.len())];
        let (gradient, dh, wc) = (Vec::with_capacity(t), vec![0f32; t * hidden], Vec::new());
        let dw = (op.trained == Trained::Weight).then(|| vec![0f32; op.head.out_features() * hidden]);
        Ok(Fold { loss_gradient, gradient, dh, dw, lora, dbt, wc, hidden })
    }

    /// Rows r0.. (h [rows, hidden]) with their served logits [rows, vocab] (turned into their
    /// gradients) and (logprob, log-sum-exp) pairs.
    fn rows(&mut self, op: &FusedHead, r0: usize, logits: &mut [f32], out: &[f32], h: &[f32]) -> CResult<()> {
        let (rows, hidden) = (out.len() / 2, self.hidden);
        let vocab = logits.len() / rows;
        let lp: Vec<f32> = out.chunks_exact(2).map(|o| o[0]).collect();
        let g = (self.loss_gradient)(r0, &lp)?;
        if g.len() != rows {
            candle_core::bail!("a loss gradient of {} values for {rows} rows", g.len());
        }
        logits.par_chunks_exact_mut(vocab).enumerate().for_each(|(i, z)| {
            // As the backward: g·(onehot(target) - softmax).
            kernels::scale_exp_in_place(z, out[2 * i + 1], -g[i]);
            z[op.targets[r0 + i] as usize] += g[i];
        });
        let dlog = &*logits;
        let dh = &mut self.dh[r0 * hidden..(r0 + rows) * hidden];
        weight_slices(base_of(&op.head), &mut self.wc, |v0, vc, w| {
            gemm(rows, hidden, vc, dh, v0 > 0, 1.0, (&dlog[v0..], vocab, 1), (w, hidden, 1));
        })?;
        if let Some(dw) = &mut self.dw {
            gemm(vocab, hidden, rows, dw, r0 > 0, 1.0, (dlog, 1, vocab), (h, hidden, 1));
        }
        if let Some(l) = &mut self.lora {
            let r = l.rank;
            // dbᵀ += s·u[rows]ᵀ·dlog (gemm packs dlog's rows as they lie) and z[rows] = dlog·b.
            gemm(r, vocab, rows, &mut self.dbt, r0 > 0, l.scale, (&l.u[r0 * r..], 1, r), (dlog, vocab, 1));
            gemm(rows, r, vocab, &mut l.z[r0 * r..(r0 + rows) * r], false, 1.0, (dlog, vocab, 1), (&l.b, r, 1));
        }
        self.gradient.extend(g);
        Ok(())
    }

    fn finish(mut self, h: &[f32]) -> CResult<Folded> {
        let (t, hidden) = (self.gradient.len(), self.hidden);
        let adapter = match self.lora.take() {
            Some(mut l) => {
                let (r, vocab) = (l.rank, self.dbt.len() / l.rank);
                super::transpose_into(&self.dbt, (r, vocab), &mut l.db);
                Some(l.finish(h, &mut self.dh, t, hidden, &candle_core::Device::Cpu)?)
            }
            None => None,
        };
        Ok(Folded { gradient: self.gradient, dh: self.dh, dw: self.dw, adapter })
    }
}

/// The head's logits of rows x [m, k], computed as `Linear::forward` on the CPU kernels computes
/// them (the sampler's values), as a vector of their own.
fn logit_rows(head: &Linear, x: &[f32], m: usize, k: usize) -> CResult<Vec<f32>> {
    match head {
        Linear::Lora { base, parts, scale } if Linear::adapted_as_one_op(base, parts, OpsPath::CpuKernels) => {
            super::lora::served_rows(x, (m, k), base, parts, *scale)
        }
        Linear::Lora { .. } | Linear::Stacked(_) => {
            let rows = Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?;
            head.forward(&rows, OpsPath::CpuKernels)?.flatten_all()?.to_vec1()
        }
        _ => super::linear_rows(head, x, m, k),
    }
}

/// The frozen base of a head (an adapter's base, or the head itself).
fn base_of(head: &Linear) -> &Linear {
    match head {
        Linear::Lora { base, .. } => base,
        other => other,
    }
}

/// Calls `f(v0, n, rows)` over the base weight's rows as f32 [n, cols]: a dense f32 weight in
/// one piece where it lies; others (bf16, quantized) converted BACKWARD_VOCAB rows at a time
/// into `buf`.
fn weight_slices(base: &Linear, buf: &mut Vec<f32>, mut f: impl FnMut(usize, usize, &[f32])) -> CResult<()> {
    if let Linear::Dense { weight, .. } = base {
        if weight.dtype() == DType::F32 && weight.is_contiguous() {
            let guard = weight.storage_and_layout();
            f(0, weight.dim(0)?, host(&guard)?);
            return Ok(());
        }
    }
    let vocab = base.out_features();
    for v0 in (0..vocab).step_by(BACKWARD_VOCAB) {
        let vc = BACKWARD_VOCAB.min(vocab - v0);
        weight_rows(base, v0, vc, buf)?;
        f(v0, vc, buf);
    }
    Ok(())
}

/// The adapter's side of the backward, on host copies: u = h·aᵀ once, then per vocabulary slice
/// d b[slice] = s·dlogᵀ·u and z += dlog·b[slice]; at the end d a = s·zᵀ·h and d h += s·z·a.
struct LoraHost {
    a: Vec<f32>,
    b: Vec<f32>,
    u: Vec<f32>,
    z: Vec<f32>,
    db: Vec<f32>,
    rank: usize,
    scale: f32,
}

impl LoraHost {
    fn new(p: &LoraPart, scale: f32, h: &[f32], t: usize, hidden: usize) -> CResult<Self> {
        let (rank, vocab) = (p.a.dim(0)?, p.b.dim(0)?);
        let a: Vec<f32> = p.a.detach().flatten_all()?.to_vec1()?;
        let b: Vec<f32> = p.b.detach().flatten_all()?.to_vec1()?;
        let mut u = vec![0f32; t * rank];
        gemm(t, rank, hidden, &mut u, false, 1.0, (h, hidden, 1), (&a, 1, hidden));
        Ok(LoraHost { a, b, u, z: vec![0f32; t * rank], db: vec![0f32; vocab * rank], rank, scale })
    }

    fn add_slice(&mut self, dlog: &[f32], v0: usize, vc: usize, t: usize) {
        let r = self.rank;
        gemm(vc, r, t, &mut self.db[v0 * r..(v0 + vc) * r], false, self.scale, (dlog, 1, vc), (&self.u, r, 1));
        gemm(t, r, vc, &mut self.z, true, 1.0, (dlog, vc, 1), (&self.b[v0 * r..], r, 1));
    }

    fn finish(
        self,
        h: &[f32],
        dh: &mut [f32],
        t: usize,
        hidden: usize,
        device: &candle_core::Device,
    ) -> CResult<(Tensor, Tensor)> {
        let (r, z) = (self.rank, &self.z);
        gemm(t, hidden, r, dh, true, self.scale, (z, r, 1), (&self.a, hidden, 1));
        let mut da = vec![0f32; r * hidden];
        gemm(r, hidden, t, &mut da, false, self.scale, (z, 1, r), (h, hidden, 1));
        let vocab = self.db.len() / r;
        Ok((Tensor::from_vec(da, (r, hidden), device)?, Tensor::from_vec(self.db, (vocab, r), device)?))
    }
}

/// Rows v0..v0+n of a frozen or dense head weight as f32, into `out` ([n, cols]).
fn weight_rows(base: &Linear, v0: usize, n: usize, out: &mut Vec<f32>) -> CResult<()> {
    match base {
        Linear::Dense { weight, .. } => {
            let rows = weight.detach().narrow(0, v0, n)?.to_dtype(DType::F32)?.contiguous()?;
            let guard = rows.storage_and_layout();
            out.clear();
            out.extend_from_slice(host(&guard)?);
        }
        Linear::Quantized { weight, .. } => {
            out.resize(n * weight.cols, 0.0);
            out.par_chunks_exact_mut(weight.cols).enumerate().for_each(|(i, o)| weight.dequantize_row(v0 + i, o));
        }
        _ => candle_core::bail!("fused head: unsupported weight layout"),
    }
    Ok(())
}

impl CustomOp1 for FusedHead {
    fn name(&self) -> &'static str {
        "tandem-fused-head"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(s, l)
    }
    fn bwd(&self, h: &Tensor, res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(self.backward(h, None, res, g)?.0))
    }
}

impl CustomOp2 for FusedHead {
    fn name(&self) -> &'static str {
        "tandem-fused-head"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.forward(s, l)
    }
    fn bwd(&self, h: &Tensor, w: &Tensor, res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw, _) = self.backward(h, Some(w), res, g)?;
        Ok((Some(dh), dw))
    }
}

impl CustomOp3 for FusedHead {
    fn name(&self) -> &'static str {
        "tandem-fused-head"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.forward(s, l)
    }
    fn bwd(
        &self,
        h: &Tensor,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dh, _, ab) = self.backward(h, None, res, g)?;
        let (da, db) = ab.unzip();
        Ok((Some(dh), da, db))
    }
}
