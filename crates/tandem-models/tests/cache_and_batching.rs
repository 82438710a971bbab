//! The KV cache and batching do not change results: a batch of sequences of different lengths
//! gives each one's logits alone; truncating and refeeding equals never having fed the extra
//! tokens; chunked prefill equals one-shot prefill.
mod common;

use common::*;
use tandem_models::{load, KvCache, KvDtype, LoadOptions, LoadedModel, LogitsFor, OpsPath, SequenceInput};

const TOL: f64 = 1e-5;
/// The generic path with an f16 cache: its products are not batch invariant, so a key computed in
/// another batch shape can differ from itself by an f32 ulp, and where it lies near a half-
/// precision boundary it then rounds to the neighbouring f16 (~5e-4 of that element). Measured
/// on the tiny checkpoints' chunked prefill: up to 1.8e-5 against 6e-7 with an f32 cache
/// (2026-12-07). The CPU kernels are batch invariant and stay bit for bit.
const TOL_F16_GENERIC: f64 = 1e-4;

fn tol(m: &LoadedModel) -> f64 {
    match (m.model.ops_path(), m.model.config.kv_dtype) {
        (OpsPath::Generic, KvDtype::F16) => TOL_F16_GENERIC,
        _ => TOL,
    }
}

fn alone(m: &LoadedModel, prefix: &[u32], tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(&m.model.config, 1, 128, m.model.device()).unwrap();
    if !prefix.is_empty() {
        m.model
            .forward(
                &[SequenceInput { slot: 0, tokens: prefix, logits: LogitsFor::None, siblings: &[] }],
                &mut cache,
                &[],
            )
            .unwrap();
    }
    let out = m
        .model
        .forward(&[SequenceInput { slot: 0, tokens, logits: LogitsFor::All, siblings: &[] }], &mut cache, &[])
        .unwrap();
    out.logits.to_vec2().unwrap()
}

fn check_batching(m: &LoadedModel, label: &str) {
    // Three sequences at different depths, advancing by different numbers of tokens.
    let prefixes: [Vec<u32>; 3] = [vec![10, 11, 12, 13, 14, 15, 16], vec![], vec![40, 41, 42]];
    let news: [Vec<u32>; 3] = [vec![17, 18], vec![30, 31, 32, 33, 34], vec![43]];
    let mut cache = KvCache::new(&m.model.config, 4, 128, m.model.device()).unwrap();
    // Slots 3, 0 and 2 (out of order on purpose); prefixes fed as one batch too.
    let slots = [3usize, 0, 2];
    let prefill: Vec<SequenceInput> = slots
        .iter()
        .zip(&prefixes)
        .filter(|(_, p)| !p.is_empty())
        .map(|(&slot, p)| SequenceInput { slot, tokens: p, logits: LogitsFor::None, siblings: &[] })
        .collect();
    m.model.forward(&prefill, &mut cache, &[]).unwrap();
    let batch: Vec<SequenceInput> = slots
        .iter()
        .zip(&news)
        .map(|(&slot, t)| SequenceInput { slot, tokens: t, logits: LogitsFor::All, siblings: &[] })
        .collect();
    let out = m.model.forward(&batch, &mut cache, &[]).unwrap();
    let all: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
    for (i, range) in out.logit_rows.iter().enumerate() {
        let expected = alone(m, &prefixes[i], &news[i]);
        let err = relative_error(&all[range.clone()], &expected);
        assert!(err < tol(m), "{label}: sequence {i} batched differs from alone by {err:.2e}");
    }
    for (slot, (p, n)) in slots.iter().zip(prefixes.iter().zip(&news)) {
        assert_eq!(cache.len(*slot), p.len() + n.len());
    }
}

fn check_truncation(m: &LoadedModel, label: &str) {
    let a: Vec<u32> = (20..32).collect();
    let rejected: Vec<u32> = vec![90, 91, 92, 93];
    let c: Vec<u32> = vec![50, 51, 52];
    let mut cache = KvCache::new(&m.model.config, 1, 128, m.model.device()).unwrap();
    m.model
        .forward(&[SequenceInput { slot: 0, tokens: &a, logits: LogitsFor::None, siblings: &[] }], &mut cache, &[])
        .unwrap();
    m.model
        .forward(
            &[SequenceInput { slot: 0, tokens: &rejected, logits: LogitsFor::All, siblings: &[] }],
            &mut cache,
            &[],
        )
        .unwrap();
    cache.truncate(0, a.len()).unwrap();
    let out = m
        .model
        .forward(&[SequenceInput { slot: 0, tokens: &c, logits: LogitsFor::All, siblings: &[] }], &mut cache, &[])
        .unwrap();
    let err = relative_error(&out.logits.to_vec2().unwrap(), &alone(m, &a, &c));
    assert!(err < tol(m), "{label}: logits after truncation differ by {err:.2e}");
}

