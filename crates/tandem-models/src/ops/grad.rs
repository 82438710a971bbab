//! Backward passes of the CPU kernels, so training runs the very kernels serving runs.
//!
//! A model being trained computes its forward with the same fused kernels as the sampler: the
//! logprobs a training step sees for a sampled token are then bit-for-bit the ones the sampler
//! reported (trainer/sampler mismatch destabilises RL). Each backward here works on host slices
//! (products through gemm, elementwise passes in parallel rows); it only runs when an input is
//! being differentiated.
use super::{f32_slice, gemm, gemm_new, gemm_on, host, kernels, sink, team, CResult, RopeTables};
use crate::config::KvDtype;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// x·wᵀ's gradients: dx = g·w, dw = gᵀ·x (each only when its input is differentiated), as
/// blocked products over the tensors' own memory (transposes are strides); dw goes straight into
/// the trainer's sum when one is collected for w.
pub(super) fn matmul_xwt_bwd(x: &Tensor, w: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    matmul_xwt_grads(x, w, g, (x.track_op(), w.track_op()))
}

/// `matmul_xwt_bwd` with the gradients wanted given (x may be a detached copy).
pub(super) fn matmul_xwt_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    (want_x, want_w): (bool, bool),
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let ((m, k), n) = (x.dims2()?, w.dim(0)?);
    // Detached: gradients are values, not part of the graph.
    let x = x.detach().contiguous()?;
    let g = g.detach().contiguous()?;
    let wf = w.detach().to_dtype(DType::F32)?.contiguous()?;
    let guards = [&x, &g, &wf].map(|t| t.storage_and_layout());
    let (xs, gs, ws) = (host(&guards[0])?, host(&guards[1])?, host(&guards[2])?);
    let gx = if want_x {
        let gx = gemm_new(m, k, n, 1.0, (gs, n, 1), (ws, k, 1));
        Some(Tensor::from_vec(gx, (m, k), x.device())?)
    } else {
        None
    };
    let gw = if !want_w {
        None
    } else if let Some(mut sum) = sink::lease(w) {
        if sum.fresh {
            // A fresh sum takes the product as it is: no zeroed sum for the product to overwrite.
            sum.put(gemm_new(n, k, m, 1.0, (gs, 1, n), (xs, k, 1)))?;
        } else {
            gemm(n, k, m, sum.values(), true, 1.0, (gs, 1, n), (xs, k, 1));
        }
        None
    } else {
        let gw = gemm_new(n, k, m, 1.0, (gs, 1, n), (xs, k, 1));
        Some(Tensor::from_vec(gw, (n, k), x.device())?.to_dtype(w.dtype())?)
    };
    Ok((gx, gw))
}

