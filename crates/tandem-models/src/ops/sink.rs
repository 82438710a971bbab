//! Weight gradients summed in place, where the trainer keeps them.
//!
//! candle's backward sums each weight's gradient by allocating a zeroed tensor for it and then
//! adding every op's gradient into yet another new tensor: three weight-sized buffers per weight
//! and pass, plus (for an embedding gather) a dense weight-sized scatter. On Qwen2.5-0.5B's full
//! weights that is ~8 GB of fresh memory per pass, and clearing its pages was an eighth of the
//! pass. A trainer that `collect`s instead hands the backward one sum per weight; the ops that
//! produce weight gradients (`lease`) write or add theirs into it in place and give candle none
//! for that weight. Weights without a sum (and ops that do not lease) go through candle as before,
//! so the trainer adds candle's gradient (if any) to the collected one.
use candle_core::{DType, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// The sums of the `collect` running on this thread (candle runs each op's backward on the
    /// thread that called `backward`).
    static ACTIVE: RefCell<Option<HashMap<TensorId, Sum>>> = const { RefCell::new(None) };
}

/// One weight's gradient sum: no values until an op writes the first gradient.
struct Sum {
    len: usize,
    values: Option<Vec<f32>>,
}

/// The gradient sums of a set of weights, across any number of backward passes.
pub struct Sums(HashMap<TensorId, Sum>);

impl Sums {
    /// Sums for these weights; only f32 CPU tensors get one (others keep candle's path).
    pub fn new<'a>(weights: impl IntoIterator<Item = &'a Tensor>) -> Self {
        let sums = weights
            .into_iter()
            .filter(|w| w.dtype() == DType::F32 && w.device().is_cpu())
            .map(|w| (w.id(), Sum { len: w.elem_count(), values: None }))
            .collect();
        Sums(sums)
    }

    /// The gradient collected for `w` (None when no op wrote one), as a tensor of w's shape.
    pub fn take(&mut self, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.0.get_mut(&w.id()).and_then(|s| s.values.take()) {
            Some(v) => Ok(Some(Tensor::from_vec(v, w.shape(), w.device())?)),
            None => Ok(None),
        }
    }
}

/// Runs `f` (a backward pass) with the ops adding weight gradients into `sums`.
pub fn collect<R>(sums: &mut Sums, f: impl FnOnce() -> R) -> R {
    struct Restore<'a>(&'a mut Sums);
    impl Drop for Restore<'_> {
        // Also on unwinding: the sums go back to their owner whatever `f` did.
        fn drop(&mut self) {
            self.0 .0 = ACTIVE.with(|a| a.borrow_mut().take()).unwrap_or_default();
        }
    }
    ACTIVE.with(|a| *a.borrow_mut() = Some(std::mem::take(&mut sums.0)));
    let _restore = Restore(sums);
    f()
}

/// A weight's sum, taken out of the active collection while an op writes into it; it goes back
/// when dropped.
pub(crate) struct Lease {
    id: TensorId,
    sum: Option<Sum>,
    /// True when the sum holds no gradient yet: the op overwrites (`values` are zeros).
    pub fresh: bool,
}

impl Lease {
    /// The sum's values, laid out as the weight (row-major, contiguous).
    pub fn values(&mut self) -> &mut [f32] {
        self.sum.as_mut().and_then(|s| s.values.as_deref_mut()).expect("a lease holds values")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sum) = self.sum.take() {
            ACTIVE.with(|a| {
                if let Some(active) = a.borrow_mut().as_mut() {
                    active.insert(self.id, sum);
                }
            });
        }
    }
}

/// The sum `w`'s gradient goes into, when a trainer is collecting one for it.
pub(crate) fn lease(w: &Tensor) -> Option<Lease> {
    let mut sum = ACTIVE.with(|a| a.borrow_mut().as_mut().and_then(|active| active.remove(&w.id())))?;
    let fresh = sum.values.is_none();
    if fresh {
        // Zeroed by the allocator: large sums are fresh pages, which cost nothing to zero.
        sum.values = Some(vec![0f32; sum.len]);
    }
    Some(Lease { id: w.id(), sum: Some(sum), fresh })
}
