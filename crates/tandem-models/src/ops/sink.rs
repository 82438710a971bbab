//! Weight gradients summed in place, where the trainer keeps them.
//!
//! candle's backward sums each weight's gradient by allocating a zeroed tensor for it and then
//! adding every op's gradient into yet another new tensor: three weight-sized buffers per weight
//! and pass, plus (for an embedding gather) a dense weight-sized scatter. On Qwen2.5-0.5B's full
//! weights that is 6-7 GB of fresh memory per pass, and clearing its pages was a tenth of the
//! pass. A trainer that `collect`s instead hands the backward one sum per weight; the ops that
//! produce weight gradients (`lease`) write or add theirs into it in place and give candle none
//! for that weight. Weights without a sum (and ops that do not lease) go through candle as before,
//! so the trainer adds candle's gradient (if any) to the collected one.
use candle_core::{DType, Tensor, TensorId};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

thread_local! {
    /// The sums of the `collect` running on this thread (candle runs each op's backward on the
    /// thread that called `backward`).
    static ACTIVE: RefCell<Option<HashMap<TensorId, Sum>>> = const { RefCell::new(None) };
    /// The weights whose gradients the forward running on this thread (`Sums::plan`) will have
    /// collected: an op may then hand them over in place only (`add`), not through candle.
    static PLANNED: RefCell<Option<HashSet<TensorId>>> = const { RefCell::new(None) };
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

    /// Runs `f` (the forward of a pass whose backward will `collect` into these sums) with the
    /// ops told which weights are collected (`planned`).
    pub fn plan<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<HashSet<TensorId>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                PLANNED.with(|p| *p.borrow_mut() = self.0.take());
            }
        }
        let ids = self.0.keys().copied().collect();
        let _restore = Restore(PLANNED.with(|p| p.borrow_mut().replace(ids)));
        f()
    }

    /// The gradient collected for `w` (None when no op wrote one), as a tensor of w's shape.
    pub fn take(&mut self, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.0.get_mut(&w.id()).and_then(|s| s.values.take()) {
            Some(v) => Ok(Some(Tensor::from_vec(v, w.shape(), w.device())?)),
            None => Ok(None),
        }
    }
}

/// Runs `f` (a backward pass) with the ops adding weight gradients into `sums`. Nests: a
/// collection started inside `f` on the same thread (a pool thread that picks up another
/// trainer's pass while it waits) sets this one aside and gives it back when it ends.
pub fn collect<R>(sums: &mut Sums, f: impl FnOnce() -> R) -> R {
    struct Restore<'a> {
        sums: &'a mut Sums,
        outer: Option<HashMap<TensorId, Sum>>,
    }
    impl Drop for Restore<'_> {
        // Also on unwinding: the sums go back to their owner whatever `f` did.
        fn drop(&mut self) {
            let mine = ACTIVE.with(|a| std::mem::replace(&mut *a.borrow_mut(), self.outer.take()));
            self.sums.0 = mine.unwrap_or_default();
        }
    }
    let outer = ACTIVE.with(|a| a.borrow_mut().replace(std::mem::take(&mut sums.0)));
    let _restore = Restore { sums, outer };
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
    /// The sum's values, laid out as the weight (row-major, contiguous): zeros when fresh.
    pub fn values(&mut self) -> &mut [f32] {
        let sum = self.sum.as_mut().expect("a lease holds its sum until dropped");
        let len = sum.len;
        sum.values.get_or_insert_with(|| vec![0f32; len])
    }

    /// Adds a whole gradient (the weight's layout) into the sum; a fresh sum takes it as it is.
    pub fn put(&mut self, g: Vec<f32>) -> candle_core::Result<()> {
        let sum = self.sum.as_mut().expect("a lease holds its sum until dropped");
        if g.len() != sum.len {
            candle_core::bail!("a gradient of {} values for a weight of {}", g.len(), sum.len);
        }
        match &mut sum.values {
            Some(values) => values.iter_mut().zip(&g).for_each(|(s, g)| *s += g),
            None => sum.values = Some(g),
        }
        Ok(())
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

/// Whether the forward running on this thread belongs to a pass whose backward collects `w`'s
/// gradient (`Sums::plan`).
pub(crate) fn planned(w: &Tensor) -> bool {
    PLANNED.with(|p| p.borrow().as_ref().is_some_and(|ids| ids.contains(&w.id())))
}

/// Adds the gradient `g` (w's shape, f32) into w's collected sum: exactly as candle's store sums
/// it (a zeroed sum plus each gradient in turn). Errs when no sum is collected for w: an op that
/// relies on this was built only for planned weights.
pub(crate) fn add(w: &Tensor, g: &Tensor) -> candle_core::Result<()> {
    let Some(mut sum) = lease(w) else {
        candle_core::bail!("no gradient sum is collected for a weight the forward planned one for")
    };
    // A fresh sum is zeroed first (`put` alone would take g as it is).
    sum.values();
    sum.put(g.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The sum `w`'s gradient goes into, when a trainer is collecting one for it.
pub(crate) fn lease(w: &Tensor) -> Option<Lease> {
    let sum = ACTIVE.with(|a| a.borrow_mut().as_mut().and_then(|active| active.remove(&w.id())))?;
    let fresh = sum.values.is_none();
    Some(Lease { id: w.id(), sum: Some(sum), fresh })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_collection_inside_another_leaves_the_outer_sums_alone() {
        let a = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let (mut outer, mut inner) = (Sums::new([&a]), Sums::new([&b]));
        collect(&mut outer, || {
            let mut first = lease(&a).expect("a is collected");
            assert!(first.fresh);
            first.values()[0] = 1.0;
            drop(first);
            collect(&mut inner, || {
                assert!(lease(&a).is_none(), "the outer collection's weight is not the inner's");
                lease(&b).expect("b is collected").values()[1] = 2.0;
            });
            let mut again = lease(&a).expect("the outer collection is back");
            assert!(!again.fresh);
            again.values()[0] += 1.0;
        });
        assert!(lease(&a).is_none(), "nothing is collected outside `collect`");
        assert_eq!(outer.take(&a).unwrap().unwrap().to_vec1::<f32>().unwrap(), [2.0, 0.0, 0.0, 0.0]);
        assert_eq!(inner.take(&b).unwrap().unwrap().to_vec1::<f32>().unwrap(), [0.0, 2.0, 0.0, 0.0]);
        assert!(outer.take(&a).unwrap().is_none(), "taken once");
    }
}
