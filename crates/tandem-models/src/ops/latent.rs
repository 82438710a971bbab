//! Attention over a latent KV cache (a CARE-converted model): per token and layer the cache holds
//! a key latent c_k (rank r_K) and a value latent c_v (rank r_V) instead of every KV head's key and
//! value. Keys are k = rope(norm(K_up·c_k + b_k)); values are v = V_up·c_v + b_v.
//!
//! Values never exist: softmax weights sum to one, so a query head's output Σ_p w_p·v_p equals
//! V_up·(Σ_p w_p·c_v,p) + b_v, and the weighted sum runs over the r_V-wide latents (one
//! expansion per query row, not one per cached position). Keys cannot be absorbed the same way:
//! rope rotates each expanded key by its own position, so q·rope_p(K_up·c) has no form that
//! leaves c alone. Each attention item (one sequence's run of query rows, one KV head) expands
//! the keys it reads once — r_K·head_dim multiply-adds per cached position and KV head — into a
//! scratch buffer that is reused and never kept: the cache stays small, and a step pays that
//! expansion on top of the plain kernel's work (measured in docs/care.md).
//!
//! Each row's result depends only on its own query and the cache (the expansion of position p is
//! the same instructions whichever item does it), so verifying drafted tokens gives each bit for
//! bit what decoding it alone would, as on the plain path.
//!
//! An f16 cache holds the latents rounded once as they are written; an item converts the rows it
//! reads to f32 first, so the arithmetic is the f32 cache's over the rounded values.
use super::kernels::{self, KvElem, TokenSlot};
use super::{host, team, OpsPath, RopeTables};
use candle_core::{DType, Tensor, D};

type CResult<T> = candle_core::Result<T>;

/// One latent layer's expansions and what keys go through after them.
pub struct LatentWeights<'a> {
    /// [kv_heads * head_dim, r_K]
    pub k_up: &'a Tensor,
    pub k_bias: Option<&'a Tensor>,
    /// [kv_heads * head_dim, r_V]
    pub v_up: &'a Tensor,
    pub v_bias: Option<&'a Tensor>,
    /// Per-head RMSNorm of keys before rope (Qwen3), with its epsilon.
    pub k_norm: Option<(&'a Tensor, f64)>,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope: &'a RopeTables,
}

/// Attention of q: [tokens, heads, head_dim] (roped) over each token's slot in latent caches
/// [blocks, 1, block, r_K] and [blocks, 1, block, r_V]; `positions[i]` is token i's rope position
/// (its cache row's, except a draft-tree sibling's). Positions before a slot's first new token
/// hold their own position. Returns [tokens, heads * head_dim].
#[allow(clippy::too_many_arguments)]
pub fn latent_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tokens: &[TokenSlot],
    positions: &[usize],
    tables: &[Vec<u32>],
    w: &LatentWeights,
    path: OpsPath,
) -> CResult<Tensor> {
    match path {
        OpsPath::CpuKernels => cpu(q, k_cache, v_cache, tokens, positions, tables, w),
        OpsPath::Generic => generic(q, k_cache, v_cache, tokens, positions, tables, w),
    }
}

/// The rope position of cache row `p` of the slot whose first new token (token index `first`)
/// sits at row `start`.
fn rope_position(p: usize, first: usize, start: usize, positions: &[usize]) -> usize {
    if p < start {
        p
    } else {
        positions[first + p - start]
    }
}

/// Runs of `tokens` that belong to one slot: (first index, end index).
fn slot_runs(tokens: &[TokenSlot]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < tokens.len() {
        let end = start + tokens[start..].iter().take_while(|ts| ts.slot == tokens[start].slot).count();
        runs.push((start, end));
        start = end;
    }
    runs
}

// ---------------------------------------------------------------- generic (candle primitives)

