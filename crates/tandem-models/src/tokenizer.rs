//! A `tokenizers::Tokenizer` built from GGUF metadata: the byte-level BPE vocabulary and merges,
//! the pre-tokenizer the model was trained with (named by `tokenizer.ggml.pre`), and its special
//! tokens.
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split: contractions, letters with one leading non-letter, single digits, punctuation runs,
/// newlines, spaces not followed by a non-space.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split: as Qwen2's but digits in groups of up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings(content: &Content, key: &str) -> Result<Vec<String>, String> {
    let v = content.metadata.get(key).ok_or_else(|| format!("missing metadata `{key}`"))?;
    let arr = v.to_vec().map_err(|_| format!("`{key}` is not an array"))?;
    arr.iter().map(|v| v.to_string().cloned().map_err(|_| format!("`{key}` holds a non-string"))).collect()
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::U8(x) => Some(*x as u32),
        Value::I8(x) => Some(*x as u32),
        Value::U16(x) => Some(*x as u32),
        Value::I16(x) => Some(*x as u32),
        Value::U32(x) => Some(*x),
        Value::I32(x) => Some(*x as u32),
        Value::U64(x) => Some(*x as u32),
        Value::I64(x) => Some(*x as u32),
        _ => None,
    }
}

pub fn metadata_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(as_u32)
}

fn split(regex: &str) -> Result<PreTokenizerWrapper, String> {
    Ok(Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| e.to_string())?
        .into())
}

/// Builds the tokenizer of a GGUF file.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer, String> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or("missing metadata `tokenizer.ggml.model`")?;
    if model != "gpt2" {
        return Err(format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"));
    }
    let tokens = strings(content, "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or(format!("bad merge `{m}`")))
        .collect::<Result<_, _>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| format!("cannot build BPE: {e}"))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = content
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let byte_level_regex = ByteLevel::new(false, true, true);
    let byte_level_plain = ByteLevel::new(false, true, false);
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        // SmolLM2 / GPT-2 style with every digit split off on its own.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level_regex.into()]).into(),
        "qwen2" | "deepseek-r1-qwen" => {
            tok.with_normalizer(Some(NFC)).map_err(|e| e.to_string())?;
            Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level_plain.into()]).into()
        }
        "llama3" | "llama-bpe" | "smaug-bpe" => {
            Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level_plain.into()]).into()
        }
        "default" | "gpt2" | "gpt-2" => byte_level_regex.into(),
        other => return Err(format!("pre-tokenizer `{other}` is not supported (smollm, qwen2, llama3, gpt2)")),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let types: Vec<u32> = match content.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(arr) => arr.iter().map(|v| as_u32(v).unwrap_or(1)).collect(),
        None => vec![],
    };
    let mut specials = Vec::new();
    let mut user = Vec::new();
    for (i, ty) in types.iter().enumerate() {
        match ty {
            3 => specials.push(AddedToken::from(tokens[i].clone(), true)),
            4 => user.push(AddedToken::from(tokens[i].clone(), false).normalized(false)),
            _ => {}
        }
    }
    tok.add_special_tokens(specials).map_err(|e| e.to_string())?;
    tok.add_tokens(user).map_err(|e| e.to_string())?;
    Ok(tok)
}
