//! A virtual model's evolution settings (`tandem serve --evolve NAME=config.json`), with every
//! default and every range check in one place.
use crate::answer::Extractor;
use serde::Deserialize;

/// Largest population, rounds and group size a configuration may ask for: N x T generations per
/// request already make one evolution the work of hundreds of ordinary ones.
pub const MAX_N: usize = 64;
pub const MAX_T: usize = 50;

/// How one evolution runs. The first tier writes the first population; later rounds route each
/// group of K candidates to a tier (Squeeze Evolve), or all to the first tier (RSA).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvolveConfig {
    /// Population size N (candidates per round).
    #[serde(default = "defaults::n")]
    pub n: usize,
    /// Candidates each aggregation reads (K <= N).
    #[serde(default = "defaults::k")]
    pub k: usize,
    /// Rounds T, the first (independent samples) included.
    #[serde(default = "defaults::t")]
    pub t: usize,
    /// Served model names, most expensive first: one tier is RSA, two are Squeeze Evolve's
    /// expensive and cheap models.
    pub tiers: Vec<String>,
    /// Squeeze Evolve's routing: per round, the groups whose confidence is in the lowest
    /// `percentile` percent go to the expensive tier, the rest to the cheap one (0: all cheap
    /// after the first round; 100: all expensive).
    #[serde(default = "defaults::percentile")]
    pub percentile: f64,
    /// Percent of groups, the most confident, that take their members' majority answer instead of
    /// a generation (0: none).
    #[serde(default)]
    pub vote_percentile: f64,
    /// The model that scores candidates' confidence (default: the cheapest tier). Setting it with
    /// one tier scores without routing (to observe confidence).
    #[serde(default)]
    pub scorer: Option<String>,
    /// Entries per position in the confidence score (the paper's k = 20).
    #[serde(default = "defaults::confidence_top_k")]
    pub confidence_top_k: usize,
    /// Longest candidate, in tokens: K of them must fit an aggregation prompt.
    #[serde(default = "defaults::max_tokens")]
    pub max_tokens: usize,
    #[serde(default = "defaults::temperature")]
    pub temperature: f32,
    /// How an answer is read from a candidate (the same code for every method).
    #[serde(default)]
    pub answer: Extractor,
    /// Seeds the grouping and every generation (a request's `seed` overrides it); None: random.
    #[serde(default)]
    pub seed: Option<u64>,
}

mod defaults {
    pub fn n() -> usize {
        16
    }
    pub fn k() -> usize {
        4
    }
    pub fn t() -> usize {
        10
    }
    pub fn percentile() -> f64 {
        100.0
    }
    pub fn confidence_top_k() -> usize {
        20
    }
    pub fn max_tokens() -> usize {
        512
    }
    pub fn temperature() -> f32 {
        1.0
    }
}

impl EvolveConfig {
    /// Parses and checks a configuration; errors name the field.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let config: EvolveConfig =
            serde_json::from_str(text).map_err(|e| format!("invalid evolve configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// The ranges every configuration must meet (the served models' limits are the server's to
    /// check: `check_models`).
    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, v: f64, lo: f64, hi: f64| {
            if !(lo..=hi).contains(&v) {
                return Err(format!("`{name}` must be between {lo} and {hi}, got {v}"));
            }
            Ok(())
        };
        range("n", self.n as f64, 1.0, MAX_N as f64)?;
        range("t", self.t as f64, 1.0, MAX_T as f64)?;
        range("k", self.k as f64, 1.0, self.n as f64)?;
        range("percentile", self.percentile, 0.0, 100.0)?;
        range("vote_percentile", self.vote_percentile, 0.0, 100.0)?;
        range("confidence_top_k", self.confidence_top_k as f64, 1.0, 100.0)?;
        range("max_tokens", self.max_tokens as f64, 1.0, 1e6)?;
        range("temperature", self.temperature as f64, 0.0, 2.0)?;
        if self.tiers.is_empty() || self.tiers.len() > 2 {
            return Err(format!(
                "`tiers` lists one model (RSA) or two (expensive, then cheap: Squeeze Evolve), got {}",
                self.tiers.len()
            ));
        }
        if self.percentile + self.vote_percentile > 100.0 {
            return Err("`percentile` + `vote_percentile` must be at most 100".into());
        }
        Ok(())
    }

    /// Whether candidates are scored: routing between two tiers by a percentile strictly inside
    /// (0, 100), voting, or a scorer set to observe.
    pub fn scores(&self) -> bool {
        let routes = self.tiers.len() == 2 && self.percentile > 0.0 && self.percentile < 100.0;
        routes || self.vote_percentile > 0.0 || self.scorer.is_some()
    }

    /// The model that scores confidence.
    pub fn scorer(&self) -> &str {
        self.scorer.as_deref().unwrap_or_else(|| self.tiers.last().map(String::as_str).unwrap_or_default())
    }

    /// Every model the configuration names (tiers, then the scorer).
    pub fn models(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self.tiers.iter().map(String::as_str).collect();
        all.extend(self.scorer.as_deref());
        all
    }

    /// Checks the configuration against the served models: each named model exists, and K
    /// candidates of `max_tokens` plus a question fit its context (`context(name)`: None when
    /// no such model is served).
    pub fn check_models(&self, context: impl Fn(&str) -> Option<usize>) -> Result<(), String> {
        for name in self.models() {
            let Some(ctx) = context(name) else {
                return Err(format!("model `{name}` is not served (give it with --model)"));
            };
            let need = self.k * self.max_tokens + QUESTION_ROOM + self.max_tokens;
            if self.t > 1 && need > ctx {
                return Err(format!(
                    "an aggregation prompt of k = {} candidates of up to max_tokens = {} tokens, with the question and instructions ({QUESTION_ROOM} tokens allowed) and room to answer, needs {need} tokens; `{name}` holds {ctx}: lower k or max_tokens",
                    self.k, self.max_tokens
                ));
            }
        }
        Ok(())
    }
}

/// Tokens an aggregation prompt keeps for the question, the instructions and the chat template.
pub const QUESTION_ROOM: usize = 1024;

/// The longest question an evolving model takes, in tokens (the rest of `QUESTION_ROOM` is the
/// aggregation instructions' and the template's).
pub const MAX_QUESTION: usize = QUESTION_ROOM - 256;
