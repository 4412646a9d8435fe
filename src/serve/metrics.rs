//! Prometheus text metrics of the server (`GET /metrics`): requests by route and status, queue
//! depth, requests running, time to first token and inter-token latency, tokens, batch sizes,
//! the image cache.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds (Prometheus' `le` buckets).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket counts (the last one is `+Inf`), the sum and the count.
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, state: Mutex::new((vec![0; bounds.len() + 1], 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0[i] += 1;
        s.1 += v;
        s.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in s.0.iter().enumerate() {
            cumulative += count;
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", s.1, s.2);
    }
}

const LATENCY_BOUNDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Every metric the server keeps; shared by the handlers, the queue and the worker.
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub queue_depth: AtomicU64,
    /// Requests in the batch the worker is running.
    pub running: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Requests per model call.
    pub batch_size: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests whose client went away (or timed out) before the worker reached them.
    pub dropped_before_run: AtomicU64,
    /// Images whose features came from the image cache / were computed (cache.rs).
    pub image_cache_hits: AtomicU64,
    pub image_cache_misses: AtomicU64,
    /// What the image cache holds now.
    pub image_cache_entries: AtomicU64,
    pub image_cache_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(LATENCY_BOUNDS),
            batch_size: Histogram::new(BATCH_BOUNDS),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            dropped_before_run: AtomicU64::new(0),
            image_cache_hits: AtomicU64::new(0),
            image_cache_misses: AtomicU64::new(0),
            image_cache_entries: AtomicU64::new(0),
            image_cache_bytes: AtomicU64::new(0),
        }
    }
}

/// The route label of a request path: the served routes by name, anything else `other` (so a
/// scan of random paths cannot grow the label set).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/embeddings" => "/v1/embeddings",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

impl Metrics {
    pub fn count_request(&self, route: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((route, status)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP glimpse_requests_total HTTP requests answered, by route and status.\n# TYPE glimpse_requests_total counter"
        );
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "glimpse_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let gauges = [
            ("glimpse_queue_depth", "Requests waiting for the worker.", "gauge", &self.queue_depth),
            ("glimpse_requests_running", "Requests in the batch the worker runs.", "gauge", &self.running),
            (
                "glimpse_prompt_tokens_total",
                "Decoder input tokens of generation requests run.",
                "counter",
                &self.prompt_tokens,
            ),
            ("glimpse_generated_tokens_total", "Tokens generated.", "counter", &self.generated_tokens),
            (
                "glimpse_dropped_before_run_total",
                "Requests dropped from the queue because their client went away or timed out.",
                "counter",
                &self.dropped_before_run,
            ),
            (
                "glimpse_image_cache_hits_total",
                "Images whose features the image cache held (the image stage did not run for them).",
                "counter",
                &self.image_cache_hits,
            ),
            (
                "glimpse_image_cache_misses_total",
                "Images whose features were computed while the image cache is on.",
                "counter",
                &self.image_cache_misses,
            ),
            ("glimpse_image_cache_entries", "Images the image cache holds.", "gauge", &self.image_cache_entries),
            (
                "glimpse_image_cache_bytes",
                "Bytes of image features the image cache holds.",
                "gauge",
                &self.image_cache_bytes,
            ),
        ];
        for (name, help, kind, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.time_to_first_token.render(
            &mut out,
            "glimpse_time_to_first_token_seconds",
            "From a request's arrival in the queue to its first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "glimpse_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request.",
        );
        self.batch_size.render(&mut out, "glimpse_batch_size", "Requests run together in one model call.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.7, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 12.7\nx_count 4\n"), "{out}");
    }

    #[test]
    fn requests_are_counted_by_route_and_status() {
        let m = Metrics::default();
        m.count_request(route_label("/v1/models"), 200);
        m.count_request(route_label("/v1/models"), 200);
        m.count_request(route_label("/nope"), 404);
        let text = m.render();
        assert!(text.contains("glimpse_requests_total{route=\"/v1/models\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("glimpse_requests_total{route=\"other\",status=\"404\"} 1\n"), "{text}");
    }
}