fn check_chunked_prefill(m: &LoadedModel, label: &str) {
    let tokens: Vec<u32> = (1..40).collect();
    let whole = alone(m, &[], &tokens);
    let mut cache = KvCache::new(&m.model.config, 1, 128, m.model.device()).unwrap();
    let mut rows = Vec::new();
    for chunk in tokens.chunks(7) {
        let out = m
            .model
            .forward(
                &[SequenceInput { slot: 0, tokens: chunk, logits: LogitsFor::All, siblings: &[] }],
                &mut cache,
                &[],
            )
            .unwrap();
        rows.extend(out.logits.to_vec2::<f32>().unwrap());
    }
    let err = relative_error(&rows, &whole);
    assert!(err < tol(m), "{label}: chunked prefill differs by {err:.2e}");
}

/// A tiny checkpoint with a KV cache of `kv` (every tiny test runs both: the latent ones' f16
/// cache holds rounded latents).
fn load_tiny(name: &str, kv: KvDtype) -> LoadedModel {
    load(&tiny_dir().join(name), &LoadOptions { kv_dtype: kv, ..Default::default() }, &mut |_, _| {}).unwrap()
}

#[test]
fn batching_truncation_and_chunking_keep_logits_on_tiny_models() {
    for (name, kv) in TINY.iter().flat_map(|n| [(n, KvDtype::F32), (n, KvDtype::F16)]) {
        let mut m = load_tiny(name, kv);
        for path in [OpsPath::CpuKernels, OpsPath::Generic] {
            m.model.set_ops_path(path);
            let label = format!("{name} {path:?} {kv:?} cache");
            check_batching(&m, &label);
            check_truncation(&m, &label);
            check_chunked_prefill(&m, &label);
        }
    }
}

#[test]
fn batching_and_truncation_keep_logits_on_the_default_models() {
    for (label, m) in default_models() {
        check_batching(&m, &label);
        check_truncation(&m, &label);
    }
}

#[test]
fn selected_positions_and_hidden_states() {
    let m = load_path(&tiny_dir().join("qwen3-qknorm-untied"));
    let tokens: Vec<u32> = (1..9).collect();
    let all = alone(&m, &[], &tokens);
    let mut cache = KvCache::new(&m.model.config, 1, 64, m.model.device()).unwrap();
    let out = m
        .model
        .forward(
            &[SequenceInput { slot: 0, tokens: &tokens, logits: LogitsFor::Positions(vec![6, 2]), siblings: &[] }],
            &mut cache,
            &[1, 0],
        )
        .unwrap();
    let rows: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
    assert!(relative_error(&rows, &[all[6].clone(), all[2].clone()]) < TOL);
    assert_eq!(out.hidden.len(), 2);
    for h in &out.hidden {
        assert_eq!(h.dims(), &[tokens.len(), m.model.config.hidden_size]);
    }
    assert_ne!(out.hidden[0].to_vec2::<f32>().unwrap(), out.hidden[1].to_vec2::<f32>().unwrap());
}

#[test]
fn invalid_batches_are_errors_not_panics() {
    let m = load_path(&tiny_dir().join("llama-bf16-tied"));
    let mut cache = KvCache::new(&m.model.config, 2, 8, m.model.device()).unwrap();
    let f = |cache: &mut KvCache, batch: &[SequenceInput]| m.model.forward(batch, cache, &[]).unwrap_err().to_string();
    assert!(f(&mut cache, &[SequenceInput { slot: 5, tokens: &[1], logits: LogitsFor::Last, siblings: &[] }])
        .contains("slot 5"));
    assert!(f(&mut cache, &[SequenceInput { slot: 0, tokens: &[], logits: LogitsFor::Last, siblings: &[] }])
        .contains("no new tokens"));
    assert!(f(&mut cache, &[SequenceInput { slot: 0, tokens: &[100_000], logits: LogitsFor::Last, siblings: &[] }])
        .contains("vocabulary"));
    assert!(f(&mut cache, &[SequenceInput { slot: 0, tokens: &[1; 9], logits: LogitsFor::Last, siblings: &[] }])
        .contains("more than"));
    let twice = [
        SequenceInput { slot: 1, tokens: &[1], logits: LogitsFor::Last, siblings: &[] },
        SequenceInput { slot: 1, tokens: &[2], logits: LogitsFor::Last, siblings: &[] },
    ];
    assert!(f(&mut cache, &twice).contains("twice"));
    assert!(cache.truncate(0, 3).is_err());
    assert_eq!(cache.len(0), 0, "failed forwards leave the cache as it was");
}

