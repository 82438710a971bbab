//! `tandem serve` as a worker of a fleet: registration with the gateway, traces to the broker,
//! drafter versions from it, and weight updates from the operator's folder (docs/fleet.md).
use anyhow::Result;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tandem_engine::online::OnlineHooks;
use tandem_fleet::drafters::DrafterSource;
use tandem_fleet::gateway::Registration;
use tandem_fleet::traces::TraceSink;
use tandem_server::worker::MetricsText;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct FleetArgs {
    /// Register with this gateway (the SGLang Model Gateway, `smg`), e.g. http://127.0.0.1:30000,
    /// once serving, and leave it at shutdown. The gateway routes OpenAI traffic to its workers
    /// and fans its RL controls out to them.
    #[arg(long, value_name = "URL")]
    pub router: Option<String>,
    /// How the gateway reaches this server. Default: http://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// The folder `POST /update_weights_from_disk` may read drafter versions from (nothing
    /// outside it). Needs an EAGLE drafter (`--spec eagle`).
    #[arg(long, value_name = "DIR")]
    pub weights_dir: Option<PathBuf>,
    /// Publish every trace (the records --trace-dir writes) to this NATS JetStream broker,
    /// e.g. nats://127.0.0.1:4222, for a fleet trainer (`tandem train-drafter --follow`).
    /// Best effort: serving never waits for the broker; traces it cannot take are dropped and
    /// counted. Needs `--spec eagle`.
    #[arg(long, value_name = "NATS_URL")]
    pub trace_sink: Option<String>,
    /// Cap on the broker's trace stream when this server creates it, in MiB (the oldest traces
    /// go first beyond it).
    #[arg(long, default_value_t = 2048)]
    pub trace_stream_mib: i64,
    /// Share the training API's sampler weights (`save_weights_for_sampler`) through this NATS
    /// broker: saved here, they sample on every server of the fleet started with the same flag.
    #[arg(long, value_name = "NATS_URL")]
    pub weight_store: Option<String>,
    /// Serve the drafter versions a fleet trainer publishes to this NATS broker: each is
    /// fetched, its digest and shapes checked, and swapped in between steps (rolled back if it
    /// lowers acceptance, as online training's). Needs `--spec eagle`.
    #[arg(long, value_name = "NATS_URL")]
    pub drafter_source: Option<String>,
}

impl FleetArgs {
    /// Whether the drafter needs online hooks without an in-process trainer: traces to publish,
    /// or versions to take from outside.
    pub fn needs_hooks(&self) -> bool {
        self.weights_dir.is_some() || self.trace_sink.is_some() || self.drafter_source.is_some()
    }

    pub fn check(&self, spec: &str, online: bool) -> Result<()> {
        for (flag, url) in [("--trace-sink", &self.trace_sink), ("--drafter-source", &self.drafter_source)] {
            if let Some(u) = url {
                tandem_fleet::broker::check_url(flag, u).map_err(anyhow::Error::msg)?;
                if !spec.starts_with("eagle") {
                    anyhow::bail!("{flag} carries an EAGLE drafter's traces and weights: add --spec eagle");
                }
            }
        }
        if online && (self.trace_sink.is_some() || self.drafter_source.is_some()) {
            anyhow::bail!(
                "--spec-train online trains in this process; with --trace-sink / --drafter-source a fleet trainer \
                 (`tandem train-drafter --follow`) trains: choose one"
            );
        }
        if let Some(d) = &self.weights_dir {
            if !d.is_dir() {
                anyhow::bail!("--weights-dir {}: no such folder", d.display());
            }
        }
        Ok(())
    }
}

/// The fleet parts a server runs; they stop when dropped.
#[derive(Default)]
pub struct Fleet {
    registration: Option<Registration>,
    sink: Option<TraceSink>,
    source: Option<DrafterSource>,
}

