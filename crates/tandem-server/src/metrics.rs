//! Prometheus metrics in the text exposition format, kept in atomics and small mutexes (no
//! dependency needed for a handful of series).
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(name, "", out);
    }

    /// The bucket, sum and count lines, with `labels` (e.g. `client="a"`) on each.
    fn render_series(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Request latency (arrival to last token) per client.
    client_latency: Mutex<BTreeMap<String, Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(),
            inter_token_latency: Histogram::new(),
            client_latency: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Engine state sampled when metrics are scraped.
pub struct EngineGauges {
    pub waiting: usize,
    pub running: usize,
    pub kv: tandem_models::KvUsage,
    pub kv_bytes_per_block: usize,
    pub spec: tandem_engine::SpecStats,
    pub policy: &'static str,
    pub service: Vec<tandem_engine::Service>,
    pub waiting_by_client: Vec<(String, usize)>,
    pub preemptions: usize,
    pub online: Option<tandem_engine::online::OnlineHooks>,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn observe_client_latency(&self, client: &str, secs: f64) {
        let mut map = self.client_latency.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(client.to_string()).or_insert_with(Histogram::new).observe(secs);
    }

    pub fn render(&self, gauges: &EngineGauges) -> String {
        let mut out = String::new();
        out.push_str("# HELP tandem_requests_total HTTP requests by endpoint and status.\n# TYPE tandem_requests_total counter\n");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "tandem_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "tandem_prompt_tokens_total",
            "Prompt tokens processed.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "tandem_generation_tokens_total",
            "Tokens generated.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        gauge(&mut out, "tandem_queue_depth", "Requests waiting for a KV slot.", gauges.waiting);
        gauge(&mut out, "tandem_running_batch_size", "Requests being generated.", gauges.running);
        let (kv, block) = (&gauges.kv, gauges.kv_bytes_per_block);
        gauge(&mut out, "tandem_kv_cache_used_bytes", "KV cache bytes held by running requests.", kv.held * block);
        gauge(
            &mut out,
            "tandem_kv_cache_cached_bytes",
            "KV cache bytes held by no request, kept for prompts that start the same way.",
            kv.cached * block,
        );
        gauge(&mut out, "tandem_kv_cache_total_bytes", "KV cache bytes allocated.", kv.blocks * block);
        let name = "tandem_kv_cache_blocks";
        let _ = writeln!(
            out,
            "# HELP {name} KV cache blocks of {} tokens by state.\n# TYPE {name} gauge",
            tandem_models::BLOCK
        );
        let free = kv.blocks - kv.held - kv.cached;
        for (state, n) in [("held", kv.held), ("cached", kv.cached), ("free", free)] {
            let _ = writeln!(out, "{name}{{state=\"{state}\"}} {n}");
        }
        counter(
            &mut out,
            "tandem_prefix_cache_query_tokens_total",
            "Prompt tokens looked up in the KV cache.",
            kv.prefix_queries,
        );
        counter(
            &mut out,
            "tandem_prefix_cache_hit_tokens_total",
            "Prompt tokens found in the KV cache (not computed again); the hit rate is this over the queries.",
            kv.prefix_hits,
        );
        render_fairness(&mut out, gauges);
        {
            let map = self.client_latency.lock().unwrap_or_else(|e| e.into_inner());
            let name = "tandem_client_request_latency_seconds";
            let _ = writeln!(out, "# HELP {name} Request latency per client.\n# TYPE {name} histogram");
            for (client, h) in map.iter() {
                h.render_series(name, &format!("client=\"{}\"", escape(client)), &mut out);
            }
        }
        render_step_kinds(&mut out, &gauges.spec.steps);
        if let Some(name) = &gauges.spec.drafter {
            let s = &gauges.spec;
            let _ = writeln!(
                out,
                "# HELP tandem_spec_drafter_info The drafter speculative decoding uses.\n# TYPE tandem_spec_drafter_info gauge\ntandem_spec_drafter_info{{drafter=\"{name}\"}} 1"
            );
            counter(&mut out, "tandem_spec_draft_tokens_total", "Draft tokens verified.", s.drafted_tokens);
            counter(&mut out, "tandem_spec_accepted_tokens_total", "Draft tokens accepted.", s.accepted_tokens);
            counter(
                &mut out,
                "tandem_spec_lookup_draft_tokens_total",
                "Of the draft tokens, those copied by prompt lookup (--spec-lookup).",
                s.lookup_drafted_tokens,
            );
            counter(
                &mut out,
                "tandem_spec_lookup_accepted_tokens_total",
                "Of the accepted tokens, those copied by prompt lookup.",
                s.lookup_accepted_tokens,
            );
            counter(
                &mut out,
                "tandem_spec_alternatives_total",
                "Runners-up of first draft tokens verified beside the drafts (--spec-alternatives).",
                s.alternatives_drafted,
            );
            counter(
                &mut out,
                "tandem_spec_alternatives_accepted_total",
                "Verification steps where a runner-up, not the draft's first token, was the target's.",
                s.alternatives_accepted,
            );
            counter(
                &mut out,
                "tandem_spec_decode_steps_total",
                "Per-sequence target forwards while speculating.",
                s.decode_steps,
            );
            counter(&mut out, "tandem_spec_emitted_tokens_total", "Tokens those forwards emitted.", s.emitted_tokens);
            let _ = writeln!(
                out,
                "# HELP tandem_spec_acceptance_length Tokens emitted per sequence per target forward.\n# TYPE tandem_spec_acceptance_length gauge\ntandem_spec_acceptance_length {}",
                s.acceptance_length()
            );
            let _ = writeln!(
                out,
                "# HELP tandem_spec_seconds_total Engine time spent drafting and verifying.\n# TYPE tandem_spec_seconds_total counter\ntandem_spec_seconds_total{{phase=\"draft\"}} {}\ntandem_spec_seconds_total{{phase=\"verify\"}} {}",
                s.draft_secs, s.verify_secs
            );
        }
        if let Some(o) = &gauges.online {
            render_online(&mut out, o);
        }
        self.time_to_first_token.render(
            "tandem_time_to_first_token_seconds",
            "Time from request to first token.",
            &mut out,
        );
        self.inter_token_latency.render(
            "tandem_inter_token_latency_seconds",
            "Time between streamed tokens.",
            &mut out,
        );
        out
    }
}

/// Engine steps and their seconds by kind (prefill, plain decode, copied drafts, the drafter's
/// drafts): what share of the engine's time prompts take, and what a decode step of each kind costs.
fn render_step_kinds(out: &mut String, kinds: &tandem_engine::StepKinds) {
    type Field = fn(&tandem_engine::StepTally) -> f64;
    let series: [(&str, &str, Field); 6] = [
        ("tandem_engine_steps_total", "Engine steps by kind.", |t| t.steps as f64),
        ("tandem_engine_step_seconds_total", "Engine step wall time by kind.", |t| t.secs),
        ("tandem_engine_step_drafting_seconds_total", "Of the step time, scheduling and drafting.", |t| {
            t.drafting_secs
        }),
        ("tandem_engine_step_forward_seconds_total", "Of the step time, the target model's forward.", |t| {
            t.forward_secs
        }),
        ("tandem_engine_step_rows_total", "Tokens fed to the model by kind of step.", |t| t.rows as f64),
        ("tandem_engine_step_emitted_tokens_total", "Tokens emitted by kind of step.", |t| t.emitted as f64),
    ];
    for (name, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (kind, t) in kinds.named() {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {}", field(&t));
        }
    }
}

/// Label values are client names from requests: escape what the exposition format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn render_online(out: &mut String, o: &tandem_engine::online::OnlineHooks) {
    use std::sync::atomic::Ordering::Relaxed;
    let ex = &o.exchange;
    let mut metric = |name: &str, kind: &str, help: &str, v: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    metric(
        "tandem_drafter_version",
        "gauge",
        "Drafter version being served.",
        ex.weights.serving_version.load(Relaxed).to_string(),
    );
    metric(
        "tandem_drafter_published_version",
        "gauge",
        "Newest version the trainer published.",
        ex.weights.published.load(Relaxed).to_string(),
    );
    metric(
        "tandem_drafter_rollbacks_total",
        "counter",
        "Versions rolled back for lowering acceptance.",
        ex.weights.rollbacks.load(Relaxed).to_string(),
    );
    metric(
        "tandem_drafter_train_loss",
        "gauge",
        "Loss of the trainer's last step.",
        ex.metrics.train_loss.get().to_string(),
    );
    metric(
        "tandem_drafter_train_steps_total",
        "counter",
        "Trainer optimizer steps.",
        ex.metrics.train_steps.load(Relaxed).to_string(),
    );
    metric(
        "tandem_drafter_train_positions_total",
        "counter",
        "Positions trained on.",
        ex.metrics.train_positions.load(Relaxed).to_string(),
    );
    metric(
        "tandem_spec_chosen_k",
        "gauge",
        "Draft length chosen by measured throughput (0: speculation off).",
        ex.metrics.chosen_k.load(Relaxed).to_string(),
    );
    metric(
        "tandem_spec_chosen_alternatives",
        "gauge",
        "Draft tree siblings per draft chosen by measured throughput (the node budget beyond the chain).",
        ex.metrics.chosen_alternatives.load(Relaxed).to_string(),
    );
    metric(
        "tandem_spec_gain",
        "gauge",
        "Measured decode tokens/s at the chosen draft length over no speculation.",
        ex.metrics.speedup().to_string(),
    );
    metric(
        "tandem_drafter_train_cpu_share",
        "gauge",
        "Share of serving time a saturated server lends the drafter trainer now, in turns between steps: 0 unless serving is saturated (the trainer then uses idle time only), more while it is still learning.",
        ex.metrics.train_share.get().to_string(),
    );
    metric(
        "tandem_drafter_train_turns_total",
        "counter",
        "Turns of every core a saturated server lent the drafter trainer (serving paused between steps).",
        ex.turns.lent.load(Relaxed).to_string(),
    );
    metric(
        "tandem_drafter_train_turn_seconds_total",
        "counter",
        "Seconds serving paused for the drafter trainer's turns.",
        ex.turns.lent_secs.get().to_string(),
    );
    metric(
        "tandem_drafter_fresh_agreement",
        "gauge",
        "Drafter's first-token agreement with the target on traffic it had not trained on (smoothed).",
        ex.metrics.fresh_agreement.get().to_string(),
    );
    metric("tandem_traces_total", "counter", "Traces recorded for the trainer.", o.traces.pushed().to_string());
    metric(
        "tandem_traces_dropped_total",
        "counter",
        "Traces dropped (buffer full or busy).",
        o.traces.dropped().to_string(),
    );
    let table = ex.metrics.k_table.lock().unwrap_or_else(|e| e.into_inner()).clone();
    type Field = fn(&tandem_engine::online::KStat) -> f64;
    let gauges: [(&str, &str, Field); 3] = [
        ("tandem_spec_k_tokens_per_second", "Measured decode tokens/s per draft length.", |s| s.tokens_per_sec),
        ("tandem_spec_k_tokens_per_step", "Tokens emitted per decode step, per draft length.", |s| s.tokens_per_step),
        ("tandem_spec_k_step_seconds", "Seconds per decode step, per draft length.", |s| s.step_secs),
    ];
    for (name, help, field) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &table {
            let _ = writeln!(out, "{name}{{k=\"{}\"}} {}", s.k, field(s));
        }
    }
}

