//! The training ops that replace autograd over primitives: the fused head (target logprobs
//! without vocabulary-sized logits) and the adapter delta. Each is checked against candle's
//! autograd over the plain formula (values and every gradient), over several forward chunks and
//! backward vocabulary slices, for each kind of head; and the served values stay bit-equal.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor, Var};
use tandem_models::linear::{Linear, LoraPart};
use tandem_models::ops::{self, head, kernels, lora, sink, OpsPath};
use tandem_models::KvDtype;

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 40503) >> 8) as f32 / 16777216.0 * 2.0 - 1.0)
                * scale
        })
        .collect()
}

fn tensor(shape: (usize, usize), seed: u32, scale: f32) -> Tensor {
    Tensor::from_vec(values(shape.0 * shape.1, seed, scale), shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / m.max(1e-12)
}

// More rows than one forward chunk and a vocabulary of three backward slices.
const ROWS: usize = 150;
const HIDDEN: usize = 64;
const VOCAB: usize = 9000;

/// Σ c·lp over the targets, its value and the gradients of `vars`, on one ops path.
fn loss_and_grads(h: &Var, head: &Linear, vars: &[&Var], path: OpsPath) -> (Vec<f32>, Vec<Tensor>) {
    let targets: Vec<u32> = (0..ROWS as u32).map(|i| (i * 7919 + 5) % VOCAB as u32).collect();
    let lp = head::target_logprobs(h.as_tensor(), head, &targets, path).unwrap();
    let c = Tensor::from_vec(values(ROWS, 9, 1.0), ROWS, &Device::Cpu).unwrap();
    let grads = (&lp * &c).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()).collect();
    (lp.to_vec1().unwrap(), g)
}

/// `tol`: the reference multiplies in f32; a quantized head's kernel quantizes its input rows to
/// 8 bits first (its logits differ by that rounding, and the softmax in the gradients with them).
fn check_head(name: &str, head: &Linear, h: &Var, vars: &[&Var], tol: f32) {
    let (fused, fg) = loss_and_grads(h, head, vars, OpsPath::CpuKernels);
    let (reference, rg) = loss_and_grads(h, head, vars, OpsPath::Generic);
    // The fused values are the sampler's: the served logits' target minus their log-sum-exp.
    let logits = head.forward(h.as_tensor(), OpsPath::CpuKernels).unwrap().to_vec2::<f32>().unwrap();
    for (i, row) in logits.iter().enumerate() {
        let t = (i as u32 * 7919 + 5) % VOCAB as u32;
        assert_eq!(
            fused[i],
            row[t as usize] - kernels::log_sum_exp(row),
            "{name}: row {i} is not the sampler's logprob"
        );
        assert!(
            (fused[i] - reference[i]).abs() < tol * fused[i].abs().max(1.0),
            "{name}: row {i}: {} vs {}",
            fused[i],
            reference[i]
        );
    }
    for (k, (a, b)) in fg.iter().zip(&rg).enumerate() {
        let e = max_rel(a, b);
        assert!(e < tol, "{name}: gradient {k} differs from autograd by {e}");
    }
}

#[test]
fn the_fused_head_equals_autograd_over_the_logits_for_every_kind_of_head() {
    let h = Var::from_tensor(&tensor((ROWS, HIDDEN), 1, 1.0)).unwrap();
    let w = tensor((VOCAB, HIDDEN), 2, 0.5);

    let dense = Linear::dense(w.clone(), None);
    check_head("frozen dense", &dense, &h, &[&h], 1e-4);

    let trained = Var::from_tensor(&w).unwrap();
    let full = Linear::dense(trained.as_tensor().clone(), Some(tensor((1, VOCAB), 3, 0.1).flatten_all().unwrap()));
    check_head("trained dense with a frozen bias", &full, &h, &[&h, &trained], 1e-4);

    let q = Linear::quantized(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap(), None).unwrap();
    assert!(matches!(q, Linear::Quantized { .. }));
    check_head("frozen Q8_0", &q, &h, &[&h], 1e-2);

    let (a, b) = (
        Var::from_tensor(&tensor((4, HIDDEN), 4, 0.3)).unwrap(),
        Var::from_tensor(&tensor((VOCAB, 4), 5, 0.3)).unwrap(),
    );
    let adapted = q.with_lora(vec![LoraPart { a: a.as_tensor().clone(), b: b.as_tensor().clone() }], 2.0);
    check_head("LoRA over Q8_0", &adapted, &h, &[&h, &a, &b], 1e-2);
}