#[test]
fn cpu_kernels_are_batch_invariant_bit_for_bit() {
    // Not merely close: the same bits whatever else shares the forward or how a prompt is chunked,
    // which is what lets the server promise that batching never changes a greedy output. In
    // quantized mode too: each row's inputs are quantized alone and its sums taken in one order.
    for (label, m) in default_models() {
        check_batch_invariance(&m, &label);
    }
}

fn check_batch_invariance(m: &LoadedModel, label: &str) {
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    let whole = alone(m, &[], &prompt);
    let mut cache = KvCache::new(&m.model.config, 2, 128, m.model.device()).unwrap();
    let other: Vec<u32> = (0..23).map(|i| 900 + i * 11).collect();
    let mut rows = Vec::new();
    for (i, chunk) in prompt.chunks(9).enumerate() {
        let noise = &other[..(i * 5 % 23) + 1];
        let out = m
            .model
            .forward(
                &[
                    SequenceInput { slot: 1, tokens: noise, logits: LogitsFor::All, siblings: &[] },
                    SequenceInput { slot: 0, tokens: chunk, logits: LogitsFor::All, siblings: &[] },
                ],
                &mut cache,
                &[],
            )
            .unwrap();
        let all: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
        rows.extend_from_slice(&all[out.logit_rows[1].clone()]);
        cache.reset(1).unwrap();
    }
    assert!(rows == whole, "{label}: batched and chunked logits differ from one-shot logits");
}

/// A draft tree, the chain with siblings at several positions: each sibling's logits are what
/// decoding it in place of its branch gives, and once moved into place the cache continues as if
/// it had been decoded. `exact`: the same bits (CPU kernels), else within `tol`.
fn check_siblings(m: &LoadedModel, label: &str, exact: bool) {
    let prefix: Vec<u32> = (20..33).collect();
    // Fed: the pending token and a chain of three, then siblings of chain tokens 1, 1, 2 and 3.
    let chain = [7u32, 8, 9, 10];
    let (sibs, beside) = ([5u32, 6, 14, 15], [1usize, 1, 2, 3]);
    let fed: Vec<u32> = chain.iter().chain(&sibs).copied().collect();
    let mut cache = KvCache::new(&m.model.config, 2, 64, m.model.device()).unwrap();
    m.model
        .forward(&[SequenceInput { slot: 1, tokens: &prefix, logits: LogitsFor::None, siblings: &[] }], &mut cache, &[])
        .unwrap();
    let noise: Vec<u32> = vec![3, 4, 5];
    let out = m
        .model
        .forward(
            &[
                SequenceInput { slot: 0, tokens: &noise, logits: LogitsFor::All, siblings: &[] },
                SequenceInput { slot: 1, tokens: &fed, logits: LogitsFor::All, siblings: &beside },
            ],
            &mut cache,
            &[],
        )
        .unwrap();
    let rows: Vec<Vec<f32>> = out.logits.to_vec2().unwrap();
    let rows = &rows[out.logit_rows[1].clone()];
    let same = |got: &[Vec<f32>], want: &[Vec<f32>], what: &str| {
        if exact {
            assert!(got == want, "{label}: {what} differs");
        } else {
            let err = relative_error(got, want);
            assert!(err < tol(m), "{label}: {what} differs by {err:.2e}");
        }
    };
    same(&rows[..4], &alone(m, &prefix, &chain), "the chain");
    for (j, (&s, &of)) in sibs.iter().zip(&beside).enumerate() {
        let path: Vec<u32> = chain[..of].iter().copied().chain([s]).collect();
        same(&rows[4 + j..5 + j], &alone(m, &prefix, &path)[of..], &format!("sibling {j}"));
    }
    // The sibling beside chain token 2 wins: its keys and values take that token's place.
    let start = prefix.len();
    cache.move_position(1, start + 4 + 2, start + 2).unwrap();
    assert_eq!(cache.len(1), start + 3);
    let next = [11u32, 12];
    let out = m
        .model
        .forward(&[SequenceInput { slot: 1, tokens: &next, logits: LogitsFor::All, siblings: &[] }], &mut cache, &[])
        .unwrap();
    let decoded = [chain[0], chain[1], sibs[2], next[0], next[1]];
    same(&out.logits.to_vec2().unwrap(), &alone(m, &prefix, &decoded)[3..], "after the move");
}

#[test]
fn draft_tree_siblings_equal_decoding_them_in_place() {
    for (name, kv) in TINY.iter().flat_map(|n| [(n, KvDtype::F32), (n, KvDtype::F16)]) {
        let mut m = load_tiny(name, kv);
        for path in [OpsPath::CpuKernels, OpsPath::Generic] {
            m.model.set_ops_path(path);
            check_siblings(&m, &format!("{name} {path:?} {kv:?} cache"), false);
        }
    }
    for (label, m) in default_models() {
        check_siblings(&m, &label, true);
    }
}

