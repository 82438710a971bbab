//! A plain decoder layer as one node of the training graph.
//!
//! Through candle's autograd a layer is a dozen nodes (two norms, four projections, the
//! attention, the SiLU product, two residual sums), and candle's backward sums every node's input
//! gradient by allocating a zeroed tensor and adding the gradient into yet another new one. On
//! SmolLM2 that was most of what the main thread did alone while the pool waited (~10% of a full
//! pass). Here the layer's forward runs the very ops serving runs (on detached tensors: the same
//! values), keeps what the backward needs, and the backward calls each op's own backward in
//! reverse order on host values, so every gradient is the one the separate nodes give, to the
//! bit. The weights' gradients go into the trainer's sums (`sink`) rather than through candle, so
//! the node is used only when the trainer collects every trained tensor of the layer.
use super::{grad, lora, sink, CResult, OpsPath, RopeTables};
use crate::linear::Linear;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use std::sync::Mutex;

/// One layer's weights, as the model holds them (tracked where trained: the trained ones name
/// the sums their gradients go into). Clones share the model's tensors.
pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub qkv: Linear,
    pub o_proj: Linear,
    pub mlp_norm: Tensor,
    pub gate_up: Linear,
    pub down: Linear,
    pub eps: f64,
    /// (heads, kv heads, head dim)
    pub heads: (usize, usize, usize),
    /// What serving's KV cache holds (attention reads keys and values rounded as it does).
    pub kv: crate::config::KvDtype,
}

/// The layer's output for x [tokens, hidden] (sequences of `lens` packed one after another) as
/// one autograd node; None when the layer cannot be one (a projection form the node does not
/// cover, or a trained tensor whose gradient the running pass does not collect): the caller then
/// builds the layer from separate ops.
pub fn trained_layer(
    x: &Tensor,
    w: LayerWeights,
    positions: &[usize],
    tables: &RopeTables,
    lens: &[usize],
) -> CResult<Option<Tensor>> {
    let linears = [&w.qkv, &w.o_proj, &w.gate_up, &w.down];
    if !linears.iter().all(|l| covered(l)) {
        return Ok(None);
    }
    let mut trained: Vec<&Tensor> = [&w.attn_norm, &w.mlp_norm].into_iter().filter(|t| t.track_op()).collect();
    linears.iter().for_each(|l| trained_tensors(l, &mut trained));
    let Some(&anchor) = trained.first() else { return Ok(None) };
    if !trained.iter().all(|t| sink::planned(t)) {
        return Ok(None);
    }
    // The anchor, a trained tensor of the layer, makes candle record the node even when x is
    // not differentiated (the first layer over a frozen embedding).
    let anchor = anchor.clone();
    let (saved, out) = forward(&x.detach(), &w, positions, tables, lens)?;
    let attention = grad::PackedSelfAttention::new(w.heads, positions, tables, lens, w.kv);
    let op = LayerNode { out: Mutex::new(Some(out)), saved, attention, weights: w };
    Ok(Some(x.contiguous()?.apply_op2(&anchor, op)?))
}

/// Projection forms the node differentiates: a dense weight (trained or not), frozen blocks, or
/// adapters over a frozen base run as one op.
fn covered(l: &Linear) -> bool {
    match l {
        Linear::Dense { .. } => true,
        Linear::Quantized { bias, .. } => bias.as_ref().is_none_or(|b| !b.track_op()),
        Linear::Lora { base, parts, .. } => {
            Linear::adapted_as_one_op(base, parts, OpsPath::CpuKernels) && !matches!(**base, Linear::Lora { .. })
        }
        Linear::Stacked(_) => false,
    }
}

/// The tensors of a covered projection that are being trained.
fn trained_tensors<'a>(l: &'a Linear, out: &mut Vec<&'a Tensor>) {
    match l {
        Linear::Dense { weight, bias } => out.extend(std::iter::once(weight).chain(bias).filter(|t| t.track_op())),
        Linear::Lora { parts, .. } => out.extend(parts.iter().flat_map(|p| [&p.a, &p.b]).filter(|t| t.track_op())),
        Linear::Quantized { .. } | Linear::Stacked(_) => {}
    }
}

/// What the backward reads: every op's input (detached).
struct Saved {
    x: Tensor,
    h1: Tensor,
    qkv: Tensor,
    a: Tensor,
    x2: Tensor,
    h2: Tensor,
    gate_up: Tensor,
    m: Tensor,
}