/// An embedding gather's gradient: row i of g added into row ids[i] of the table's gradient, in
/// order (as candle's index_add). Into the trainer's sum when it collects one for the table;
/// otherwise a new dense gradient.
pub(super) fn gather_rows_bwd(table: &Tensor, ids: &[u32], g: &Tensor) -> CResult<Option<Tensor>> {
    let cols = table.dim(1)?;
    let g_view = f32_view(g)?;
    let guard = g_view.storage_and_layout();
    let gs = host(&guard)?;
    let scatter = |dst: &mut [f32]| {
        for (&id, row) in ids.iter().zip(gs.chunks_exact(cols)) {
            dst[id as usize * cols..(id as usize + 1) * cols].iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    };
    if let Some(mut sum) = sink::lease(table) {
        scatter(sum.values());
        return Ok(None);
    }
    let mut d = vec![0f32; table.elem_count()];
    scatter(&mut d);
    Ok(Some(Tensor::from_vec(d, table.shape(), table.device())?))
}

/// x·wᵀ's input gradient g·w for a frozen block-quantized w, dequantized for the product.
pub(super) fn quantized_matmul_bwd(w: &super::quant::QWeight, g: &Tensor) -> CResult<Tensor> {
    let (m, n) = g.dims2()?;
    let g = g.detach().contiguous()?;
    let guard = g.storage_and_layout();
    let ws = w.dequantize();
    let gx = gemm_new(m, w.cols, n, 1.0, (host(&guard)?, n, 1), (&ws, w.cols, 1));
    Tensor::from_vec(gx, (m, w.cols), g.device())
}

/// A tensor's values as one contiguous f32 host vector (detached: gradients are values).
fn values(t: &Tensor) -> CResult<Vec<f32>> {
    t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// A tensor as detached, contiguous f32 (no copy when it already is): read in place through
/// `host`, where `values` would copy an activation per backward op.
fn f32_view(t: &Tensor) -> CResult<Tensor> {
    t.detach().to_dtype(DType::F32)?.contiguous()
}

/// Rows per work item of the elementwise backward passes.
const ROWS_PER_ITEM: usize = 16;

/// RMSNorm's gradients over the last dimension: y = x·r·w with r = 1/sqrt(mean(x²) + eps), so
/// dx = r·(g·w) − x·r³·mean(g·w·x) and dw = Σ_rows g·x·r. One pass over each row, in parallel.
pub(super) fn rms_norm_bwd(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    rms_norm_grads(x, w, g, eps, (x.track_op(), w.track_op()))
}

/// `rms_norm_bwd` with the gradients wanted given (x may be a detached copy).
pub(super) fn rms_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    (want_x, want_w): (bool, bool),
) -> CResult<(Option<Tensor>, Option<Tensor>)> {
    let ws = values(w)?;
    let (x_view, g_view) = (f32_view(x)?, f32_view(g)?);
    let (xg, gg) = (x_view.storage_and_layout(), g_view.storage_and_layout());
    let (xs, gs) = (host(&xg)?, host(&gg)?);
    let n = ws.len();
    // Zeroed in parallel (a serial zeroing here was main-thread time in every layer's backward).
    let mut gx = if want_x { super::rows_new(xs.len() / n, n, &|_, _| {}) } else { Vec::new() };
    let items = xs.len().div_ceil(n * ROWS_PER_ITEM);
    let mut gx_items: Vec<&mut [f32]> =
        if want_x { gx.chunks_mut(n * ROWS_PER_ITEM).collect() } else { (0..items).map(|_| &mut [][..]).collect() };
    let gw_parts: Vec<Vec<f32>> = gx_items
        .par_iter_mut()
        .zip(xs.par_chunks(n * ROWS_PER_ITEM).zip(gs.par_chunks(n * ROWS_PER_ITEM)))
        .map(|(gxi, (xi, gi))| {
            let mut gw = vec![0f32; if want_w { n } else { 0 }];
            for (row, (xr, gr)) in xi.chunks_exact(n).zip(gi.chunks_exact(n)).enumerate() {
                let r = 1.0 / (kernels::dot(xr, xr) / n as f32 + eps as f32).sqrt();
                if want_x {
                    let dot: f32 = xr.iter().zip(gr).zip(&ws).map(|((x, g), w)| g * w * x).sum::<f32>() / n as f32;
                    let r3 = r * r * r * dot;
                    for (((o, &x), &g), &w) in gxi[row * n..(row + 1) * n].iter_mut().zip(xr).zip(gr).zip(&ws) {
                        *o = r * g * w - x * r3;
                    }
                }
                for ((o, &x), &g) in gw.iter_mut().zip(xr).zip(gr) {
                    *o += g * x * r;
                }
            }
            gw
        })
        .collect();
    let device = x.device();
    let gx = if want_x { Some(Tensor::from_vec(gx, x.shape(), device)?) } else { None };
    let gw = if want_w {
        let mut sum = vec![0f32; n];
        for part in &gw_parts {
            sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        Some(Tensor::from_vec(sum, n, device)?.to_dtype(w.dtype())?.reshape(w.shape())?)
    } else {
        None
    };
    Ok((gx, gw))
}

/// silu(gate)·up's gradient for rows laid out as [gate | up], with
/// silu'(x) = σ(x)·(1 + x·(1 − σ(x))).
pub(super) fn silu_mul_bwd(gate_up: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
    let two_i = gate_up.dim(1)?;
    let inter = two_i / 2;
    let (x_view, g_view) = (f32_view(gate_up)?, f32_view(g)?);
    let (xg, gg) = (x_view.storage_and_layout(), g_view.storage_and_layout());
    let (xs, gs) = (host(&xg)?, host(&gg)?);
    // SAFETY: silu_mul_bwd writes both halves of each row of its block.
    let out = unsafe {
        super::rows_written(xs.len() / two_i, two_i, &|r0, block| {
            let rows = block.len() / two_i;
            let (x, g) = (&xs[r0 * two_i..][..rows * two_i], &gs[r0 * inter..][..rows * inter]);
            super::kernels::silu_mul_bwd(x, g, inter, block);
        })
    };
    Ok(Some(Tensor::from_vec(out, gate_up.shape(), gate_up.device())?))
}

/// Rope rotates pairs by position-dependent angles; its gradient rotates them back: the same
/// kernel with sin negated.
pub(super) fn rope_bwd(g: &Tensor, positions: &[usize], tables: &RopeTables) -> CResult<Tensor> {
    let (t, h, d) = g.dims3()?;
    let mut gs = values(g)?;
    rotate_back(&mut gs, h, d, positions, tables)?;
    Tensor::from_vec(gs, (t, h, d), g.device())
}

/// Rows [t, h, d] (token t at positions[t]) rotated back by rope's angles, in place.
fn rotate_back(gs: &mut [f32], h: usize, d: usize, positions: &[usize], tables: &RopeTables) -> CResult<()> {
    let half = tables.cos_host.len() / tables.cos.dim(0)?;
    let used = (positions.iter().copied().max().unwrap_or(0) + 1) * half;
    let neg_sin: Vec<f32> = tables.sin_host[..used].iter().map(|s| -s).collect();
    rotate(gs, h, d, positions, tables, &neg_sin);
    Ok(())
}

/// Rope's kernel over rows [t, h, d] with the given sines (rope's own or negated), rows in parallel.
fn rotate(xs: &mut [f32], h: usize, d: usize, positions: &[usize], tables: &RopeTables, sin: &[f32]) {
    xs.par_chunks_mut(h * d * ROWS_PER_ITEM).zip(positions.par_chunks(ROWS_PER_ITEM)).for_each(|(rows, pos)| {
        kernels::rope(rows, h, d, pos, &tables.cos_host, sin, tables.interleaved);
    });
}

/// Rope as an op that owns its inputs (candle keeps differentiable ops past the forward).
pub(super) struct RopeGrad {
    pub tables: RopeTables,
    pub positions: Vec<usize>,
}

impl CustomOp1 for RopeGrad {
    fn name(&self) -> &'static str {
        "tandem-rope-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_t, heads, d) = l.shape().dims3()?;
        let mut x = f32_slice(s, l)?.to_vec();
        rotate(&mut x, heads, d, &self.positions, &self.tables, &self.tables.sin_host);
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(rope_bwd(g, &self.positions, &self.tables)?))
    }
}