impl Fleet {
    /// Starts the broker clients for `model`'s drafter (`hooks`: its traces and weight slot).
    pub fn start_broker(args: &FleetArgs, model: &str, hooks: Option<&OnlineHooks>) -> Fleet {
        let mut fleet = Fleet::default();
        if let Some(h) = hooks {
            if let Some(url) = &args.trace_sink {
                fleet.sink = Some(TraceSink::start(url, model, h.traces.clone(), args.trace_stream_mib << 20));
                eprintln!("traces go to {url}");
            }
            if let Some(url) = &args.drafter_source {
                fleet.source = Some(DrafterSource::start(url, model, h.exchange.clone()));
                eprintln!("drafter versions come from {url}");
            }
        }
        fleet
    }

    /// Registers with the gateway, if one was given.
    pub fn join(&mut self, args: &FleetArgs, host: &str, port: u16) {
        if let Some(router) = &args.router {
            let me = args.advertise_url.clone().unwrap_or_else(|| format!("http://{host}:{port}"));
            self.registration = Some(Registration::start(router, &me));
        }
    }

    pub fn leave(&self) {
        if let Some(r) = &self.registration {
            r.leave();
        }
    }

    /// The broker clients' figures for /metrics.
    pub fn metrics(&self) -> Vec<MetricsText> {
        let mut out: Vec<MetricsText> = Vec::new();
        if let Some(s) = &self.sink {
            let c = s.counters.clone();
            out.push(Box::new(move || {
                render(&[
                    ("tandem_fleet_trace_sink_connected", "gauge", "1 while the trace broker is connected.", c.connected.load(Relaxed) as u64),
                    ("tandem_fleet_traces_published_total", "counter", "Traces the broker stored.", c.traces.load(Relaxed)),
                    ("tandem_fleet_trace_messages_total", "counter", "Messages they took (long traces are split to fit the broker's payload limit).", c.messages.load(Relaxed)),
                    ("tandem_fleet_trace_bytes_total", "counter", "Bytes of traces the broker stored.", c.bytes.load(Relaxed)),
                    ("tandem_fleet_traces_failed_total", "counter", "Traces lost because the broker did not take them (traces dropped while it was away count in tandem_traces_dropped_total).", c.failed.load(Relaxed)),
                ])
            }));
        }
        if let Some(s) = &self.source {
            let c = s.counters.clone();
            out.push(Box::new(move || {
                render(&[
                    (
                        "tandem_fleet_drafter_source_connected",
                        "gauge",
                        "1 while the drafter broker is connected.",
                        c.connected.load(Relaxed) as u64,
                    ),
                    (
                        "tandem_fleet_drafter_announced_version",
                        "gauge",
                        "Newest drafter version the fleet trainer announced.",
                        c.announced.load(Relaxed),
                    ),
                    (
                        "tandem_fleet_drafter_offered_total",
                        "counter",
                        "Versions fetched, checked and offered to the engine.",
                        c.offered.load(Relaxed),
                    ),
                    (
                        "tandem_fleet_drafter_refused_total",
                        "counter",
                        "Versions refused (digest, format or shape): the previous one kept serving.",
                        c.refused.load(Relaxed),
                    ),
                ])
            }));
        }
        out
    }
}

/// Prometheus text for (name, type, help, value) rows.
fn render(rows: &[(&str, &str, &str, u64)]) -> String {
    let mut t = String::new();
    for (name, kind, help, v) in rows {
        let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    t
}

/// The fleet's store for the training API's sampler weights, when asked for.
pub fn weight_store(args: &FleetArgs) -> Result<Option<Arc<dyn tandem_server::training::WeightStore>>> {
    match &args.weight_store {
        None => Ok(None),
        Some(url) => {
            let store = tandem_fleet::weights::BrokerWeightStore::connect(url).map_err(anyhow::Error::msg)?;
            eprintln!("sampler weights are shared through {url}");
            Ok(Some(Arc::new(store)))
        }
    }
}