/// Logits of `tokens` fed to `slot` after what it holds (every row).
fn feed(m: &LoadedModel, cache: &mut KvCache, slot: usize, tokens: &[u32]) -> Vec<Vec<f32>> {
    let out =
        m.model.forward(&[SequenceInput { slot, tokens, logits: LogitsFor::All, siblings: &[] }], cache, &[]).unwrap();
    out.logits.to_vec2().unwrap()
}

/// Sequences that start on blocks another sequence computed get what computing them alone
/// gives (`exact`: the same bits), a sequence whose whole prompt is cached copies the block it
/// writes into rather than changing it under its other holders, and other weights never share.
fn check_prefix_sharing(m: &LoadedModel, label: &str, exact: bool) {
    let same = |a: &[Vec<f32>], b: &[Vec<f32>], what: &str| match exact {
        true => assert!(a == b, "{label}: {what} differs"),
        false => assert!(relative_error(a, b) < tol(m), "{label}: {what} differs"),
    };
    let mut cache = KvCache::with_blocks(&m.model.config, 3, 128, 16, m.model.device()).unwrap();
    // Token ids within the tiny models' vocabulary (280).
    let a: Vec<u32> = (0..40).map(|i| 3 + i * 37 % 250).collect();
    feed(m, &mut cache, 0, &a);
    cache.index_prefix(0, &a, 0).unwrap();
    assert_eq!(cache.share_prefix(1, &a, 7, 39).unwrap(), 0, "{label}: other weights shared a block");
    // B shares A's first two blocks (32 tokens) and goes its own way inside the third.
    let b: Vec<u32> = a[..37].iter().copied().chain((0..10).map(|i| 260 + i)).collect();
    assert_eq!(cache.share_prefix(1, &b, 0, b.len() - 1).unwrap(), 32);
    same(&feed(m, &mut cache, 1, &b[32..]), &alone(m, &b[..32], &b[32..]), "a shared prefix's continuation");
    // C is exactly A's two blocks: it holds 31 of their tokens and recomputes the last one into
    // its own copy of the second block.
    let c = &a[..32];
    assert_eq!(cache.share_prefix(2, c, 0, 31).unwrap(), 31);
    let held = cache.usage().held;
    same(&feed(m, &mut cache, 2, &c[31..]), &alone(m, &c[..31], &c[31..]), "a whole cached prompt's last token");
    assert_eq!(cache.usage().held, held + 1, "{label}: the written block was not copied");
    same(&feed(m, &mut cache, 0, &[77]), &alone(m, &a, &[77]), "the first sequence after sharing");
    cache.check().unwrap();
    // Ended sequences leave their indexed blocks cached for the next prompt.
    for slot in 0..3 {
        cache.reset(slot).unwrap();
    }
    assert_eq!(cache.usage().held, 0);
    assert_eq!(cache.usage().cached, 2);
    assert_eq!(cache.share_prefix(0, &a, 0, 39).unwrap(), 32);
    cache.check().unwrap();
}

#[test]
fn shared_prefix_blocks_give_what_computing_alone_gives() {
    for (label, m) in default_models() {
        check_prefix_sharing(&m, &label, true);
    }
    for name in TINY {
        let mut m = load_path(&tiny_dir().join(name));
        for path in [OpsPath::CpuKernels, OpsPath::Generic] {
            m.model.set_ops_path(path);
            check_prefix_sharing(&m, &format!("{name} {path:?}"), path == OpsPath::CpuKernels);
        }
    }
}

#[test]
fn a_full_pool_is_an_error_that_changes_nothing() {
    let m = load_path(&tiny_dir().join(TINY[0]));
    // Four blocks of 16: one sequence of 64 tokens fits, a second one's step does not.
    let mut cache = KvCache::with_blocks(&m.model.config, 2, 64, 4, m.model.device()).unwrap();
    let long: Vec<u32> = (0..50).map(|i| 3 + i).collect();
    feed(&m, &mut cache, 0, &long);
    let err = m
        .model
        .forward(
            &[
                SequenceInput { slot: 0, tokens: &[5], logits: LogitsFor::All, siblings: &[] },
                SequenceInput { slot: 1, tokens: &long[..20], logits: LogitsFor::All, siblings: &[] },
            ],
            &mut cache,
            &[],
        )
        .expect_err("the step does not fit");
    assert!(err.to_string().contains("out of KV blocks"), "{err}");
    assert_eq!((cache.len(0), cache.len(1), cache.available_blocks()), (50, 0, 0));
    cache.check().unwrap();
    cache.truncate(0, 20).unwrap();
    assert_eq!(cache.available_blocks(), 2, "truncation gives back whole blocks");
    assert_eq!(feed(&m, &mut cache, 1, &long[..20]).len(), 20);
    cache.check().unwrap();
}