fn render_fairness(out: &mut String, g: &EngineGauges) {
    let _ = writeln!(
        out,
        "# HELP tandem_scheduler_info The scheduling policy.\n# TYPE tandem_scheduler_info gauge\ntandem_scheduler_info{{policy=\"{}\"}} 1",
        g.policy
    );
    let _ = writeln!(
        out,
        "# HELP tandem_preemptions_total Running requests preempted for fairness.\n# TYPE tandem_preemptions_total counter\ntandem_preemptions_total {}",
        g.preemptions
    );
    let _ = writeln!(
        out,
        "# HELP tandem_client_service_tokens_total Tokens served per client (or client/agent): prompt (input), output, and through a training forward_backward (train).\n# TYPE tandem_client_service_tokens_total counter"
    );
    for s in &g.service {
        let e = escape(&s.entity);
        for (kind, n) in [("input", s.input_tokens), ("output", s.output_tokens), ("train", s.train_tokens)] {
            let _ = writeln!(out, "tandem_client_service_tokens_total{{client=\"{e}\",kind=\"{kind}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP tandem_client_virtual_counter The fair policy's virtual token counter (weighted service / weight).\n# TYPE tandem_client_virtual_counter gauge"
    );
    for s in &g.service {
        let _ = writeln!(out, "tandem_client_virtual_counter{{client=\"{}\"}} {}", escape(&s.entity), s.counter);
    }
    let _ = writeln!(out, "# HELP tandem_client_waiting_requests Requests waiting per client.\n# TYPE tandem_client_waiting_requests gauge");
    for (c, n) in &g.waiting_by_client {
        let _ = writeln!(out, "tandem_client_waiting_requests{{client=\"{}\"}} {n}", escape(c));
    }
}

/// Families that belong to the server, not to a model: they keep no `model` label.
const SERVER_WIDE: &[&str] = &["tandem_requests_total"];

/// Several models' expositions as one: each family's HELP and TYPE once, then every model's
/// samples with `model="NAME"` first among their labels (the exposition format wants a family's
/// samples together). Server-wide families come from the first model alone.
pub fn merge_models(parts: &[(String, String)]) -> String {
    // (family name, header lines, sample lines), in order of first appearance.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (index, (model, text)) in parts.iter().enumerate() {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let name = rest.split_whitespace().next().unwrap_or_default().to_string();
                let at = match families.iter().position(|f| f.0 == name) {
                    Some(i) => i,
                    None => {
                        families.push((name, Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if !families[at].1.iter().any(|h| h == line) {
                    families[at].1.push(line.to_string());
                }
                current = Some(at);
                continue;
            }
            let Some(at) = current else { continue };
            if SERVER_WIDE.contains(&families[at].0.as_str()) {
                if index == 0 {
                    families[at].2.push(line.to_string());
                }
                continue;
            }
            families[at].2.push(with_model_label(line, model));
        }
    }
    let mut out = String::new();
    for (_, headers, samples) in families {
        for l in headers.iter().chain(&samples) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// `name{a="b"} 1` -> `name{model="M",a="b"} 1`; `name 1` -> `name{model="M"} 1`.
fn with_model_label(sample: &str, model: &str) -> String {
    let label = format!("model=\"{}\"", escape(model));
    match (sample.find('{'), sample.find(' ')) {
        (Some(b), Some(sp)) if b < sp => format!("{}{{{label},{}", &sample[..b], &sample[b + 1..]),
        (_, Some(sp)) => format!("{}{{{label}}}{}", &sample[..sp], &sample[sp..]),
        _ => sample.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_merge_into_one_exposition_with_a_model_label() {
        let a = "# HELP tandem_requests_total R.\n# TYPE tandem_requests_total counter\ntandem_requests_total{endpoint=\"/x\",status=\"200\"} 3\n# HELP q Q.\n# TYPE q gauge\nq 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 2\nh_sum 0.5\n";
        let b = "# HELP tandem_requests_total R.\n# TYPE tandem_requests_total counter\n# HELP q Q.\n# TYPE q gauge\nq 7\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"0.1\"} 0\nh_sum 0\n";
        let merged = merge_models(&[("small".into(), a.into()), ("big \"x\"".into(), b.into())]);
        let want = "# HELP tandem_requests_total R.\n# TYPE tandem_requests_total counter\ntandem_requests_total{endpoint=\"/x\",status=\"200\"} 3\n# HELP q Q.\n# TYPE q gauge\nq{model=\"small\"} 1\nq{model=\"big \\\"x\\\"\"} 7\n# HELP h H.\n# TYPE h histogram\nh_bucket{model=\"small\",le=\"0.1\"} 2\nh_sum{model=\"small\"} 0.5\nh_bucket{model=\"big \\\"x\\\"\",le=\"0.1\"} 0\nh_sum{model=\"big \\\"x\\\"\"} 0\n";
        assert_eq!(merged, want);
    }
}