#[test]
fn weight_gradients_collected_in_place_equal_autograds_sums() {
    // A tied table, gathered as embeddings (with repeated ids) and trained as the head, and a
    // trained projection between them; two backward passes summed.
    let table = Var::from_tensor(&tensor((VOCAB, HIDDEN), 2, 0.5)).unwrap();
    let proj = Var::from_tensor(&tensor((HIDDEN, HIDDEN), 3, 0.2)).unwrap();
    let head = Linear::dense(table.as_tensor().clone(), None);
    let ids: Vec<u32> = (0..ROWS as u32).map(|i| (i * 31) % 97).collect();
    let targets: Vec<u32> = (0..ROWS as u32).map(|i| (i * 7919 + 5) % VOCAB as u32).collect();
    let loss = |pass: u32, path| {
        let x = ops::gather_rows(table.as_tensor(), &ids, path).unwrap();
        let h = ops::matmul_xwt(&x, proj.as_tensor(), path).unwrap();
        let lp = head::target_logprobs(&h, &head, &targets, path).unwrap();
        let c = Tensor::from_vec(values(ROWS, 10 + pass, 1.0), ROWS, &Device::Cpu).unwrap();
        (&lp * &c).unwrap().sum_all().unwrap()
    };
    let weights = [table.as_tensor(), proj.as_tensor()];
    // The reference: candle's autograd over primitives, its gradients added up.
    let mut expected: Vec<Option<Tensor>> = vec![None, None];
    for pass in 0..2 {
        let g = loss(pass, OpsPath::Generic).backward().unwrap();
        for (e, w) in expected.iter_mut().zip(weights) {
            let gw = g.get(w).expect("a gradient").clone();
            *e = Some(match e.take() {
                Some(sum) => (sum + gw).unwrap(),
                None => gw,
            });
        }
    }
    let mut sums = sink::Sums::new(weights);
    for pass in 0..2 {
        let g = sink::collect(&mut sums, || loss(pass, OpsPath::CpuKernels).backward()).unwrap();
        for w in weights {
            assert!(g.get(w).is_none(), "a collected weight's gradient must not also go through candle");
        }
    }
    for (k, (w, e)) in weights.iter().zip(&expected).enumerate() {
        let got = sums.take(w).unwrap().expect("a collected gradient");
        let err = max_rel(&got, e.as_ref().unwrap());
        assert!(err < 1e-4, "weight {k}: collected gradient differs from autograd's sum by {err}");
    }
}

#[test]
fn the_adapter_delta_equals_autograd_and_is_the_same_for_any_batch() {
    let (m, k, r, n) = (37, 96, 8, 700);
    let x = Var::from_tensor(&tensor((m, k), 6, 1.0)).unwrap();
    let a = Var::from_tensor(&tensor((r, k), 7, 0.2)).unwrap();
    let b = Var::from_tensor(&tensor((n, r), 8, 0.2)).unwrap();
    let c = tensor((m, n), 9, 1.0);
    let run = |path| {
        let y = lora::lora_delta(x.as_tensor(), a.as_tensor(), b.as_tensor(), 1.5, path).unwrap();
        let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        (y, [&x, &a, &b].map(|v| g.get(v.as_tensor()).unwrap().clone()))
    };
    let (y, grads) = run(OpsPath::CpuKernels);
    let (y_ref, grads_ref) = run(OpsPath::Generic);
    assert!(max_rel(&y, &y_ref) < 1e-5);
    for (i, (g, r)) in grads.iter().zip(&grads_ref).enumerate() {
        assert!(max_rel(g, r) < 1e-5, "gradient {i}");
    }
    // A row alone gives the bits it gets in the batch (a served token equals a trained one).
    let rows = y.to_vec2::<f32>().unwrap();
    for i in [0, 17, m - 1] {
        let alone = lora::lora_delta(
            &x.as_tensor().narrow(0, i, 1).unwrap().detach(),
            &a.as_tensor().detach(),
            &b.as_tensor().detach(),
            1.5,
            OpsPath::CpuKernels,
        )
        .unwrap();
        assert_eq!(alone.to_vec2::<f32>().unwrap()[0], rows[i], "row {i}");
    }
}

/// The attention backward against autograd over the plain formula (`OpsPath::Generic`: the
/// probabilities as a whole matrix), for packed sequences short and long: a long one's queries
/// run in several blocks and in two work items whose key and value gradients are added after.
#[test]
fn the_attention_backward_equals_autograd_for_short_and_long_sequences() {
    let (heads, kv_heads, d) = (6, 2, 16);
    let lens = [5, 760, 64];
    let t: usize = lens.iter().sum();
    let var = |h: usize, seed: u32| {
        let v = values(t * h * d, seed, 1.0);
        Var::from_tensor(&Tensor::from_vec(v, (t, h, d), &Device::Cpu).unwrap()).unwrap()
    };
    let (q, k, v) = (var(heads, 1), var(kv_heads, 2), var(kv_heads, 3));
    let weights = tensor((t, heads * d), 4, 1.0);
    let grads = |kv, path| {
        let out = ops::self_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &lens, kv, path).unwrap();
        let loss = (out * &weights).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [&q, &k, &v].map(|x| g.get(x.as_tensor()).expect("a gradient").clone())
    };
    // Keys and values rounded as an f16 cache holds them: the kernel's backward and autograd
    // through candle's casts differentiate at the same rounded values.
    for kv in [KvDtype::F32, KvDtype::F16] {
        let (fast, reference) = (grads(kv, OpsPath::CpuKernels), grads(kv, OpsPath::Generic));
        for (name, f, r) in
            [("q", &fast[0], &reference[0]), ("k", &fast[1], &reference[1]), ("v", &fast[2], &reference[2])]
        {
            let e = max_rel(f, r);
            assert!(e < 1e-4, "d{name} ({kv:?}): relative error {e}");
        }
    }
}
