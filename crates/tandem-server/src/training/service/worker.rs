//! A training model's worker thread and how it runs each request: compute work in turns of the
//! engine's scheduling policy, charged to the client that asked; saves and loads at once.
use super::*;

/// A training model's thread: runs its requests one at a time, in seq_id order.
pub(super) fn worker(
    me: std::sync::Weak<TrainingService>,
    model_id: String,
    mut trainer: TrainingModel,
    rx: mpsc::Receiver<Job>,
) {
    let mut rate = TrainRate::default();
    while let Ok(job) = rx.recv() {
        let Some(service) = me.upgrade() else { break };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            service.run_in_turn(&model_id, &mut trainer, job.work, &job.client, &mut rate)
        }));
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(f)) => f.into(),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(model_id = %model_id, error = %msg, "training request panicked");
                Outcome::failed_server(format!("internal error: {msg}"))
            }
        };
        job.done.complete(outcome);
    }
}

/// A training model's forward_backward speed, tokens per second, from its last request: what an
/// optim_step is charged for its time (the tokens the model would have processed meanwhile).
#[derive(Default)]
struct TrainRate(Option<f64>);

impl TrainingService {
    /// Runs compute work (forward_backward, forward, optim_step) in turns of the engine's
    /// scheduling policy, charged to `client`: tokens processed (forward: as prompt tokens;
    /// forward_backward: `FairConfig::train_weight` each; optim_step: its time at the model's
    /// forward_backward rate). A forward_backward of several passes takes a turn per pass: a
    /// batch that trains for a minute gives the cores back between passes, and waits there while
    /// a client served less has work; its passes are short while other clients are served and
    /// bigger when the machine is the trainer's (`PassSize`). Other work (saves, loads) runs at once.
    fn run_in_turn(
        &self,
        model_id: &str,
        t: &mut TrainingModel,
        work: Work,
        client: &Client,
        rate: &mut TrainRate,
    ) -> Result<Outcome> {
        let tokens = match &work {
            Work::ForwardBackward { data, .. } => data.iter().map(|d| d.tokens.len()).sum(),
            Work::OptimStep(_) => 0,
            _ => return self.run(model_id, t, work, &mut |_| PassSize::Alone),
        };
        let backward = matches!(&work, Work::ForwardBackward { forward_only: false, .. } | Work::OptimStep(_));
        let take_turn = || self.engine.training_turn(&client.0, client.1.as_deref());
        let mut turn = Some(take_turn());
        let started = std::time::Instant::now();
        let (mut charged, mut waited) = (0, std::time::Duration::ZERO);
        let outcome = self.run(model_id, t, work, &mut |pass_tokens| {
            // A pass's turn ends (charged) before the next is asked for; the first pass runs in
            // the turn taken above.
            if pass_tokens > 0 {
                if let Some(done) = turn.take() {
                    done.charge(pass_tokens, backward);
                }
                charged += pass_tokens;
                let next = take_turn();
                waited += next.waited;
                turn = Some(next);
            }
            if turn.as_ref().is_some_and(|t| t.shared) {
                PassSize::Shared
            } else {
                PassSize::Alone
            }
        });
        let secs = (started.elapsed() - waited).as_secs_f64();
        let rest = match tokens {
            0 => (secs * rate.0.unwrap_or(0.0)).round() as usize,
            n => {
                if backward {
                    rate.0 = Some(n as f64 / secs.max(1e-6));
                }
                n - charged
            }
        };
        if let Some(turn) = turn {
            turn.charge(rest, backward);
        }
        tracing::debug!(model_id, waited_secs = waited.as_secs_f64(), tokens, "training turns");
        outcome
    }

    /// Runs `work`; a forward_backward calls `next_pass` before each pass (with the tokens of the
    /// pass before it, 0 before the first) for its size.
    fn run(
        &self,
        model_id: &str,
        t: &mut TrainingModel,
        work: Work,
        next_pass: &mut dyn FnMut(usize) -> PassSize,
    ) -> Result<Outcome> {
        match work {
            Work::ForwardBackward { data, loss, forward_only } => {
                let started = std::time::Instant::now();
                let _memory = self.hold_memory(t.peak_bytes(&data, forward_only));
                let out = t.forward_backward_in_passes(&data, &loss, forward_only, next_pass)?;
                tracing::info!(
                    model_id,
                    loss = loss.name(),
                    datums = data.len(),
                    forward_only,
                    loss_sum = out.metrics["loss:sum"],
                    secs = started.elapsed().as_secs_f64(),
                    "forward_backward"
                );
                Ok(Outcome::ForwardBackward(ForwardBackwardResult { logprobs: out.logprobs, metrics: out.metrics }))
            }
            Work::OptimStep(p) => {
                let metrics = t.optim_step(&p)?;
                Ok(Outcome::Json(json!({"metrics": metrics, "type": "optim_step"})))
            }
            Work::SaveWeights { name } => {
                check_name(&name)?;
                // Weights and the optimizer's two moments, in f32.
                self.check_disk(t.num_parameters() as u64 * 12)?;
                let p = TinkerPath { run: model_id.into(), kind: "weights".into(), name };
                t.save(&self.checkpoint_dir(&p), true)?;
                Ok(Outcome::Json(json!({"path": p.to_path(), "type": "save_weights"})))
            }
            Work::SaveForSampler { name, session } => {
                let version = self.register_version(t.snapshot()?, model_id);
                match (name, session) {
                    (Some(name), _) => {
                        check_name(&name)?;
                        self.check_disk(t.num_parameters() as u64 * 4)?;
                        let p = TinkerPath { run: model_id.into(), kind: "sampler_weights".into(), name };
                        t.save(&self.checkpoint_dir(&p), false)?;
                        self.share(&p.to_path(), &self.checkpoint_dir(&p));
                        self.versions
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(p.to_path(), version);
                        Ok(Outcome::Json(json!({"path": p.to_path(), "type": "save_weights_for_sampler"})))
                    }
                    (None, session) => {
                        if let Some(s) = &session {
                            self.check_session(s)?;
                        }
                        let id = self.add_sampler(Sampler {
                            session: session.clone(),
                            base_model: self.base_name.clone(),
                            model_path: None,
                            weights: Some(version),
                        });
                        Ok(Outcome::Json(json!({"sampling_session_id": id, "type": "save_weights_for_sampler"})))
                    }
                }
            }
            Work::Fail(message) => Err(Failure::user(message)),
            Work::LoadWeights { path, optimizer } => {
                let p = TinkerPath::parse(&path)?;
                t.load(&self.checkpoint_dir(&p), optimizer)?;
                Ok(Outcome::Json(json!({"path": path, "model_id": model_id, "type": "load_weights"})))
            }
        }
    }
}