/// Causal self-attention within each of several whole sequences packed one after another,
/// q: [t, heads, d], k and v: [t, kv_heads, d] -> [t, heads·d]; `lens` are the sequences' lengths.
/// The forward is the serving kernel over a cache with one slot per sequence, so its values equal
/// serving's row for row: keys and values are first rounded as the serving cache holds them (`kv`),
/// and the backward differentiates at the rounded values (the rounding passes gradients through).
pub(super) struct SelfAttention {
    pub lens: Vec<usize>,
    pub kv: KvDtype,
}

/// Keys or values as a cache of `kv` holds them: rounded to f16 and back (exact) for an f16 cache.
/// Attention over the rounded f32 values gives the bits an f16 cache's kernel gives (it converts
/// each value to f32 as it loads it).
fn as_cached(kv: KvDtype, x: &mut [f32]) {
    if kv == KvDtype::F16 {
        use half::slice::HalfFloatSliceExt;
        let mut h = vec![half::f16::ZERO; x.len()];
        h.convert_from_f32_slice(x);
        h.convert_to_f32_slice(x);
    }
}

/// `as_cached` of a tensor.
fn tensor_as_cached(kv: KvDtype, x: &Tensor) -> CResult<Tensor> {
    match kv {
        KvDtype::F32 => Ok(x.clone()),
        KvDtype::F16 => {
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            as_cached(kv, &mut v);
            Tensor::from_vec(v, x.shape(), x.device())
        }
    }
}