#[allow(clippy::too_many_arguments)]
fn generic(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tokens: &[TokenSlot],
    positions: &[usize],
    tables: &[Vec<u32>],
    w: &LatentWeights,
) -> CResult<Tensor> {
    let (_t, heads, d) = q.dims3()?;
    let kvh = w.kv_heads;
    let group = heads / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let r_v = v_cache.dim(3)?;
    // [kvh, r_V, d]: the expansion of each KV head's value latent, transposed for a batched product.
    let v_up = w.v_up.to_dtype(DType::F32)?.reshape((kvh, d, r_v))?.transpose(1, 2)?.contiguous()?;
    let mut outs = Vec::new();
    for (first, end) in slot_runs(tokens) {
        let (slot, start) = (tokens[first].slot, tokens[first].pos);
        for (i, &ts) in tokens.iter().enumerate().take(end).skip(first) {
            let len = ts.pos + 1;
            let k_lat = super::gather_blocks(k_cache, &tables[slot], len)?.squeeze(0)?.to_dtype(DType::F32)?; // [len, r_K]
            let v_lat = super::gather_blocks(v_cache, &tables[slot], len)?.to_dtype(DType::F32)?; // [1, len, r_V]
            let rows: Vec<usize> = (0..len).map(|p| rope_position(p, first, start, positions)).collect();
            let keys = expand_keys(&k_lat, &rows, w)?.transpose(0, 1)?.contiguous()?; // [kvh, len, d]
            let qr = q.narrow(0, i, 1)?.squeeze(0)?.reshape((kvh, group, d))?;
            let scores = (qr.matmul(&keys.t()?)? * scale)?; // [kvh, group, len]
                                                            // Positions between the prefix and the token's own row are draft branches it must not see.
            let mut mask = vec![0f32; len];
            mask[ts.prefix.min(ts.pos)..ts.pos].fill(f32::NEG_INFINITY);
            let scores = scores.broadcast_add(&Tensor::from_vec(mask, len, q.device())?)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
            let o_lat = p.broadcast_matmul(&v_lat)?; // [kvh, group, r_V]
            let mut o = o_lat.matmul(&v_up)?; // [kvh, group, d]
            if let Some(b) = w.v_bias {
                o = o.broadcast_add(&b.reshape((kvh, 1, d))?)?;
            }
            outs.push(o.reshape((1, heads * d))?);
        }
    }
    Tensor::cat(&outs, 0)
}

/// Keys [rows, kv_heads, head_dim] from key latents [rows, r_K] at rope positions `positions`
/// (also the training forward's expansion: gradients flow to the latents and the weights).
pub fn expand_keys(k_lat: &Tensor, positions: &[usize], w: &LatentWeights) -> CResult<Tensor> {
    let path = if k_lat.device().is_cpu() { OpsPath::CpuKernels } else { OpsPath::Generic };
    expand_keys_on(k_lat, positions, w, path)
}

/// `expand_keys` on a chosen op path.
pub fn expand_keys_on(k_lat: &Tensor, positions: &[usize], w: &LatentWeights, path: OpsPath) -> CResult<Tensor> {
    let n = k_lat.dim(0)?;
    let mut k = super::matmul_xwt(k_lat, w.k_up, path)?;
    if let Some(b) = w.k_bias {
        k = k.broadcast_add(b)?;
    }
    let mut k = k.reshape((n, w.kv_heads, w.head_dim))?;
    if let Some((norm, eps)) = w.k_norm {
        k = super::rms_norm(&k, norm, eps, path)?;
    }
    super::rope(&k, positions, w.rope, path)
}

/// Values [rows, kv_heads, head_dim] from value latents [rows, r_V] (the training forward's).
pub fn expand_values(v_lat: &Tensor, w: &LatentWeights, path: OpsPath) -> CResult<Tensor> {
    let n = v_lat.dim(0)?;
    let mut v = super::matmul_xwt(v_lat, w.v_up, path)?;
    if let Some(b) = w.v_bias {
        v = v.broadcast_add(b)?;
    }
    v.reshape((n, w.kv_heads, w.head_dim))
}

// ---------------------------------------------------------------- CPU kernel

/// A CPU tensor's f32 values (contiguous), read in place while `guard` lives.
/// Host views of a latent layer's weights.
struct Host<'a> {
    k_up: &'a [f32],
    k_bias: Option<&'a [f32]>,
    v_up: &'a [f32],
    v_bias: Option<&'a [f32]>,
    k_norm: Option<(&'a [f32], f32)>,
    kv_heads: usize,
    d: usize,
    r_k: usize,
    r_v: usize,
    block: usize,
}

