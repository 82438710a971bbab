//! Backward passes of the CPU kernels, so training runs the very kernels serving runs.
//!
//! A model being trained computes its forward with the same fused kernels as the sampler: the
//! logprobs a training step sees for a sampled token are then bit-for-bit the ones the sampler
//! reported (trainer/sampler mismatch destabilises RL). Each backward here works on host slices
//! (products through gemm, elementwise passes in parallel rows); it only runs when an input is
//! being differentiated.
use super::{f32_slice, gemm, gemm_new, gemm_on, host, kernels, sink, CResult, RopeTables};
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
/// serving's row for row.
pub(super) struct SelfAttention {
    pub lens: Vec<usize>,
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
        let out = attention_fwd(q, k, v, (heads, kv_heads, d), &self.lens)?;
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
        let [dq, dk, dv] = attention_bwd(q, k, v, g, &self.lens)?;
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
}

impl PackedSelfAttention {
    /// The op for sequences of `lens` at `positions`, heads (heads, kv heads, head dim).
    pub(super) fn new(
        (heads, kv_heads, head_dim): (usize, usize, usize),
        positions: &[usize],
        tables: &RopeTables,
        lens: &[usize],
    ) -> Self {
        let (positions, tables, lens) = (positions.to_vec(), tables.clone(), lens.to_vec());
        PackedSelfAttention { heads, kv_heads, head_dim, positions, tables, lens }
    }

    /// [q roped, k roped, v] as rows [t, heads or kv heads, d], from qkv's values.
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
        let (mut q, mut k, v) = (columns(0, qw), columns(qw, kw), columns(qw + kw, kw));
        let tb = &self.tables;
        rotate(&mut q, self.heads, self.head_dim, &self.positions, tb, &tb.sin_host);
        rotate(&mut k, self.kv_heads, self.head_dim, &self.positions, tb, &tb.sin_host);
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

/// Query rows per block of the attention backward: a work item's temporaries are [block, keys
/// seen] (two per item running), so memory grows linearly with the sequence (a whole
/// [heads, t, t] at 5,000 tokens is ~0.9 GB per tensor).
pub const BWD_QUERY_BLOCK: usize = 128;

/// The attention backward of sequences packed one after another, q: [t, heads, d], k and v:
/// [t, kv heads, d], g: [t, heads·d]. One work item per (sequence, head), in parallel; each takes
/// its queries a block at a time and recomputes the block's probabilities from q and k (so only
/// [block, keys seen] temporaries exist), with every product through gemm over the tensors' own
/// strides. Heads that share a kv head add their dK and dV after.
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
    let items: Vec<(usize, usize)> = (0..lens.len()).flat_map(|s| (0..heads).map(move |h| (s, h))).collect();
    let parts: Vec<[Vec<f32>; 3]> = items
        .par_iter()
        .map(|&(s, h)| {
            let (q_rows, g_rows) = (&qs[(starts[s] * heads + h) * d..], &gs[(starts[s] * heads + h) * d..]);
            let kv = (starts[s] * kv_heads + h / group) * d;
            let seq = HeadRows {
                q: q_rows,
                k: &ks[kv..],
                v: &vs[kv..],
                g: g_rows,
                q_stride: heads * d,
                kv_stride: kv_heads * d,
            };
            head_bwd(&seq, lens[s], d)
        })
        .collect();
    // Each row's heads from their items (items run sequence by sequence, heads in order); a kv
    // head sums its group's heads in order, from zero.
    let sequence: Vec<usize> = lens.iter().enumerate().flat_map(|(s, &n)| std::iter::repeat_n(s, n)).collect();
    let gather = |which: usize, out_heads: usize| {
        super::rows_new(t, out_heads * d, &|r0, block| {
            for (r, o) in block.chunks_exact_mut(out_heads * d).enumerate() {
                let (s, row) = (sequence[r0 + r], r0 + r);
                let i = row - starts[s];
                for h in 0..heads {
                    let part = &parts[s * heads + h][which][i * d..(i + 1) * d];
                    let j = if out_heads == heads { h } else { h / group };
                    o[j * d..(j + 1) * d].iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
            }
        })
    };
    Ok([gather(0, heads), gather(1, kv_heads), gather(2, kv_heads)])
}

/// One head of one sequence: its query and output-gradient rows (`q_stride` values apart), its kv
/// head's key and value rows (`kv_stride` apart), each slice starting at the sequence's first row.
struct HeadRows<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    g: &'a [f32],
    q_stride: usize,
    kv_stride: usize,
}

/// dQ, dK and dV ([n, d] each) of one head over one causal sequence of n rows:
/// P = softmax(scale·Q·Kᵀ) with row i seeing keys 0..=i, dP = G·Vᵀ, dS = P∘(dP − rowsum(P∘dP)),
/// dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·G.
fn head_bwd(x: &HeadRows, n: usize, d: usize) -> [Vec<f32>; 3] {
    let scale = 1.0 / (d as f32).sqrt();
    let (qs, kvs) = (x.q_stride, x.kv_stride);
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; n * d]);
    for r0 in (0..n).step_by(BWD_QUERY_BLOCK) {
        let b = BWD_QUERY_BLOCK.min(n - r0);
        let seen = r0 + b;
        let (q, g) = (&x.q[r0 * qs..], &x.g[r0 * qs..]);
        let mut p = vec![0f32; b * seen];
        gemm_on(false, (b, seen, d), &mut p, false, scale, (q, qs, 1), (x.k, 1, kvs));
        for (r, row) in p.chunks_exact_mut(seen).enumerate() {
            causal_softmax(row, r0 + r + 1);
        }
        let mut ds = vec![0f32; b * seen];
        gemm_on(false, (b, seen, d), &mut ds, false, 1.0, (g, qs, 1), (x.v, 1, kvs));
        for (dr, pr) in ds.chunks_exact_mut(seen).zip(p.chunks_exact(seen)) {
            let c: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
            dr.iter_mut().zip(pr).for_each(|(a, &pv)| *a = pv * (*a - c));
        }
        gemm_on(false, (b, d, seen), &mut dq[r0 * d..], false, scale, (&ds, seen, 1), (x.k, kvs, 1));
        gemm_on(false, (seen, d, b), &mut dk, true, scale, (&ds, 1, seen), (q, qs, 1));
        gemm_on(false, (seen, d, b), &mut dv, true, 1.0, (&p, 1, seen), (g, qs, 1));
    }
    [dq, dk, dv]
}

/// Softmax over a row's first `visible` scores in place; the rest (future keys) become 0.
fn causal_softmax(row: &mut [f32], visible: usize) {
    let (seen, future) = row.split_at_mut(visible);
    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in seen.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    seen.iter_mut().for_each(|s| *s /= sum);
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