impl CustomOp3 for SelfAttention {
    fn name(&self) -> &'static str {
        "tandem-self-attention"
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
        let (t, heads, d) = l1.shape().dims3()?;
        let kv_heads = l2.shape().dims3()?.1;
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let out = match self.kv {
            KvDtype::F32 => attention_fwd(q, k, v, (heads, kv_heads, d), &self.lens)?,
            KvDtype::F16 => {
                let (mut k, mut v) = (k.to_vec(), v.to_vec());
                as_cached(self.kv, &mut k);
                as_cached(self.kv, &mut v);
                attention_fwd(q, &k, &v, (heads, kv_heads, d), &self.lens)?
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((t, heads * d))))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (kc, vc) = (tensor_as_cached(self.kv, k)?, tensor_as_cached(self.kv, v)?);
        let [dq, dk, dv] = attention_bwd(q, &kc, &vc, g, &self.lens)?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// Causal self-attention of packed sequences (`lens`) by serving's kernel over a cache with one
/// slot per sequence: q [t, heads, d], k and v [t, kv_heads, d] rows -> [t, heads·d].
fn attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (heads, kv_heads, d): (usize, usize, usize),
    lens: &[usize],
) -> CResult<Vec<f32>> {
    let t = q.len() / (heads * d);
    let cap = lens.iter().copied().max().unwrap_or(0);
    let mut tokens = Vec::with_capacity(t);
    for (slot, &n) in lens.iter().enumerate() {
        tokens.extend((0..n).map(|pos| kernels::TokenSlot::causal(slot, pos)));
    }
    if tokens.len() != t {
        candle_core::bail!("self attention: lengths sum to {}, not {t}", tokens.len());
    }
    let geometry = kernels::CacheGeometry { kv_heads, block: cap, head_dim: d };
    let tables = kernels::contiguous_tables(lens.len());
    // [t, kvh, d] rows -> the cache layout [sequences, kvh, cap, d].
    let to_cache = |src: &[f32]| {
        let mut out = vec![0f32; lens.len() * kv_heads * cap * d];
        for (row, ts) in tokens.iter().enumerate() {
            for h in 0..kv_heads {
                let o = geometry.offset(ts.slot, h, ts.pos);
                out[o..o + d].copy_from_slice(&src[(row * kv_heads + h) * d..(row * kv_heads + h + 1) * d]);
            }
        }
        out
    };
    let (k, v) = (to_cache(k), to_cache(v));
    let mut out = vec![0f32; t * heads * d];
    kernels::attention(q, &k, &v, &tokens, &tables, heads, geometry, &mut out);
    Ok(out)
}

/// `SelfAttention` straight from the packed projection qkv [t, (heads + 2·kv_heads)·d]: q and k
/// split out and roped, v split out. One op where the split was eight (three narrows, three
/// reshapes, two ropes), each with its own zeroed and summed gradient in candle's backward, the
/// narrows' padded to qkv's whole width. The values are the eight ops' to the bit.
pub(super) struct PackedSelfAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    positions: Vec<usize>,
    tables: RopeTables,
    lens: Vec<usize>,
    kv: KvDtype,
}

impl PackedSelfAttention {
    /// The op for sequences of `lens` at `positions`, heads (heads, kv heads, head dim), keys and
    /// values rounded as a cache of `kv` holds them.
    pub(super) fn new(
        (heads, kv_heads, head_dim): (usize, usize, usize),
        positions: &[usize],
        tables: &RopeTables,
        lens: &[usize],
        kv: KvDtype,
    ) -> Self {
        let (positions, tables, lens) = (positions.to_vec(), tables.clone(), lens.to_vec());
        PackedSelfAttention { heads, kv_heads, head_dim, positions, tables, lens, kv }
    }

    /// [q roped, k roped, v] as rows [t, heads or kv heads, d], from qkv's values; k and v
    /// rounded as the cache holds them (the split's gradient passes through the rounding).
    fn split(&self, qkv: &[f32]) -> [Vec<f32>; 3] {
        let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let width = qw + 2 * kw;
        let t = qkv.len() / width;
        // SAFETY: each row of a block is copied whole.
        let columns = |first: usize, w: usize| unsafe {
            super::rows_written(t, w, &|r0, block| {
                for (r, o) in block.chunks_exact_mut(w).enumerate() {
                    o.copy_from_slice(&qkv[(r0 + r) * width + first..][..w]);
                }
            })
        };
        let (mut q, mut k, mut v) = (columns(0, qw), columns(qw, kw), columns(qw + kw, kw));
        let tb = &self.tables;
        rotate(&mut q, self.heads, self.head_dim, &self.positions, tb, &tb.sin_host);
        rotate(&mut k, self.kv_heads, self.head_dim, &self.positions, tb, &tb.sin_host);
        as_cached(self.kv, &mut k);
        as_cached(self.kv, &mut v);
        [q, k, v]
    }
}