fn cpu(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    tokens: &[TokenSlot],
    positions: &[usize],
    tables: &[Vec<u32>],
    w: &LatentWeights,
) -> CResult<Tensor> {
    let (t, heads, d) = q.dims3()?;
    let (_, _, block, r_k) = k_cache.dims4()?;
    let r_v = v_cache.dim(3)?;
    let q = q.contiguous()?;
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    // Keys expand as Σ_m c_m·K_upᵀ[m] (rows of the transpose: d contiguous numbers each).
    let (k_up, v_up) = (f32_of(&w.k_up.t()?)?, f32_of(w.v_up)?);
    let none = Tensor::zeros(0, DType::F32, q.device())?;
    let (k_bias, v_bias) = (w.k_bias.unwrap_or(&none).contiguous()?, w.v_bias.unwrap_or(&none).contiguous()?);
    let k_norm = w.k_norm.map(|(n, _)| n).unwrap_or(&none).contiguous()?;
    let g = [&q, &k_up, &v_up, &k_bias, &v_bias, &k_norm].map(|t| t.storage_and_layout());
    let [qs, ku, vu, kb, vb, kn] = [&g[0], &g[1], &g[2], &g[3], &g[4], &g[5]];
    fn opt(s: &[f32]) -> Option<&[f32]> {
        (!s.is_empty()).then_some(s)
    }
    let h = Host {
        k_up: host(ku)?,
        k_bias: opt(host(kb)?),
        v_up: host(vu)?,
        v_bias: opt(host(vb)?),
        k_norm: opt(host(kn)?).map(|n| (n, w.k_norm.map(|(_, e)| e as f32).unwrap_or(0.0))),
        kv_heads: w.kv_heads,
        d,
        r_k,
        r_v,
        block,
    };
    let rope = (&w.rope.cos_host[..], &w.rope.sin_host[..], w.rope.interleaved);
    let mut out = vec![0f32; t * heads * d];
    let (kc, vc) = (k_cache.storage_and_layout(), v_cache.storage_and_layout());
    let qh = host(qs)?;
    match k_cache.dtype() {
        DType::F16 => {
            let (k, v) = (super::host_of::<half::f16>(&kc)?, super::host_of::<half::f16>(&vc)?);
            attention(qh, k, v, tokens, positions, tables, heads, &h, rope, &mut out)
        }
        _ => attention(qh, host(&kc)?, host(&vc)?, tokens, positions, tables, heads, &h, rope, &mut out),
    }
    Tensor::from_vec(out, (t, heads * d), q.device())
}

/// Query tokens per work item: an item expands the keys it reads once for all its rows, so
/// longer chunks waste less on expanding the same keys twice; shorter ones balance the threads
/// in a long prefill.
const TOKENS_PER_ITEM: usize = 64;

#[allow(clippy::too_many_arguments)]
fn attention<E: KvElem>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    tokens: &[TokenSlot],
    positions: &[usize],
    tables: &[Vec<u32>],
    heads: usize,
    h: &Host,
    rope: (&[f32], &[f32], bool),
    out: &mut [f32],
) {
    let t = tokens.len();
    assert_eq!(out.len(), t * heads * h.d);
    let mut items = Vec::new();
    for (first, end) in slot_runs(tokens) {
        for kv in 0..h.kv_heads {
            for a in (first..end).step_by(TOKENS_PER_ITEM) {
                items.push((first, a, (a + TOKENS_PER_ITEM).min(end), kv));
            }
        }
    }
    let dst = kernels::SharedMut(out.as_mut_ptr());
    let item = |i: usize| {
        let (first, a, b, kv) = items[i];
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: an item writes only the rows of its tokens for the query heads of its KV head;
        // no two items share a (token, KV head).
        let out = unsafe { std::slice::from_raw_parts_mut(dst.0, t * heads * h.d) };
        SCRATCH.with_borrow_mut(|scratch| {
            let table = &tables[tokens[first].slot];
            let rope_at = |p: usize| rope_position(p, first, tokens[first].pos, positions);
            let job = Item { q, k_cache, v_cache, tokens, table, first: a, end: b, kv, heads, h, rope };
            run_item(&job, &rope_at, scratch, out);
        });
    };
    let work: usize = tokens.iter().map(|ts| ts.pos + 1).sum::<usize>() * h.kv_heads * h.d * h.r_k;
    if work < 1 << 16 {
        (0..items.len()).for_each(item);
    } else {
        team::for_each(items.len(), &item);
    }
}

thread_local! {
    /// Each thread's buffers for the item it runs.
    static SCRATCH: std::cell::RefCell<Scratch> = const { std::cell::RefCell::new(Scratch::new()) };
}

