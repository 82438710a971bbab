//! Sampling through the engine for the training API: a sampling session's requests run as
//! ordinary generations (batched with all other traffic, on the session's weight version), and
//! their tokens and logprobs are collected into one result.
use super::{Failure, Result, TrainingService};
use crate::training::results::{Outcome, SampleResult, SampledSequence};
use tandem_engine::{Event, GenerationRequest, WeightVersion};
use tandem_models::{Model, Tokenizer};
use tandem_runtime::SamplingParams;

impl TrainingService {
    /// Starts `n` samples of `prompt` through the engine (batched with all other traffic);
    /// returns the request id and one sequence id per sample. A resubmission of the same
    /// (session, seq_id) gets the same ids.
    pub fn sample(&self, req: SampleRequest) -> Result<(String, Vec<String>)> {
        let key = req.dedup.clone();
        if let Some(k) = &key {
            if let Some(found) = self.samples_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(k) {
                return Ok(found.clone());
            }
        }
        if req.num_samples == 0 || req.num_samples > 128 {
            return Err(Failure::user(format!("num_samples must be 1..=128, got {}", req.num_samples)));
        }
        let limit = self.engine.config().max_seq_len;
        let max_tokens = req.max_tokens.unwrap_or(limit).min(limit.saturating_sub(req.prompt.len()));
        let client = super::tinker_client(req.key_client.clone(), &req.session);
        let request = |i: usize| GenerationRequest {
            prompt: req.prompt.clone(),
            max_tokens,
            sampling: SamplingParams {
                temperature: req.temperature,
                top_k: req.top_k,
                top_p: req.top_p,
                seed: Some(req.seed.map_or_else(rand::random, |s| s.wrapping_add(i as u64))),
                ..Default::default()
            },
            stop_token_ids: vec![],
            client: Some(client.0.clone()),
            agent: client.1.clone(),
            weights: req.weights.clone(),
            score: None,
        };
        // The engine's one check, before any sample is queued (all n or none).
        self.engine.validate(&request(0))?;
        let mut receivers = Vec::new();
        for i in 0..req.num_samples {
            receivers.push(self.engine.submit(request(i))?);
        }
        let (id, done) = self.new_future()?;
        let seq_ids: Vec<String> = (0..req.num_samples).map(|i| format!("{id}-{i}")).collect();
        if let Some(k) = key {
            self.samples_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(k, (id.clone(), seq_ids.clone()));
        }
        let tokenizer = self.tokenizer.clone();
        let prompt_model =
            req.prompt_logprobs.then(|| req.weights.as_ref().map_or(self.base.clone(), |w| (*w.model).clone()));
        let (prompt, stop) = (req.prompt.clone(), req.stop.clone());
        tokio::spawn(async move {
            let prompt_lp = match prompt_model {
                None => Ok(None),
                Some(model) => tokio::task::spawn_blocking(move || prompt_logprobs(&model, &prompt))
                    .await
                    .unwrap_or_else(|e| Err(format!("prompt logprobs failed: {e}")))
                    .map(Some),
            };
            let mut sequences = Vec::new();
            for rx in receivers {
                match collect(rx, &stop, &tokenizer).await {
                    Ok(s) => sequences.push(s),
                    Err(e) => return done.complete(Outcome::failed_server(e)),
                }
            }
            match prompt_lp {
                Ok(prompt_logprobs) => done.complete(Outcome::Sample(SampleResult { sequences, prompt_logprobs })),
                Err(e) => done.complete(Outcome::failed_server(e)),
            }
        });
        Ok((id, seq_ids))
    }
}

pub struct SampleRequest {
    /// The Tinker session charged for it (the one that made the sampler; "base" for none).
    pub session: String,
    /// The API key's client when keys are on (the session is then the agent within it).
    pub key_client: Option<String>,
    pub dedup: Option<(String, i64)>,
    pub weights: Option<WeightVersion>,
    pub prompt: Vec<u32>,
    pub num_samples: usize,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Stop,
    pub prompt_logprobs: bool,
}

#[derive(Clone, Default)]
pub struct Stop {
    pub tokens: Vec<u32>,
    pub strings: Vec<String>,
}

/// Reads one sample's events; a stop token or string ends it (and is kept, with its logprob:
/// the policy chose it). Dropping the receiver cancels the rest in the engine.
async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    stop: &Stop,
    tokenizer: &Tokenizer,
) -> std::result::Result<SampledSequence, String> {
    let mut s = SampledSequence { tokens: Vec::new(), logprobs: Vec::new(), stopped: false };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => {
                s.tokens.push(t.id);
                s.logprobs.push(t.logprob);
                if stop.tokens.contains(&t.id) {
                    s.stopped = true;
                    return Ok(s);
                }
                if !stop.strings.is_empty() {
                    let text = tokenizer.decode(&s.tokens, false).unwrap_or_default();
                    if stop.strings.iter().any(|x| text.contains(x.as_str())) {
                        s.stopped = true;
                        return Ok(s);
                    }
                }
            }
            Event::Finished { reason, .. } => {
                s.stopped = matches!(reason, tandem_runtime::FinishReason::Stop);
                return Ok(s);
            }
            Event::Failed(e) => return Err(e),
            Event::Scored(_) => {}
        }
    }
    Err("the engine stopped before the sample finished".into())
}

/// log p(prompt[i] | prompt[..i]) for every position, NaN at 0 (nothing precedes it).
fn prompt_logprobs(model: &Model, prompt: &[u32]) -> std::result::Result<Vec<f32>, String> {
    let logits = model.forward_sequence(prompt).map_err(|e| e.to_string())?;
    let rows = logits.to_vec2::<f32>().map_err(|e| e.to_string())?;
    let mut out = vec![f32::NAN];
    for (i, row) in rows.iter().enumerate().take(prompt.len().saturating_sub(1)) {
        out.push(tandem_runtime::sampling::logprob(row, prompt[i + 1]));
    }
    Ok(out)
}
