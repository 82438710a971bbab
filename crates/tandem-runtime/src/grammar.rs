//! Structured outputs: a grammar (a JSON schema, any JSON object, a regular expression, a choice
//! of strings, a Lark grammar) that the output must stay within. The sampler bans every token the
//! grammar does not allow next, so plain decoding, batching and speculation (which verifies each
//! draft token through the same sampler) all emit the same constrained text.
//!
//! The grammars are llguidance's (the engine vLLM, SGLang and llama.cpp use for the same job): it
//! compiles a grammar once per request and computes each step's allowed tokens from a trie of the
//! tokenizer's byte strings in tens of microseconds.
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use tokenizers::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON document valid under this JSON schema.
    JsonSchema(Value),
    /// Text the regular expression matches whole (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

impl GrammarSpec {
    /// JSON with the separators Python's `json.dumps` writes (`", "`, `": "`) and no other
    /// whitespace: models write JSON that way, and a grammar that allows any whitespace lets a small
    /// model pad its output with newlines until `max_tokens` (a schema's own `x-guidance` options
    /// win).
    fn json(mut schema: Value) -> TopLevelGrammar {
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(
                || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        TopLevelGrammar::from_json_schema(schema)
    }

    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            GrammarSpec::JsonObject => Self::json(json!({"type": "object"})),
            GrammarSpec::JsonSchema(schema) => Self::json(schema.clone()),
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Choice(options) => {
                if options.is_empty() {
                    return Err("the choice needs at least one string".into());
                }
                TopLevelGrammar::from_lark(choice_lark(options))
            }
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// A Lark grammar whose only sentences are `options` (each a quoted literal).
fn choice_lark(options: &[String]) -> String {
    let quoted: Vec<String> = options.iter().map(|o| Value::String(o.clone()).to_string()).collect();
    format!("start: {}", quoted.join(" | "))
}

/// A model's grammar compiler: its tokenizer's tokens as bytes (made once per model, on the first
/// structured request).
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
}

/// The tokenizer as llguidance sees it: the trie of token bytes, and the tokenizer itself for the
/// text a grammar forces.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Byte-exact: text through the tokenizer, and bytes that are not UTF-8 (a character a token
    /// boundary split) by the trie's longest matches, never as replacement characters.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

/// Runs `f`, turning an error or a panic inside llguidance into a message.
fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: the grammar engine failed")),
    }
}

impl Grammars {
    /// For a loaded model (its tokenizer, logits and stop tokens).
    pub fn for_model(m: &tandem_models::LoadedModel) -> Result<Self, String> {
        Self::new(Arc::new(m.tokenizer.clone()), m.model.config.vocab_size, &m.stop_token_ids)
    }

    /// For a model whose logits have `vocab_size` entries and whose sequences end at `stop_tokens`
    /// (the first is the end a complete grammar allows; the sampler allows the others beside it).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, stop_tokens: &[u32]) -> Result<Self, String> {
        let eos = stop_tokens.first().copied().unwrap_or(0);
        let json: Value =
            serde_json::from_str(&tokenizer.to_string(false).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let mut words =
            guarded("reading the tokenizer's tokens", || llguidance::token_bytes_from_tokenizer_json(&json))?;
        // Ids the model has but the tokenizer does not (padding) are no text: never allowed.
        words.resize(vocab_size.max(words.len()), Vec::new());
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = guarded("building the token trie", || Ok(TokTrie::from(&info, &words)))?;
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = guarded("preparing the grammar engine", || ParserFactory::new_simple(&env))?;
        factory.quiet();
        Ok(Grammars { factory, eos })
    }

    /// Compiles `spec` for one request (an error says what is wrong with it).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Grammar, String> {
        let grammar = spec.top_level()?;
        let matcher = guarded("invalid grammar", || {
            let m = Matcher::new(self.factory.create_parser(grammar));
            match m.get_error() {
                Some(e) => Err(anyhow::anyhow!(e)),
                None => Ok(m),
            }
        })?;
        Ok(Grammar(Arc::new(Compiled { spec: spec.clone(), eos: self.eos, start: Mutex::new(matcher) })))
    }
}

/// A compiled grammar, shared by every choice of a request: each sampler follows it with a matcher
/// of its own.
#[derive(Clone)]
pub struct Grammar(Arc<Compiled>);

struct Compiled {
    spec: GrammarSpec,
    /// The end-of-sequence token the grammar allows once it is complete.
    eos: u32,
    /// The matcher before any token (cloned for each sampler).
    start: Mutex<Matcher>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({:?})", self.0.spec)
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.0.spec == other.0.spec
    }
}

impl Grammar {
    pub fn spec(&self) -> &GrammarSpec {
        &self.0.spec
    }

    /// A matcher at the start of the output.
    pub(crate) fn follow(&self) -> Following {
        Following { grammar: self.clone(), matcher: self.fresh(), consumed: Vec::new() }
    }

    fn fresh(&self) -> Matcher {
        self.0.start.lock().unwrap_or_else(|e| e.into_inner()).deep_clone()
    }
}

/// One sequence's place in its grammar: the output tokens its matcher has taken.
pub(crate) struct Following {
    grammar: Grammar,
    matcher: Matcher,
    consumed: Vec<u32>,
}

impl Following {
    /// The tokens the grammar allows after `output` (the sequence's output so far), or None when
    /// it allows only the end of the sequence. A token the grammar did not allow (a draft token
    /// the target then rejected is never fed here; only an output the grammar broke) leaves the
    /// grammar ended too.
    pub(crate) fn allowed(&mut self, output: &[u32]) -> Option<SimpleVob> {
        self.catch_up(output);
        if self.matcher.is_stopped() {
            return None;
        }
        let mask = guarded("grammar mask", || self.matcher.compute_mask()).ok()?;
        // An accepting state allows the end-of-sequence token; the caller allows every stop token.
        Some(mask)
    }

    /// The end-of-sequence token the grammar allows once it is complete.
    pub(crate) fn eos(&self) -> u32 {
        self.grammar.0.eos
    }

    /// Brings the matcher to `output`: back to the longest prefix it shares with what was consumed,
    /// then forward.
    fn catch_up(&mut self, output: &[u32]) {
        let common = self.consumed.iter().zip(output).take_while(|(a, b)| a == b).count();
        if common < self.consumed.len() {
            let back = self.consumed.len() - common;
            if guarded("grammar rollback", || self.matcher.rollback(back)).is_err() {
                self.matcher = self.grammar.fresh();
                self.consumed.clear();
                return self.catch_up(output);
            }
            self.consumed.truncate(common);
        }
        let new = &output[self.consumed.len()..];
        if !new.is_empty() {
            // An error (a token outside the grammar) leaves the matcher stopped: only the end is
            // allowed from there.
            let _ = guarded("grammar step", || self.matcher.consume_tokens(new));
            self.consumed.extend_from_slice(new);
        }
    }
}