/// One work item: query tokens first..end of one slot, the query heads of KV head `kv`.
struct Item<'a, E> {
    q: &'a [f32],
    k_cache: &'a [E],
    v_cache: &'a [E],
    tokens: &'a [TokenSlot],
    table: &'a [u32],
    first: usize,
    end: usize,
    kv: usize,
    heads: usize,
    h: &'a Host<'a>,
    rope: (&'a [f32], &'a [f32], bool),
}

/// An item's buffers: expanded keys, scores, the value-latent sum, and (an f16 cache) one latent
/// row converted to f32.
struct Scratch {
    keys: Vec<f32>,
    scores: Vec<f32>,
    o_lat: Vec<f32>,
    row: Vec<f32>,
}

impl Scratch {
    const fn new() -> Scratch {
        Scratch { keys: Vec::new(), scores: Vec::new(), o_lat: Vec::new(), row: Vec::new() }
    }
}

/// Row p of a slot's latent cache (`width` numbers) as f32: the cache's own row, or (an f16
/// cache) the row converted into `buf`, which stays in L1 for the row's use.
#[inline(always)]
fn latent_row<'a, E: KvElem>(
    cache: &'a [E],
    table: &[u32],
    p: usize,
    (block, width): (usize, usize),
    buf: &'a mut [f32],
) -> &'a [f32] {
    let at = latent_at(table, p, block, width);
    let raw = &cache[at..at + width];
    if let Some(row) = E::as_f32(raw) {
        return row;
    }
    let buf = &mut buf[..width];
    E::get(buf, raw);
    buf
}

/// Runs an item with AVX2 code where the CPU has it (the same Rust compiled for wider vectors:
/// the expansions, scores and latent sums are plain loops the compiler vectorises).
fn run_item<E: KvElem>(it: &Item<E>, rope_at: &dyn Fn(usize) -> usize, scratch: &mut Scratch, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2 and F16C.
            return unsafe { run_item_avx2(it, rope_at, scratch, out) };
        }
    }
    run_item_portable(it, rope_at, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn run_item_avx2<E: KvElem>(
    it: &Item<E>,
    rope_at: &dyn Fn(usize) -> usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    run_item_portable(it, rope_at, scratch, out)
}

#[inline(always)]
fn run_item_portable<E: KvElem>(
    it: &Item<E>,
    rope_at: &dyn Fn(usize) -> usize,
    scratch: &mut Scratch,
    out: &mut [f32],
) {
    let Scratch { keys, scores, o_lat, row } = scratch;
    let (h, d) = (it.h, it.h.d);
    let end = it.tokens[it.first..it.end].iter().map(|ts| ts.pos + 1).max().unwrap_or(0);
    row.resize(h.r_k.max(h.r_v), 0.0);
    expand_item_keys(it.k_cache, it.table, it.kv, end, rope_at, h, it.rope, (keys, row));
    let group = it.heads / h.kv_heads;
    for (ti, ts) in it.tokens.iter().enumerate().take(it.end).skip(it.first) {
        for head in it.kv * group..(it.kv + 1) * group {
            let at = (ti * it.heads + head) * d;
            let o = &mut out[at..at + d];
            attend_row(&it.q[at..at + d], keys, (it.v_cache, it.table), it.kv, ts, h, (scores, o_lat, row), o);
        }
    }
}

/// Where row `p` of a slot's latent cache of `width` numbers per row starts.
#[inline]
fn latent_at(table: &[u32], p: usize, block: usize, width: usize) -> usize {
    (table[p / block] as usize * block + p % block) * width
}

/// Keys 0..end of KV head `kv`, expanded from the latents, normed and roped: [end, d].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn expand_item_keys<E: KvElem>(
    k_cache: &[E],
    table: &[u32],
    kv: usize,
    end: usize,
    rope_at: &dyn Fn(usize) -> usize,
    h: &Host,
    (cos, sin, interleaved): (&[f32], &[f32], bool),
    (keys, row): (&mut Vec<f32>, &mut [f32]),
) {
    let d = h.d;
    keys.clear();
    keys.resize(end * d, 0.0);
    let bias = h.k_bias.map(|b| &b[kv * d..(kv + 1) * d]);
    for p in 0..end {
        let lat = latent_row(k_cache, table, p, (h.block, h.r_k), row);
        let key = &mut keys[p * d..(p + 1) * d];
        expand_key(h.k_up, kv, lat, bias, key);
        if let Some((norm, eps)) = h.k_norm {
            let copy = key.to_vec();
            kernels::rms_norm(&copy, norm, eps, key);
        }
        kernels::rope(key, 1, d, &[rope_at(p)], cos, sin, interleaved);
    }
}