impl CustomOp1 for PackedSelfAttention {
    fn name(&self) -> &'static str {
        "tandem-packed-self-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let t = l.shape().dims2()?.0;
        let [q, k, v] = self.split(f32_slice(s, l)?);
        let out = attention_fwd(&q, &k, &v, (self.heads, self.kv_heads, self.head_dim), &self.lens)?;
        Ok((CpuStorage::F32(out), Shape::from((t, self.heads * self.head_dim))))
    }
    /// The split's gradient is the rows of dq and dk (rotated back) and dv side by side.
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        let (t, width) = qkv.dims2()?;
        let (h, kvh, d, device) = (self.heads, self.kv_heads, self.head_dim, qkv.device());
        let view = f32_view(qkv)?;
        let guard = view.storage_and_layout();
        let [q, k, v] = self.split(host(&guard)?);
        let q = Tensor::from_vec(q, (t, h, d), device)?;
        let (k, v) = (Tensor::from_vec(k, (t, kvh, d), device)?, Tensor::from_vec(v, (t, kvh, d), device)?);
        let [mut dq, mut dk, dv] = attention_bwd(&q, &k, &v, g, &self.lens)?;
        rotate_back(&mut dq, h, d, &self.positions, &self.tables)?;
        rotate_back(&mut dk, kvh, d, &self.positions, &self.tables)?;
        let (qw, kw) = (h * d, kvh * d);
        // SAFETY: each row is written whole: q, k and v columns side by side (width = qw + 2 kw).
        let out = unsafe {
            super::rows_written(t, width, &|r0, block| {
                for (r, o) in (r0..).zip(block.chunks_exact_mut(width)) {
                    o[..qw].copy_from_slice(&dq[r * qw..(r + 1) * qw]);
                    o[qw..qw + kw].copy_from_slice(&dk[r * kw..(r + 1) * kw]);
                    o[qw + kw..].copy_from_slice(&dv[r * kw..(r + 1) * kw]);
                }
            })
        };
        Tensor::from_vec(out, (t, width), device).map(Some)
    }
}

/// Query positions per block of the attention backward: a work item's temporaries are
/// [block·group, keys seen] (two per item running), so memory grows linearly with the sequence (a
/// whole [heads, t, t] at 5,000 tokens is ~0.9 GB per tensor).
pub const BWD_QUERY_BLOCK: usize = 64;

/// (Query, key seen) position pairs a work item of the attention backward takes: its query blocks
/// end with the first that reaches this many. A long sequence's queries go in several items, so
/// that one sequence of 1,024 tokens over SmolLM2's three kv heads still shares out evenly among
/// the threads (three items on two threads left one idle a third of the time). Fixed, not per
/// machine, so the gradients' rounding does not depend on the thread count.
const BWD_PART_PAIRS: usize = 1 << 18;

/// A sequence of n positions in parts of whole query blocks of about `BWD_PART_PAIRS` work each.
fn bwd_parts(n: usize) -> Vec<(usize, usize)> {
    let (mut parts, mut start, mut work) = (Vec::new(), 0, 0);
    for r0 in (0..n).step_by(BWD_QUERY_BLOCK) {
        let end = (r0 + BWD_QUERY_BLOCK).min(n);
        work += (end - r0) * end;
        if work >= BWD_PART_PAIRS {
            parts.push((start, end));
            (start, work) = (end, 0);
        }
    }
    if start < n {
        parts.push((start, n));
    }
    parts
}