/// The layer's forward on detached values (the ops serving runs, in the order the separate nodes
/// run them): what the backward reads, and the output.
fn forward(
    x: &Tensor,
    w: &LayerWeights,
    positions: &[usize],
    tables: &RopeTables,
    lens: &[usize],
) -> CResult<(Saved, Tensor)> {
    let path = OpsPath::CpuKernels;
    let h1 = super::rms_norm(x, &w.attn_norm.detach(), w.eps, path)?;
    let qkv = w.qkv.detached().forward(&h1, path)?;
    let a = super::packed_self_attention(&qkv, w.heads, positions, tables, lens, w.kv, path)?;
    let x2 = (x + w.o_proj.detached().forward(&a, path)?)?;
    let h2 = super::rms_norm(&x2, &w.mlp_norm.detach(), w.eps, path)?;
    let gate_up = w.gate_up.detached().forward(&h2, path)?;
    let m = super::silu_mul(&gate_up, path)?;
    let out = (&x2 + w.down.detached().forward(&m, path)?)?;
    Ok((Saved { x: x.clone(), h1, qkv, a, x2, h2, gate_up, m }, out))
}

struct LayerNode {
    /// The output's values, taken once by candle's forward call.
    out: Mutex<Option<Tensor>>,
    saved: Saved,
    attention: grad::PackedSelfAttention,
    weights: LayerWeights,
}

impl CustomOp2 for LayerNode {
    fn name(&self) -> &'static str {
        "tandem-trained-layer"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let out = self.out.lock().map_err(|_| candle_core::Error::Msg("layer node poisoned".into()))?.take();
        let Some(out) = out else { candle_core::bail!("the layer node's forward ran twice") };
        let shape = out.shape().clone();
        let values = out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(values), shape))
    }

    /// Each op's backward in reverse order; a residual's gradient is the sum of its two uses
    /// (as candle's store adds them: two terms, so the order does not matter).
    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (s, w) = (&self.saved, &self.weights);
        let g = g.detach().contiguous()?;
        let missing = || candle_core::Error::Msg("a layer op gave no input gradient".into());
        let dm = linear_bwd(&w.down, &s.m, &g, true)?.ok_or_else(missing)?;
        let dgu = grad::silu_mul_bwd(&s.gate_up, &dm)?.ok_or_else(missing)?;
        let dh2 = linear_bwd(&w.gate_up, &s.h2, &dgu, true)?.ok_or_else(missing)?;
        let dx2 = (norm_bwd(&s.x2, &w.mlp_norm, &dh2, w.eps, true)?.ok_or_else(missing)? + &g)?;
        let da = linear_bwd(&w.o_proj, &s.a, &dx2, true)?.ok_or_else(missing)?;
        let dqkv = candle_core::CustomOp1::bwd(&self.attention, &s.qkv, &s.a, &da)?.ok_or_else(missing)?;
        // Over a frozen embedding with a frozen first norm nothing below qkv is wanted.
        let below = x.track_op() || w.attn_norm.track_op();
        let Some(dh1) = linear_bwd(&w.qkv, &s.h1, &dqkv, below)? else { return Ok((None, None)) };
        let dx1 = norm_bwd(&s.x, &w.attn_norm, &dh1, w.eps, x.track_op())?;
        Ok((dx1.map(|dx1| dx1 + dx2).transpose()?, None))
    }
}

/// RMSNorm's input gradient (when `want_dx`); its weight's (when trained) into the trainer's sum.
fn norm_bwd(x: &Tensor, weight: &Tensor, g: &Tensor, eps: f64, want_dx: bool) -> CResult<Option<Tensor>> {
    let (dx, dw) = grad::rms_norm_grads(x, weight, g, eps, (want_dx, weight.track_op()))?;
    if let Some(dw) = dw {
        sink::add(weight, &dw)?;
    }
    Ok(dx)
}

/// A covered projection's input gradient (when `want_dx`) for its output's gradient g; its
/// trained tensors' gradients into the trainer's sums.
fn linear_bwd(l: &Linear, x: &Tensor, g: &Tensor, want_dx: bool) -> CResult<Option<Tensor>> {
    match l {
        Linear::Dense { weight, bias } => {
            let (dx, dw) = grad::matmul_xwt_grads(x, weight, g, (want_dx, weight.track_op()))?;
            if let Some(dw) = dw {
                sink::add(weight, &dw)?;
            }
            if let Some(b) = bias.as_ref().filter(|b| b.track_op()) {
                // As candle's broadcast backward sums it.
                sink::add(b, &g.sum_keepdim(0)?)?;
            }
            Ok(dx)
        }
        Linear::Quantized { weight, .. } => want_dx.then(|| grad::quantized_matmul_bwd(weight, g)).transpose(),
        Linear::Lora { base, parts, scale } => {
            let (dx, each) = lora::adapted_grads(x, base, parts, *scale, g, want_dx)?;
            for (p, (da, db)) in parts.iter().zip(each) {
                if p.a.track_op() {
                    sink::add(&p.a, &da)?;
                }
                if p.b.track_op() {
                    sink::add(&p.b, &db)?;
                }
            }
            Ok(dx)
        }
        Linear::Stacked(_) => candle_core::bail!("the layer node does not cover stacked projections"),
    }
}