/// key = K_up[kv head]·lat + bias, with `k_up_t` the transpose [r_K, kv_heads·d]: r_K steps of
/// `key += lat[m]·row m`. With AVX2 and FMA and a head of 32, 64 or 128 the key stays in
/// registers for all r_K steps (the expansion is most of a latent layer's attention work).
#[inline(always)]
fn expand_key(k_up_t: &[f32], kv: usize, lat: &[f32], bias: Option<&[f32]>, key: &mut [f32]) {
    let d = key.len();
    let width = k_up_t.len() / lat.len();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA; every row has d numbers at kv·d, key has d.
            match d {
                32 => return unsafe { fma::expand_key::<4>(k_up_t, width, kv * d, lat, bias, key) },
                64 => return unsafe { fma::expand_key::<8>(k_up_t, width, kv * d, lat, bias, key) },
                128 => return unsafe { fma::expand_key::<16>(k_up_t, width, kv * d, lat, bias, key) },
                _ => {}
            }
        }
    }
    match bias {
        Some(b) => key.copy_from_slice(b),
        None => key.fill(0.0),
    }
    for (m, &c) in lat.iter().enumerate() {
        let row = &k_up_t[m * width + kv * d..m * width + (kv + 1) * d];
        for (k, &u) in key.iter_mut().zip(row) {
            *k += c * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// `expand_key` for d = 8·N: N accumulators of eight, one fused multiply-add per row part.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; rows of `k_up_t` (`width` apart) hold d numbers at `at`;
    /// `key` and `bias` have d.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand_key<const N: usize>(
        k_up_t: &[f32],
        width: usize,
        at: usize,
        lat: &[f32],
        bias: Option<&[f32]>,
        key: &mut [f32],
    ) {
        debug_assert_eq!(key.len(), 8 * N);
        debug_assert!((lat.len() - 1) * width + at + 8 * N <= k_up_t.len());
        let mut acc = [_mm256_setzero_ps(); N];
        if let Some(b) = bias {
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(b.as_ptr().add(8 * i));
            }
        }
        for (m, &c) in lat.iter().enumerate() {
            let cv = _mm256_set1_ps(c);
            let row = k_up_t.as_ptr().add(m * width + at);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(cv, _mm256_loadu_ps(row.add(8 * i)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(key.as_mut_ptr().add(8 * i), *a);
        }
    }
}

/// One query row: softmax over its visible keys, the weighted sum of value latents, expanded once.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_row<E: KvElem>(
    q: &[f32],
    keys: &[f32],
    (v_cache, table): (&[E], &[u32]),
    kv: usize,
    ts: &TokenSlot,
    h: &Host,
    (scores, o_lat, row): (&mut Vec<f32>, &mut Vec<f32>, &mut [f32]),
    out: &mut [f32],
) {
    let d = h.d;
    let scale = 1.0 / (d as f32).sqrt();
    // Keys 0..len, then the token's own when it is a draft-tree sibling.
    let (len, own) = if ts.prefix >= ts.pos { (ts.pos + 1, None) } else { (ts.prefix, Some(ts.pos)) };
    let visible = (0..len).chain(own);
    scores.clear();
    scores.extend(visible.clone().map(|p| kernels::dot(q, &keys[p * d..(p + 1) * d]) * scale));
    let inv = kernels::softmax_in_place(scores);
    o_lat.clear();
    o_lat.resize(h.r_v, 0.0);
    for (&s, p) in scores.iter().zip(visible) {
        let wgt = s * inv;
        for (o, &v) in o_lat.iter_mut().zip(latent_row(v_cache, table, p, (h.block, h.r_v), row)) {
            *o += wgt * v;
        }
    }
    let up = &h.v_up[kv * d * h.r_v..(kv + 1) * d * h.r_v];
    for (i, o) in out.iter_mut().enumerate() {
        *o = kernels::dot(&up[i * h.r_v..(i + 1) * h.r_v], o_lat) + h.v_bias.map_or(0.0, |b| b[kv * d + i]);
    }
}
