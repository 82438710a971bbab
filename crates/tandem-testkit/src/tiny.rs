//! Writes the tiny random Hugging Face checkpoints: config.json, safetensors (f32, f16 or bf16;
//! one file or shards with an index), tokenizer.json (byte-level BPE over 256 byte tokens, a few
//! merges and the ChatML specials) and tokenizer_config.json (a ChatML template). Deterministic:
//! the same seed writes the same bytes.
use std::collections::BTreeMap;
use std::path::Path;

/// Vocabulary rows: 256 byte tokens, a few merges, specials, and unused rows.
pub const VOCAB: usize = 280;
const HIDDEN: usize = 64;
const INTER: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

/// One checkpoint's shape.
#[derive(Debug, Clone, Copy)]
pub struct Tiny {
    pub name: &'static str,
    pub arch: &'static str,
    pub dtype: &'static str,
    pub tied: bool,
    pub shards: usize,
    pub head_dim: Option<usize>,
    pub seed: u64,
    /// Add noise drawn with this seed to every weight (a near copy of the checkpoint with the same
    /// `seed`: a draft model whose distribution overlaps the target's without equalling it).
    pub noise: Option<u64>,
    /// Factored keys and values (a CARE-converted model's layout): random factors with per-layer
    /// ranks `LATENT_K_RANKS` / `LATENT_V_RANKS`, k/v biases on the expansions.
    pub latent: bool,
}

/// Ranks of the latent checkpoints' layers (uneven on purpose: per-layer cache widths differ).
pub const LATENT_K_RANKS: [usize; LAYERS] = [5, 11];
pub const LATENT_V_RANKS: [usize; LAYERS] = [9, 3];

const fn tiny(name: &'static str, arch: &'static str, dtype: &'static str, tied: bool, seed: u64) -> Tiny {
    Tiny { name, arch, dtype, tied, shards: 1, head_dim: None, seed, noise: None, latent: false }
}

/// The checkpoints every test may use.
pub const CHECKPOINTS: [Tiny; 10] = [
    Tiny { shards: 3, ..tiny("llama-gqa-untied-sharded", "llama", "F32", false, 1) },
    tiny("llama-bf16-tied", "llama", "BF16", true, 2),
    tiny("qwen2-tied-bias", "qwen2", "F32", true, 3),
    tiny("qwen2-f16-untied", "qwen2", "F16", false, 4),
    Tiny { head_dim: Some(32), ..tiny("qwen3-qknorm-untied", "qwen3", "F32", false, 5) },
    tiny("qwen3-qknorm-tied", "qwen3", "F32", true, 6),
    // qwen3-qknorm-untied with noise: the draft model of the speculation tests.
    Tiny { head_dim: Some(32), noise: Some(105), ..tiny("qwen3-qknorm-untied-near", "qwen3", "F32", false, 5) },
    // Latent K/V (the layout `tandem convert care` writes): every test over TINY covers it.
    Tiny { latent: true, ..tiny("llama-latent-untied", "llama", "F32", false, 7) },
    Tiny { latent: true, ..tiny("qwen2-latent-bias", "qwen2", "F32", true, 8) },
    Tiny { latent: true, head_dim: Some(32), ..tiny("qwen3-latent-qknorm", "qwen3", "F32", false, 9) },
];

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + \
'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Normal samples from a seeded generator (splitmix64 and Box-Muller: tests need variety and
/// determinism, not statistical quality).
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    fn weights(&mut self, shape: &[usize], scale: f32) -> (Vec<usize>, Vec<f32>) {
        let n = shape.iter().product();
        (shape.to_vec(), (0..n).map(|_| self.sample() * scale).collect())
    }

    fn norm(&mut self, n: usize) -> (Vec<usize>, Vec<f32>) {
        (vec![n], (0..n).map(|_| 1.0 + self.sample() * 0.1).collect())
    }
}

/// Writes every checkpoint of `CHECKPOINTS` under `out` (one folder each).
pub fn write_all(out: &Path) -> std::io::Result<()> {
    for t in CHECKPOINTS {
        write(out, t)?;
    }
    Ok(())
}

