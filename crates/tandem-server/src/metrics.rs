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
        for (b, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(),
            inter_token_latency: Histogram::new(),
        }
    }
}

/// Engine state sampled when metrics are scraped.
pub struct EngineGauges {
    pub waiting: usize,
    pub running: usize,
    pub kv_bytes_used: usize,
    pub kv_bytes_total: usize,
    pub spec: tandem_engine::SpecStats,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((endpoint.to_string(), status)).or_default() += 1;
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
        gauge(&mut out, "tandem_kv_cache_used_bytes", "KV cache bytes held by running requests.", gauges.kv_bytes_used);
        gauge(&mut out, "tandem_kv_cache_total_bytes", "KV cache bytes allocated.", gauges.kv_bytes_total);
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
