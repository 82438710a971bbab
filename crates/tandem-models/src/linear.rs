//! Projection layers: dense f32/bf16 weights or GGUF block-quantized weights read in place (the ops
//! module picks the kernel for both).
use crate::ops::quant::{QFormat, QWeight};
use crate::ops::{self, OpsPath};
use candle_core::quantized::QTensor;
use candle_core::Tensor;
use std::sync::Arc;

type CResult<T> = candle_core::Result<T>;

#[derive(Clone)]
pub enum Linear {
    /// weight: [out, in].
    Dense { weight: Tensor, bias: Option<Tensor> },
    /// GGUF blocks as the file stores them, [out, in] (CPU only).
    Quantized { weight: Arc<QWeight>, bias: Option<Tensor> },
    /// Several projections of the same input whose outputs are concatenated (quantized weights of
    /// different types cannot be fused into one matrix).
    Stacked(Vec<Linear>),
    /// A frozen projection plus low-rank adapters: y = base(x) + scale·[(x·a_iᵀ)·b_iᵀ]_i, the parts'
    /// outputs concatenated (one part per projection fused into `base`). The base weights are
    /// shared, not copied; serving and training run this same code, so their values agree exactly.
    Lora { base: Box<Linear>, parts: Vec<LoraPart>, scale: f64 },
}

/// One projection's adapter: a: [rank, in], b: [out, rank] (f32).
#[derive(Clone)]
pub struct LoraPart {
    pub a: Tensor,
    pub b: Tensor,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear::Dense { weight, bias }
    }

    /// A projection over GGUF blocks. Formats without a kernel here (Q2_K, Q3_K, ...) and
    /// devices other than the CPU get the weight dequantized to a dense f32 matrix instead.
    pub fn quantized(weight: QTensor, bias: Option<Tensor>) -> CResult<Self> {
        let (out, inp) = weight.shape().dims2()?;
        match QFormat::from_ggml(weight.dtype()) {
            Some(format) if weight.device().is_cpu() => {
                let data = weight.data()?.into_owned();
                let q = QWeight::new(format, out, inp, data).map_err(candle_core::Error::Msg)?;
                Ok(Linear::Quantized { weight: Arc::new(q), bias })
            }
            _ => Ok(Linear::Dense { weight: weight.dequantize(&weight.device())?, bias }),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.dims()[0],
            Linear::Quantized { weight, .. } => weight.rows,
            Linear::Stacked(parts) => parts.iter().map(Linear::out_features).sum(),
            Linear::Lora { base, .. } => base.out_features(),
        }
    }

    /// Projections of one input fused into one: dense weights become one matrix, so one pass over
    /// the input computes all of them.
    pub fn fuse(parts: Vec<Linear>) -> CResult<Self> {
        if parts.iter().all(|p| matches!(p, Linear::Dense { .. })) {
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            let any_bias = parts.iter().any(|p| matches!(p, Linear::Dense { bias: Some(_), .. }));
            for p in &parts {
                if let Linear::Dense { weight, bias } = p {
                    weights.push(weight.clone());
                    if any_bias {
                        biases.push(match bias {
                            Some(b) => b.clone(),
                            None => Tensor::zeros(weight.dims()[0], weight.dtype(), weight.device())?,
                        });
                    }
                }
            }
            let weight = Tensor::cat(&weights, 0)?;
            let bias = if any_bias { Some(Tensor::cat(&biases, 0)?) } else { None };
            Ok(Linear::Dense { weight, bias })
        } else if parts.iter().all(|p| matches!(p, Linear::Quantized { .. })) {
            // Block-quantized parts (each in its own format) stack into one matrix: the input is
            // quantized once and one pass of the kernel computes every part.
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            let any_bias = parts.iter().any(|p| matches!(p, Linear::Quantized { bias: Some(_), .. }));
            for p in parts {
                if let Linear::Quantized { weight, bias } = p {
                    if any_bias {
                        biases.push(match bias {
                            Some(b) => b,
                            None => Tensor::zeros(weight.rows, candle_core::DType::F32, &candle_core::Device::Cpu)?,
                        });
                    }
                    weights.push(Arc::try_unwrap(weight).map_err(|_| candle_core::Error::Msg("shared weight".into()))?);
                }
            }
            let weight = Arc::new(QWeight::stack(weights).map_err(candle_core::Error::Msg)?);
            let bias = if any_bias { Some(Tensor::cat(&biases, 0)?) } else { None };
            Ok(Linear::Quantized { weight, bias })
        } else {
            Ok(Linear::Stacked(parts))
        }
    }

    /// x: [m, in] -> [m, out].
    pub fn forward(&self, x: &Tensor, path: OpsPath) -> CResult<Tensor> {
        let (y, bias) = match self {
            Linear::Dense { weight, bias } => (ops::matmul_xwt(x, weight, path)?, bias),
            Linear::Quantized { weight, bias } => (ops::quantized_matmul_xwt(x, weight, path)?, bias),
            Linear::Stacked(parts) => {
                let outs = parts.iter().map(|p| p.forward(x, path)).collect::<CResult<Vec<_>>>()?;
                return Tensor::cat(&outs, 1);
            }
            Linear::Lora { base, parts, scale } if Self::adapted_as_one_op(base, parts, path) => {
                return ops::lora::adapted(x, base, parts, *scale);
            }
            Linear::Lora { base, parts, scale } => {
                let y = base.forward(x, path)?;
                let deltas = parts
                    .iter()
                    .map(|p| ops::lora::lora_delta(x, &p.a, &p.b, *scale, path))
                    .collect::<CResult<Vec<_>>>()?;
                let delta = if deltas.len() == 1 { deltas[0].clone() } else { Tensor::cat(&deltas, 1)? };
                return y + delta;
            }
        };
        match bias {
            Some(b) => ops::add(&y, b, path),
            None => Ok(y),
        }
    }

    /// Whether a forward on the CPU kernels runs as one op (`ops::lora::adapted`): the base
    /// frozen, every adapter of one rank (served and trained alike, so their values agree).
    pub(crate) fn adapted_as_one_op(base: &Linear, parts: &[LoraPart], path: OpsPath) -> bool {
        let rank = parts.first().map(|p| p.a.dims()[0]);
        path == OpsPath::CpuKernels && !base.tracks() && parts.iter().all(|p| Some(p.a.dims()[0]) == rank)
    }

    /// Whether any of the projection's own tensors is being differentiated.
    fn tracks(&self) -> bool {
        let bias = |b: &Option<Tensor>| b.as_ref().is_some_and(Tensor::track_op);
        match self {
            Linear::Dense { weight, bias: b } => weight.track_op() || bias(b),
            Linear::Quantized { bias: b, .. } => bias(b),
            Linear::Stacked(parts) => parts.iter().any(Linear::tracks),
            Linear::Lora { base, parts, .. } => base.tracks() || parts.iter().any(|p| p.a.track_op() || p.b.track_op()),
        }
    }

    /// Bytes of weights read by one forward.
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.elem_count() * weight.dtype().size_in_bytes(),
            Linear::Quantized { weight, .. } => weight.bytes(),
            Linear::Stacked(parts) => parts.iter().map(Linear::weight_bytes).sum(),
            Linear::Lora { base, parts, .. } => {
                base.weight_bytes() + parts.iter().map(|p| (p.a.elem_count() + p.b.elem_count()) * 4).sum::<usize>()
            }
        }
    }
}