/// Writes one checkpoint into `out/{t.name}`.
pub fn write(out: &Path, t: Tiny) -> std::io::Result<()> {
    let folder = out.join(t.name);
    std::fs::create_dir_all(&folder)?;
    let tensors = tensors(t);
    let names: Vec<&String> = tensors.keys().collect();
    if t.shards == 1 {
        write_safetensors(&folder.join("model.safetensors"), &tensors, &names, t.dtype)?;
    } else {
        let per = names.len().div_ceil(t.shards);
        let mut weight_map = serde_json::Map::new();
        for (s, part) in names.chunks(per).enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, t.shards);
            write_safetensors(&folder.join(&file), &tensors, part, t.dtype)?;
            for n in part {
                weight_map.insert((*n).clone(), file.clone().into());
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(folder.join("model.safetensors.index.json"), index.to_string())?;
    }
    std::fs::write(folder.join("config.json"), serde_json::to_string_pretty(&config(t)).expect("json"))?;
    std::fs::write(folder.join("tokenizer.json"), tokenizer_json().to_string())?;
    let tc = serde_json::json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null});
    std::fs::write(folder.join("tokenizer_config.json"), tc.to_string())
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn tensors(t: Tiny) -> Tensors {
    let mut rng = Normal(t.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5DEE_CE66);
    let hd = t.head_dim.unwrap_or(HIDDEN / HEADS);
    let mut m = Tensors::new();
    m.insert("model.embed_tokens.weight".into(), rng.weights(&[VOCAB, HIDDEN], 0.08));
    m.insert("model.norm.weight".into(), rng.norm(HIDDEN));
    if !t.tied {
        m.insert("lm_head.weight".into(), rng.weights(&[VOCAB, HIDDEN], 0.08));
    }
    let bias = t.arch == "qwen2";
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}.");
        let mut put = |name: &str, v: (Vec<usize>, Vec<f32>)| m.insert(format!("{p}{name}"), v);
        put("input_layernorm.weight", rng.norm(HIDDEN));
        put("post_attention_layernorm.weight", rng.norm(HIDDEN));
        put("self_attn.q_proj.weight", rng.weights(&[HEADS * hd, HIDDEN], 0.08));
        let kv = KV_HEADS * hd;
        let (k, v) = if t.latent { ("k_b_proj", "v_b_proj") } else { ("k_proj", "v_proj") };
        if t.latent {
            // Latents of unit-ish scale, expanded to keys and values of the plain ones' scale.
            let (rk, rv) = (LATENT_K_RANKS[i], LATENT_V_RANKS[i]);
            put("self_attn.k_a_proj.weight", rng.weights(&[rk, HIDDEN], 0.15));
            put("self_attn.k_b_proj.weight", rng.weights(&[kv, rk], 0.5 / (rk as f32).sqrt()));
            put("self_attn.v_a_proj.weight", rng.weights(&[rv, HIDDEN], 0.15));
            put("self_attn.v_b_proj.weight", rng.weights(&[kv, rv], 0.5 / (rv as f32).sqrt()));
        } else {
            put("self_attn.k_proj.weight", rng.weights(&[kv, HIDDEN], 0.08));
            put("self_attn.v_proj.weight", rng.weights(&[kv, HIDDEN], 0.08));
        }
        put("self_attn.o_proj.weight", rng.weights(&[HIDDEN, HEADS * hd], 0.08));
        if bias {
            put("self_attn.q_proj.bias", rng.weights(&[HEADS * hd], 0.32));
            put(&format!("self_attn.{k}.bias"), rng.weights(&[kv], 0.32));
            put(&format!("self_attn.{v}.bias"), rng.weights(&[kv], 0.32));
        }
        if t.arch == "qwen3" {
            put("self_attn.q_norm.weight", rng.norm(hd));
            put("self_attn.k_norm.weight", rng.norm(hd));
        }
        put("mlp.gate_proj.weight", rng.weights(&[INTER, HIDDEN], 0.08));
        put("mlp.up_proj.weight", rng.weights(&[INTER, HIDDEN], 0.08));
        put("mlp.down_proj.weight", rng.weights(&[HIDDEN, INTER], 0.08));
    }
    if let Some(seed) = t.noise {
        let mut noise = Normal(seed);
        for (_, values) in m.values_mut() {
            for v in values.iter_mut() {
                *v += noise.sample() * 0.03;
            }
        }
    }
    m
}

/// Values as the dtype stores them: bf16 rounded to nearest even, as torch does.
fn to_bytes(v: &[f32], dtype: &str) -> Vec<u8> {
    match dtype {
        "F32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "F16" => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        "BF16" => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        other => panic!("no dtype {other}"),
    }
}

fn write_safetensors(path: &Path, tensors: &Tensors, names: &[&String], dtype: &str) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut blob = Vec::new();
    for &n in names {
        let (shape, values) = &tensors[n];
        let data = to_bytes(values, dtype);
        let entry =
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [blob.len(), blob.len() + data.len()]});
        header.insert(n.clone(), entry);
        blob.extend_from_slice(&data);
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&blob);
    std::fs::write(path, out)
}

fn config(t: Tiny) -> serde_json::Value {
    let architecture = match t.arch {
        "llama" => "LlamaForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "Qwen3ForCausalLM",
    };
    let mut c = serde_json::json!({
        "architectures": [architecture],
        "model_type": t.arch, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "rope_theta": if t.arch == "llama" { 10000.0 } else { 1000000.0 },
        "max_position_embeddings": 256, "tie_word_embeddings": t.tied, "hidden_act": "silu",
        "torch_dtype": match t.dtype { "F16" => "float16", "BF16" => "bfloat16", _ => "float32" },
        "bos_token_id": 256 + 4, "eos_token_id": 256 + 6,
    });
    if let Some(hd) = t.head_dim {
        c["head_dim"] = hd.into();
    }
    if t.arch == "llama" {
        c["attention_bias"] = false.into();
    }
    if t.latent {
        c["latent_kv"] = serde_json::json!({"k_ranks": LATENT_K_RANKS, "v_ranks": LATENT_V_RANKS});
    }
    c
}

/// GPT-2's reversible byte -> printable character map of byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec![' '; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        map[b as usize] = char::from_u32(c).expect("a char");
    }
    map
}

fn tokenizer_json() -> serde_json::Value {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")];
    for (a, b) in merges {
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), id.into());
    }
    let mut added = Vec::new();
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        let id = vocab.len();
        added.push(serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}));
        vocab.insert(s.to_string(), id.into());
    }
    assert!(vocab.len() <= VOCAB);
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    })
}