/// The attention backward of sequences packed one after another, q: [t, heads, d], k and v:
/// [t, kv heads, d], g: [t, heads·d]. One work item per (sequence, kv head, part of the
/// sequence's queries), in parallel: the query heads that share the kv head go through every
/// product together, their rows stacked position by position, so each product is `group` times
/// taller and dK and dV sum the group inside the product (an item per query head, summed after,
/// took 7% of a SmolLM2 full training pass; grouped, passes of 4 x 1,024 tokens ran 6-7% faster,
/// docs/performance.md, 2026-12-07). Parts of one sequence add their dK and dV after, in order.
fn attention_bwd(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, lens: &[usize]) -> CResult<[Vec<f32>; 3]> {
    let (t, heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let [q, k, v, g] = [q, k, v, g].map(|x| x.detach().contiguous());
    let (q, k, v, g) = (q?, k?, v?, g?);
    let guards = [&q, &k, &v, &g].map(|x| x.storage_and_layout());
    let [qs, ks, vs, gs] = [&guards[0], &guards[1], &guards[2], &guards[3]].map(host);
    let (qs, ks, vs, gs) = (qs?, ks?, vs?, gs?);
    let starts: Vec<usize> = lens.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
    // (sequence, kv head, query positions)
    let items: Vec<(usize, usize, (usize, usize))> = (0..lens.len())
        .flat_map(|s| (0..kv_heads).flat_map(move |h| bwd_parts(lens[s]).into_iter().map(move |p| (s, h, p))))
        .collect();
    let (q_stride, kv_stride) = (heads * d, kv_heads * d);
    let mut dq = vec![0f32; t * heads * d];
    let dq_out = kernels::SharedMut(dq.as_mut_ptr());
    let key_grads: Vec<std::sync::Mutex<[Vec<f32>; 2]>> = items.iter().map(|_| Default::default()).collect();
    team::for_each(items.len(), &|i| {
        let (s, h, part) = items[i];
        let (qo, kvo) = ((starts[s] * heads + h * group) * d, (starts[s] * kv_heads + h) * d);
        let rows = GroupRows { q: &qs[qo..], k: &ks[kvo..], v: &vs[kvo..], g: &gs[qo..], q_stride, kv_stride, group };
        let [gq, gk, gv] = group_bwd(&rows, part, d);
        #[allow(clippy::redundant_locals)]
        let dq_out = &dq_out;
        // SAFETY: item (s, h, part) writes only the rows of its sequence's positions in part, of
        // query heads h·group.., which no other item writes; dq holds t rows of every head.
        unsafe {
            for (r, row) in gq.chunks_exact(group * d).enumerate() {
                let at = qo + (part.0 + r) * q_stride;
                std::ptr::copy_nonoverlapping(row.as_ptr(), dq_out.0.add(at), group * d);
            }
        }
        *key_grads[i].lock().unwrap_or_else(|p| p.into_inner()) = [gk, gv];
    });
    let (mut dk, mut dv) = (vec![0f32; t * kv_stride], vec![0f32; t * kv_stride]);
    for ((s, h, _), grads) in items.iter().zip(key_grads) {
        let [gk, gv] = grads.into_inner().unwrap_or_else(|p| p.into_inner());
        let kvo = (starts[*s] * kv_heads + h) * d;
        for (out, part) in [(&mut dk, gk), (&mut dv, gv)] {
            for (r, row) in part.chunks_exact(d).enumerate() {
                let o = &mut out[kvo + r * kv_stride..][..d];
                o.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    }
    Ok([dq, dk, dv])
}

/// The query heads of one kv head over one sequence: their query and output-gradient rows (a
/// position's `group` heads side by side, positions `q_stride` values apart), the kv head's key
/// and value rows (`kv_stride` apart), each slice starting at the sequence's first row.
struct GroupRows<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    q_stride: usize,
    kv_stride: usize,
    group: usize,
}

/// For a kv head's query heads at the positions from..to of one causal sequence, their dQ
/// ([to - from, group, d]) and what they add to dK and dV ([to, d]: the keys they see), the
/// heads' rows stacked position by position (row i·group + j: position i, head j):
/// P = softmax(scale·Q·Kᵀ) with position i seeing keys 0..=i, dP = G·Vᵀ,
/// dS = P∘(dP − rowsum(P∘dP)), dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·G.
fn group_bwd(x: &GroupRows, (from, to): (usize, usize), d: usize) -> [Vec<f32>; 3] {
    let scale = 1.0 / (d as f32).sqrt();
    let (group, kvs) = (x.group, x.kv_stride);
    let width = group * d;
    let (mut dq, mut dk, mut dv) = (vec![0f32; (to - from) * width], vec![0f32; to * d], vec![0f32; to * d]);
    let (mut qb, mut gb, mut p, mut ds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r0 in (from..to).step_by(BWD_QUERY_BLOCK) {
        let b = BWD_QUERY_BLOCK.min(to - r0);
        let (seen, rows) = (r0 + b, b * group);
        // The block's query and gradient rows, stacked ([rows, d]).
        let stack = |src: &[f32], out: &mut Vec<f32>| {
            out.clear();
            (r0..seen).for_each(|i| out.extend_from_slice(&src[i * x.q_stride..][..width]));
        };
        stack(x.q, &mut qb);
        stack(x.g, &mut gb);
        p.resize(rows * seen, 0.0);
        gemm_on(false, (rows, seen, d), &mut p, false, scale, (&qb, d, 1), (x.k, 1, kvs));
        for (r, row) in p.chunks_exact_mut(seen).enumerate() {
            causal_softmax(row, r0 + r / group + 1);
        }
        ds.resize(rows * seen, 0.0);
        gemm_on(false, (rows, seen, d), &mut ds, false, 1.0, (&gb, d, 1), (x.v, 1, kvs));
        for (r, (dr, pr)) in ds.chunks_exact_mut(seen).zip(p.chunks_exact(seen)).enumerate() {
            // Keys past the row's position have p = 0, so their dS is 0.
            let visible = r0 + r / group + 1;
            let ((dr, future), pr) = (dr.split_at_mut(visible), &pr[..visible]);
            let c = kernels::dot(dr, pr);
            dr.iter_mut().zip(pr).for_each(|(a, &pv)| *a = pv * (*a - c));
            future.fill(0.0);
        }
        gemm_on(false, (rows, d, seen), &mut dq[(r0 - from) * width..], false, scale, (&ds, seen, 1), (x.k, kvs, 1));
        gemm_on(false, (seen, d, rows), &mut dk, true, scale, (&ds, 1, seen), (&qb, d, 1));
        gemm_on(false, (seen, d, rows), &mut dv, true, 1.0, (&p, 1, seen), (&gb, d, 1));
    }
    [dq, dk, dv]
}

/// Softmax over a row's first `visible` scores in place; the rest (future keys) become 0. The
/// exponentials go through the vector kernel: a libm call per score made the attention backward
/// ~5% slower.
fn causal_softmax(row: &mut [f32], visible: usize) {
    let (seen, future) = row.split_at_mut(visible);
    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    kernels::scale_exp_in_place(seen, max, 1.0);
    let mut sums = [0f32; 8];
    let whole = seen.len() / 8 * 8;
    for c in seen[..whole].chunks_exact(8) {
        sums.iter_mut().zip(c).for_each(|(s, v)| *s += v);
    }
    let sum = sums.iter().sum::<f32>() + seen[whole..].iter().sum::<f32>();
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|s| *s *= inv);
    future.fill(0.0);
}

/// Attention probabilities of grouped queries qg: [kvh, group·t, d] over keys kt: [kvh, t, d],
/// each query row i (of every group) seeing keys 0..=i.
pub(super) fn causal_probs(qg: &Tensor, kt: &Tensor, group: usize) -> CResult<Tensor> {
    causal_probs_from(qg, kt, group, 0)
}

/// As `causal_probs` for a block of queries at positions first.. (qg: [kvh, group·n, d], each
/// group's rows in position order) over keys kt: [kvh, seen, d]; row i of a group sees keys
/// 0..=first + i.
fn causal_probs_from(qg: &Tensor, kt: &Tensor, group: usize, first: usize) -> CResult<Tensor> {
    let (_, seen, d) = kt.dims3()?;
    let n = qg.dim(1)? / group;
    let mut mask = vec![0f32; group * n * seen];
    for r in 0..group * n {
        for j in (first + r % n + 1)..seen {
            mask[r * seen + j] = f32::NEG_INFINITY;
        }
    }
    let mask = Tensor::from_vec(mask, (group * n, seen), qg.device())?;
    let s = (qg.matmul(&kt.t()?)? * (1.0 / (d as f64).sqrt()))?.broadcast_add(&mask)?;
    let max = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}