impl Linear {
    /// The dense weight [out, in] (None for quantized or stacked projections).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match self {
            Linear::Dense { weight, .. } => Some(weight),
            Linear::Lora { base, .. } => base.dense_weight(),
            _ => None,
        }
    }

    /// The same projection with `weight` in place of its dense weight (bias kept).
    pub fn with_weight(&self, weight: Tensor) -> Linear {
        match self {
            Linear::Lora { base, parts, scale } => {
                Linear::Lora { base: Box::new(base.with_weight(weight)), parts: parts.clone(), scale: *scale }
            }
            Linear::Dense { bias, .. } => Linear::Dense { weight, bias: bias.clone() },
            other => other.clone(),
        }
    }

    /// The whole projection as a dense f32 weight [out, in] with adapters merged in
    /// (W + scale·b·a) and quantized blocks dequantized, and its bias.
    pub fn dense_f32(&self) -> CResult<(Tensor, Option<Tensor>)> {
        let f32 = candle_core::DType::F32;
        match self {
            Linear::Dense { weight, bias } => Ok((weight.to_dtype(f32)?, bias.clone())),
            Linear::Lora { base, parts, scale } => {
                let (w, bias) = base.dense_f32()?;
                let deltas = parts.iter().map(|p| p.b.matmul(&p.a)).collect::<CResult<Vec<_>>>()?;
                let delta = Tensor::cat(&deltas, 0)?;
                Ok(((w + (delta * *scale)?)?, bias))
            }
            Linear::Quantized { weight, bias } => {
                let w = Tensor::from_vec(weight.dequantize(), (weight.rows, weight.cols), &candle_core::Device::Cpu)?;
                Ok((w, bias.clone()))
            }
            Linear::Stacked(parts) => {
                let merged = parts.iter().map(Linear::dense_f32).collect::<CResult<Vec<_>>>()?;
                let weight = Tensor::cat(&merged.iter().map(|(w, _)| w).collect::<Vec<_>>(), 0)?;
                if merged.iter().all(|(_, b)| b.is_none()) {
                    return Ok((weight, None));
                }
                let biases = merged
                    .iter()
                    .map(|(w, b)| b.clone().map_or_else(|| Tensor::zeros(w.dim(0)?, f32, w.device()), Ok))
                    .collect::<CResult<Vec<_>>>()?;
                Ok((weight, Some(Tensor::cat(&biases, 0)?)))
            }
        }
    }

    /// The same projection with every tensor detached from autograd (values shared, not copied).
    pub fn detached(&self) -> Linear {
        let bias = |b: &Option<Tensor>| b.as_ref().map(Tensor::detach);
        match self {
            Linear::Dense { weight, bias: b } => Linear::Dense { weight: weight.detach(), bias: bias(b) },
            Linear::Quantized { weight, bias: b } => Linear::Quantized { weight: weight.clone(), bias: bias(b) },
            Linear::Stacked(parts) => Linear::Stacked(parts.iter().map(Linear::detached).collect()),
            Linear::Lora { base, parts, scale } => Linear::Lora {
                base: Box::new(base.detached()),
                parts: parts.iter().map(|p| LoraPart { a: p.a.detach(), b: p.b.detach() }).collect(),
                scale: *scale,
            },
        }
    }

    /// The same projection with adapters added.
    pub fn with_lora(&self, parts: Vec<LoraPart>, scale: f64) -> Linear {
        Linear::Lora { base: Box::new(self.clone()), parts, scale }
    }
}
