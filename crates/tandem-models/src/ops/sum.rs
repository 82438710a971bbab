//! The residual stream's sums and projection biases, on the team (see `add`).
use super::{differentiated, f32_slice, rows_written, CResult, OpsPath};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "tandem-add"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let width = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        // b: as many values as a, or one row added to every row of a (a bias).
        let stride = if b.len() == a.len() { width } else { 0 };
        if stride == 0 && b.len() != width {
            candle_core::bail!("add: {:?} is neither {:?} nor one row of it", l2.shape(), l1.shape());
        }
        // SAFETY: each value of each row is written (x + y).
        let out = unsafe {
            rows_written(a.len() / width, width, &|r0, o| {
                for (i, o) in o.chunks_exact_mut(width).enumerate() {
                    let (x, y) = (&a[(r0 + i) * width..], &b[(r0 + i) * stride..]);
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = x + y;
                    }
                }
            })
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// a + b, where b has a's shape or is one row added to every row of a (a projection's bias). On
/// the CPU kernels, where no gradient flows, rows are summed on the team: candle's own sum of 64k
/// values or more (a prefill of 114 rows of SmolLM2, 74 of Qwen2.5-0.5B) runs on candle's thread
/// pool, whose worker then spins for a while beside the team's two threads on a 2-core machine:
/// a 128-token SmolLM2 prefill ran at 1.3-1.5k tok/s with it and 3.3-3.6k without
/// (docs/performance.md, 2026-12-06). Values equal candle's (one f32 add each).
pub fn add(a: &Tensor, b: &Tensor, path: OpsPath) -> CResult<Tensor> {
    let f32s = a.dtype() == DType::F32 && b.dtype() == DType::F32;
    match path {
        OpsPath::CpuKernels if f32s && !differentiated(&[a, b]) && a.rank() >= 1 => {
            a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
        }
        _ if a.shape() == b.shape() => a + b,
        _ => a.broadcast_add(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values spread over several magnitudes, so that sums round.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 20_011) as f32 / 7.3 - 1_000.0).collect()
    }

    #[test]
    fn the_residual_sum_and_the_bias_equal_candles_bit_for_bit() -> CResult<()> {
        let cpu = Device::Cpu;
        // 130 rows of 576: past the 64k values at which candle's own sum goes to its pool.
        for (rows, width) in [(3, 5), (130, 576)] {
            let a = Tensor::from_vec(values(rows * width, 1), (rows, width), &cpu)?;
            let b = Tensor::from_vec(values(rows * width, 2), (rows, width), &cpu)?;
            let bias = Tensor::from_vec(values(width, 3), width, &cpu)?;
            let bits = |t: &Tensor| -> CResult<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(&add(&a, &b, OpsPath::CpuKernels)?)?, bits(&(&a + &b)?)?);
            assert_eq!(bits(&add(&a, &bias, OpsPath::CpuKernels)?)?, bits(&a.broadcast_add(&bias)?)?);
            assert_eq!(bits(&add(&a, &bias, OpsPath::Generic)?)?, bits(&a.broadcast_add(&bias)?)?);
        }
        let a = Tensor::zeros((2, 4), DType::F32, &cpu)?;
        assert!(add(&a, &Tensor::zeros(3, DType::F32, &cpu)?, OpsPath::CpuKernels).is_err());
        Ok(())
    }
}
