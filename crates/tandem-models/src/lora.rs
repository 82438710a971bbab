//! Low-rank adapters and named parameters of a model: what a training run changes, and the merged
//! Hugging Face export of a trained version.
use crate::error::{ModelError, Result};
use crate::linear::{Linear, LoraPart};
use crate::model::{Embedding, Model};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// Which parts of the model get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoraTargets {
    pub attn: bool,
    pub mlp: bool,
    pub unembed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: LoraTargets,
}

impl LoraSpec {
    /// The factor applied to b·a (alpha / rank, as in the LoRA paper and PEFT).
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// A set of adapters: tensors named `layers.{i}.{q,k,v,o,gate,up,down}.{a,b}` and `lm_head.{a,b}`,
/// a: [rank, in], b: [out, rank].
#[derive(Clone)]
pub struct Adapter {
    pub spec: LoraSpec,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Model {
    /// Names and [out, in] shapes of the projections `spec` adapts.
    pub fn adapter_targets(&self, spec: &LoraSpec) -> Vec<(String, usize, usize)> {
        let c = &self.config;
        let (h, q, i) = (c.hidden_size, c.q_size(), c.intermediate_size);
        let mut out = Vec::new();
        for l in 0..c.num_layers {
            if spec.targets.attn {
                // A latent layer's k and v adapters adapt its latent projections.
                let (k, v) = c.kv_widths(l);
                for (n, o, inp) in [("q", q, h), ("k", k, h), ("v", v, h), ("o", h, q)] {
                    out.push((format!("layers.{l}.{n}"), o, inp));
                }
            }
            if spec.targets.mlp {
                for (n, o, inp) in [("gate", i, h), ("up", i, h), ("down", h, i)] {
                    out.push((format!("layers.{l}.{n}"), o, inp));
                }
            }
        }
        if spec.targets.unembed {
            out.push(("lm_head".into(), c.vocab_size, h));
        }
        out
    }

    /// This model with `adapter` applied (base weights shared). Tensors missing from the adapter
    /// are an error: a half-applied adapter would serve a model nobody trained.
    pub fn with_adapter(&self, adapter: &Adapter) -> Result<Model> {
        let get = |name: &str| -> Result<LoraPart> {
            let t = |s: &str| {
                adapter
                    .tensors
                    .get(&format!("{name}.{s}"))
                    .cloned()
                    .ok_or_else(|| ModelError::Adapter(format!("adapter lacks {name}.{s}")))
            };
            Ok(LoraPart { a: t("a")?, b: t("b")? })
        };
        let scale = adapter.spec.scale();
        let mut m = self.clone();
        for (l, b) in m.blocks.iter_mut().enumerate() {
            if adapter.spec.targets.attn {
                let parts = ["q", "k", "v"].iter().map(|n| get(&format!("layers.{l}.{n}"))).collect::<Result<_>>()?;
                b.qkv = b.qkv.with_lora(parts, scale);
                b.o_proj = b.o_proj.with_lora(vec![get(&format!("layers.{l}.o"))?], scale);
            }
            if adapter.spec.targets.mlp {
                let parts = ["gate", "up"].iter().map(|n| get(&format!("layers.{l}.{n}"))).collect::<Result<_>>()?;
                b.gate_up = b.gate_up.with_lora(parts, scale);
                b.down = b.down.with_lora(vec![get(&format!("layers.{l}.down"))?], scale);
            }
        }
        if adapter.spec.targets.unembed {
            m.lm_head = m.lm_head.with_lora(vec![get("lm_head")?], scale);
        }
        Ok(m)
    }

    /// The dense weights full fine-tuning trains, by name: `embed`, `norm`, `lm_head` (untied
    /// models only), `layers.{i}.{attn_norm,qkv,o,mlp_norm,gate_up,down,q_norm,k_norm}`, and a
    /// latent layer's expansions `layers.{i}.{k_up,v_up}`.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let dense = |name: &str, l: &Linear| -> Result<Tensor> {
            l.dense_weight().cloned().ok_or_else(|| {
                ModelError::Adapter(format!("{name} is not a dense weight (quantized models train adapters only)"))
            })
        };
        let embed = self.embed.dense().cloned().ok_or_else(|| {
            ModelError::Adapter("the embedding is quantized (quantized models train adapters only)".into())
        })?;
        let mut out = vec![("embed".to_string(), embed), ("norm".to_string(), self.norm.clone())];
        if !self.config.tie_word_embeddings {
            out.push(("lm_head".into(), dense("lm_head", &self.lm_head)?));
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let p = |n: &str| format!("layers.{l}.{n}");
            out.push((p("attn_norm"), b.attn_norm.clone()));
            out.push((p("qkv"), dense(&p("qkv"), &b.qkv)?));
            out.push((p("o"), dense(&p("o"), &b.o_proj)?));
            out.push((p("mlp_norm"), b.mlp_norm.clone()));
            out.push((p("gate_up"), dense(&p("gate_up"), &b.gate_up)?));
            out.push((p("down"), dense(&p("down"), &b.down)?));
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                out.push((p("q_norm"), qn.clone()));
                out.push((p("k_norm"), kn.clone()));
            }
            if let Some(lat) = &b.latent {
                out.push((p("k_up"), lat.k_up.clone()));
                out.push((p("v_up"), lat.v_up.clone()));
            }
        }
        Ok(out)
    }

    /// This model with the named parameters (see `parameters`) replaced; a tied output projection
    /// follows the embedding.
    pub fn with_parameters(&self, params: &BTreeMap<String, Tensor>) -> Result<Model> {
        let mut m = self.clone();
        let known: Vec<String> = self.parameters()?.into_iter().map(|(n, _)| n).collect();
        for name in params.keys() {
            if !known.contains(name) {
                return Err(ModelError::Adapter(format!("the model has no parameter {name}")));
            }
        }
        if let Some(e) = params.get("embed") {
            m.embed = Embedding::Dense(e.clone());
            if m.config.tie_word_embeddings {
                m.lm_head = m.lm_head.with_weight(e.clone());
            }
        }
        if let Some(n) = params.get("norm") {
            m.norm = n.clone();
        }
        if let Some(w) = params.get("lm_head") {
            m.lm_head = m.lm_head.with_weight(w.clone());
        }
        for (l, b) in m.blocks.iter_mut().enumerate() {
            let p = |n: &str| params.get(&format!("layers.{l}.{n}"));
            if let Some(t) = p("attn_norm") {
                b.attn_norm = t.clone();
            }
            if let Some(t) = p("qkv") {
                b.qkv = b.qkv.with_weight(t.clone());
            }
            if let Some(t) = p("o") {
                b.o_proj = b.o_proj.with_weight(t.clone());
            }
            if let Some(t) = p("mlp_norm") {
                b.mlp_norm = t.clone();
            }
            if let Some(t) = p("gate_up") {
                b.gate_up = b.gate_up.with_weight(t.clone());
            }
            if let Some(t) = p("down") {
                b.down = b.down.with_weight(t.clone());
            }
            if let Some(t) = p("q_norm") {
                b.q_norm = Some(t.clone());
            }
            if let Some(t) = p("k_norm") {
                b.k_norm = Some(t.clone());
            }
            if let Some(lat) = b.latent.as_mut() {
                if let Some(t) = p("k_up") {
                    lat.k_up = t.clone();
                }
                if let Some(t) = p("v_up") {
                    lat.v_up = t.clone();
                }
            }
        }
        Ok(m)
    }

    /// Every weight under its Hugging Face name, adapters merged in (W + scale·b·a), fused
    /// projections split again, as f32, in Hugging Face's rope convention (GGUF llama files store
    /// q and k rows permuted for interleaved rope; they are put back): what `tandem serve --model`
    /// loads back with `config.to_hf_json()`.
    pub fn export_hf(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = self.export_stored()?;
        if self.config.rope_interleaved {
            let c = &self.config;
            for (name, t) in out.iter_mut() {
                let heads = if name.contains("self_attn.q_proj.") {
                    c.num_heads
                } else if name.contains("self_attn.k_proj.") || name.contains("self_attn.k_b_proj.") {
                    c.num_kv_heads
                } else {
                    continue;
                };
                *t = unpermute_rope_rows(t, heads, c.head_dim)?;
            }
        }
        Ok(out)
    }

    /// `export_hf` in the layout the weights are held in.
    fn export_stored(&self) -> Result<Vec<(String, Tensor)>> {
        let c = &self.config;
        let (q, i) = (c.q_size(), c.intermediate_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.table()?.to_dtype(DType::F32)?)];
        let push_split = |out: &mut Vec<(String, Tensor)>, l: &Linear, names: &[(&str, usize)]| -> Result<()> {
            let (w, bias) = merged(l)?;
            let mut off = 0;
            for (n, size) in names {
                out.push((format!("{n}.weight"), w.narrow(0, off, *size)?.contiguous()?));
                if let Some(b) = &bias {
                    out.push((format!("{n}.bias"), b.narrow(0, off, *size)?.contiguous()?));
                }
                off += size;
            }
            Ok(())
        };
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), b.attn_norm.clone()));
            let (k, v) = c.kv_widths(l);
            match &b.latent {
                None => {
                    let (qn, kn, vn) = (
                        format!("{p}.self_attn.q_proj"),
                        format!("{p}.self_attn.k_proj"),
                        format!("{p}.self_attn.v_proj"),
                    );
                    push_split(&mut out, &b.qkv, &[(&qn, q), (&kn, k), (&vn, v)])?;
                }
                Some(lat) => {
                    // q keeps its bias; the latent projections have none (their rows of the fused
                    // bias are zeros); the expansions carry the k and v biases.
                    let (w, bias) = merged(&b.qkv)?;
                    out.push((format!("{p}.self_attn.q_proj.weight"), w.narrow(0, 0, q)?.contiguous()?));
                    if let Some(bias) = &bias {
                        out.push((format!("{p}.self_attn.q_proj.bias"), bias.narrow(0, 0, q)?.contiguous()?));
                    }
                    out.push((format!("{p}.self_attn.k_a_proj.weight"), w.narrow(0, q, k)?.contiguous()?));
                    out.push((format!("{p}.self_attn.v_a_proj.weight"), w.narrow(0, q + k, v)?.contiguous()?));
                    for (name, up, b) in [("k_b_proj", &lat.k_up, &lat.k_bias), ("v_b_proj", &lat.v_up, &lat.v_bias)] {
                        out.push((format!("{p}.self_attn.{name}.weight"), up.to_dtype(DType::F32)?));
                        if let Some(b) = b {
                            out.push((format!("{p}.self_attn.{name}.bias"), b.clone()));
                        }
                    }
                }
            }
            if let (Some(qn), Some(kn)) = (&b.q_norm, &b.k_norm) {
                out.push((format!("{p}.self_attn.q_norm.weight"), qn.clone()));
                out.push((format!("{p}.self_attn.k_norm.weight"), kn.clone()));
            }
            push_split(&mut out, &b.o_proj, &[(&format!("{p}.self_attn.o_proj"), c.hidden_size)])?;
            out.push((format!("{p}.post_attention_layernorm.weight"), b.mlp_norm.clone()));
            let (g, u) = (format!("{p}.mlp.gate_proj"), format!("{p}.mlp.up_proj"));
            push_split(&mut out, &b.gate_up, &[(&g, i), (&u, i)])?;
            push_split(&mut out, &b.down, &[(&format!("{p}.mlp.down_proj"), c.hidden_size)])?;
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        let (head, _) = merged(&self.lm_head)?;
        let tied_unchanged = c.tie_word_embeddings && !matches!(self.lm_head, Linear::Lora { .. });
        if !tied_unchanged {
            out.push(("lm_head.weight".into(), head));
        }
        Ok(out)
    }
}

/// A dense projection's weight with its adapters merged in, and its bias (stacked parts are
/// not exported merged: their formats differ).
fn merged(l: &Linear) -> Result<(Tensor, Option<Tensor>)> {
    match l {
        Linear::Stacked(_) => Err(ModelError::Adapter("stacked projections cannot be exported merged".into())),
        l => Ok(l.dense_f32()?),
    }
}

/// Undoes llama.cpp's q/k row permutation: stored rows (head, pair, 2) -> Hugging Face (head, 2, pair).
fn unpermute_rope_rows(t: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let rest: Vec<usize> = t.dims()[1..].to_vec();
    let mut shape = vec![heads, head_dim / 2, 2];
    shape.extend(&rest);
    let x = t.reshape(shape)?.transpose(1, 2)?.contiguous()?;
    Ok(x.reshape(t.dims())?)
}
