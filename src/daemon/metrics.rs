//! The daemon's Prometheus metrics, and the small HTTP/1.1 responder that serves them at
//! `GET /metrics` (`--metrics-listen ADDR`; 404 elsewhere) on the daemon's tokio runtime.
//!
//! Two kinds of series, all prefixed `narflow_`:
//! - events, counted as they happen: failed attempts by kind and retry class, the
//!   hand-off→published latency, compressed bytes uploaded, pipeline stage busy time, and
//!   paths the store watcher queued;
//! - snapshots, read at each scrape: queue depth by state (from the queue), paths and NAR
//!   bytes uploaded (the counters `narflow status` shows as `since_start`), and requests
//!   and retries by operation and the bytes resumed uploads did not send again (from the
//!   cache; none for a local directory).
//!
//! A scrape never waits for an upload: the queue is read on tokio's blocking pool, and
//! nothing here touches the pipeline. The responder reads one request and closes the
//! connection; it is for a scraper on loopback, not a general web server.
use super::Shared;
use super::queue::{Outcomes, RetryClass};
use crate::cache::BinaryCache;
use crate::pipeline::stats::StageStats;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The prefix of every series.
const PREFIX: &str = "narflow";
/// The content type of the OpenMetrics text format, which Prometheus scrapes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Hand-off→published latency buckets (seconds): a tiny path on an idle daemon is
/// published in tens of milliseconds; a path waiting behind a large batch or a retry
/// takes minutes to hours.
const LATENCY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14400.0,
];
/// Scrapes served at once: one or two scrapers are usual; the cap bounds the tasks and
/// buffers a flood of connections can make. Past it a connection is closed at once.
const MAX_CONNECTIONS: usize = 8;
/// The longest request head read: a scraper's GET is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8192;
/// How long a client may take to send its request, and to take the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// The metrics counted as things happen.
#[derive(Debug)]
pub(super) struct Metrics {
    registry: Registry,
    failures: Family<Labels<2>, Counter>,
    latency: Histogram,
    file_bytes: Counter,
    stage_busy: Family<Labels<1>, Counter<f64, AtomicU64>>,
    stage_threads: Family<Labels<1>, Gauge>,
    watched: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let failures = Family::<Labels<2>, Counter>::default();
        registry.register(
            "path_failures",
            "Failed upload attempts of queued paths, by failure kind and whether retrying can help",
            failures.clone(),
        );
        let latency = Histogram::new(LATENCY_BUCKETS);
        registry.register(
            "handoff_to_published_seconds",
            "Seconds from a path's hand-off (its queueing) until its narinfo is in the cache (found there counts)",
            latency.clone(),
        );
        let file_bytes = Counter::default();
        registry.register(
            "uploaded_file_bytes",
            "Compressed NAR bytes (FileSize) of the paths uploaded since the daemon started",
            file_bytes.clone(),
        );
        let stage_busy = Family::<Labels<1>, Counter<f64, AtomicU64>>::default();
        registry.register(
            "stage_busy_seconds",
            "Seconds the pipeline stage's threads worked (not waited), summed over its threads; utilisation is rate(busy) / threads",
            stage_busy.clone(),
        );
        let stage_threads = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "stage_threads",
            "Threads of the pipeline stage in the last upload",
            stage_threads.clone(),
        );
        let watched = Counter::default();
        registry.register(
            "watched_paths",
            "Paths the store watcher (--watch-store) queued since the daemon started (not those a hand-off had queued already)",
            watched.clone(),
        );
        Metrics {
            registry,
            watched,
            failures,
            latency,
            file_bytes,
            stage_busy,
            stage_threads,
        }
    }
}

impl Metrics {
    /// Counts the failed attempts an upload attempt decided on.
    pub(super) fn failed(&self, out: &Outcomes) {
        let failed = (out.retry.iter().map(|f| (f, RetryClass::Transient)))
            .chain(out.attention.iter().map(|f| (f, RetryClass::Permanent)))
            .chain(out.cache_refused.iter().map(|f| (f, RetryClass::Permanent)));
        for ((_, f), retry) in failed {
            self.failures
                .get_or_create(&[("kind", f.kind), ("retry", retry.as_str())])
                .inc();
        }
    }

    /// Records that a path handed off at `queued_ms` is published at `now_ms` (Unix ms).
    pub(super) fn published(&self, queued_ms: i64, now_ms: i64) {
        self.latency
            .observe((now_ms - queued_ms).max(0) as f64 / 1000.0);
    }

    /// Counts paths the store watcher queued.
    pub(super) fn watched(&self, paths: u64) {
        self.watched.inc_by(paths);
    }

    /// Paths the store watcher queued since the daemon started.
    pub(super) fn watched_total(&self) -> u64 {
        self.watched.get()
    }

    /// Adds one pipeline run's compressed bytes and its stages' busy time.
    pub(super) fn ran(&self, file_bytes: u64, stages: &[StageStats]) {
        self.file_bytes.inc_by(file_bytes);
        for s in stages {
            let stage = [("stage", s.name)];
            self.stage_busy
                .get_or_create(&stage)
                .inc_by(s.busy.as_secs_f64());
            self.stage_threads
                .get_or_create(&stage)
                .set(s.threads as i64);
        }
    }
}

/// The snapshot series, read at a scrape.
#[derive(Debug, Default)]
struct Snapshot {
    queue: Option<super::queue::Counts>,
    in_flight: u64,
    uploaded: u64,
    nar_bytes: u64,
    resumed_bytes: u64,
    requests: Vec<crate::cache::RequestCount>,
}

/// The text of one scrape.
fn render(metrics: &Metrics, s: &Snapshot) -> String {
    let mut r = Registry::with_prefix(PREFIX);
    let queue = Family::<Labels<1>, Gauge>::default();
    r.register(
        "queue_paths",
        "Paths in the queue by state, as narflow status counts them: failing and needs_attention are among pending, in_flight are the pending paths being uploaded, done and dropped are those of the last 7 days",
        queue.clone(),
    );
    if let Some(c) = &s.queue {
        for (state, n) in [
            ("pending", c.pending),
            ("in_flight", s.in_flight),
            ("failing", c.failing),
            ("needs_attention", c.needs_attention),
            ("done", c.done),
            ("dropped", c.dropped),
        ] {
            queue.get_or_create(&[("state", state)]).set(n as i64);
        }
    }
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        r.register(name, help, c);
    };
    counter(
        &mut r,
        "uploaded_paths",
        "Paths uploaded since the daemon started (their closures included)",
        s.uploaded,
    );
    counter(
        &mut r,
        "uploaded_nar_bytes",
        "NAR bytes uploaded since the daemon started",
        s.nar_bytes,
    );
    counter(
        &mut r,
        "resumed_bytes",
        "Compressed bytes of multipart uploads not sent again since the daemon started: parts an upload begun before a restart had sent, which the server still had",
        s.resumed_bytes,
    );
    let requests = Family::<Labels<1>, Counter>::default();
    let retries = Family::<Labels<1>, Counter>::default();
    r.register(
        "cache_requests",
        "Requests sent to the cache, by operation, retries included (none for a local directory)",
        requests.clone(),
    );
    r.register(
        "cache_request_retries",
        "Retries of cache requests that had failed transiently, by operation",
        retries.clone(),
    );
    for c in &s.requests {
        let op = [("operation", c.operation)];
        requests.get_or_create(&op).inc_by(c.requests);
        retries.get_or_create(&op).inc_by(c.retries);
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode_registry(&mut text, &metrics.registry);
    let _ = encode_registry(&mut text, &r);
    let _ = encode_eof(&mut text);
    text
}

/// Why the metrics address cannot be served.
#[derive(Debug, thiserror::Error)]
#[error("metrics address {addr} (--metrics-listen): {source}")]
pub struct MetricsBindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics address (before the daemon starts, so a taken address is a startup
/// error).
///
/// # Errors
/// [`MetricsBindError`] naming the address.
pub(super) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsBindError> {
    let err = |source| MetricsBindError { addr, source };
    let l = std::net::TcpListener::bind(addr).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Serves scrapes on `listener` until `stop` changes.
pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let handle = move |stream| {
        let shared = shared.clone();
        async move {
            let _ = tokio::time::timeout(IO_TIMEOUT, handle(stream, shared)).await;
        }
    };
    // Past the limit a scraper's connection is closed unanswered.
    let busy = drop::<TcpStream>;
    super::accept::serve("metrics", listener, MAX_CONNECTIONS, stop, handle, busy).await;
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a request head, or `None` while it is incomplete.
fn route(head: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Route::BadRequest),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            Some(match (req.method, path) {
                (_, p) if p != "/metrics" => Route::NotFound,
                (Some("GET"), _) => Route::Metrics,
                _ => Route::MethodNotAllowed,
            })
        }
    }
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut head = Vec::with_capacity(1024);
    let route = loop {
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if let Some(r) = route(&head) {
            break r;
        }
        if head.len() > MAX_REQUEST_HEAD {
            break Route::BadRequest;
        }
    };
    let (status, body) = match route {
        Route::Metrics => {
            // The cache is upgraded on the blocking thread, where dropping it (and its
            // runtime) is allowed should the worker have let go of it meanwhile.
            let scraped = tokio::task::spawn_blocking(move || {
                let cache = shared.cache.upgrade();
                let gone = crate::cache::null::NullCache::new();
                scrape(&shared, cache.as_deref().unwrap_or(&gone))
            });
            match scraped.await {
                Ok(text) => ("200 OK", text),
                Err(e) => ("500 Internal Server Error", format!("{e}\n")),
            }
        }
        Route::NotFound => ("404 Not Found", "only /metrics is served here\n".to_owned()),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "GET /metrics\n".to_owned()),
        Route::BadRequest => ("400 Bad Request", "not an HTTP/1 request\n".to_owned()),
    };
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads the snapshot and renders everything (on the blocking pool: it locks the queue).
fn scrape(shared: &Shared, cache: &dyn BinaryCache) -> String {
    let queue = match shared.lock_queue().counts() {
        Ok(c) => Some(c),
        Err(e) => {
            // The scrape goes on without queue depth; the error is in the daemon's log.
            tracing::warn!("metrics: {e}");
            None
        }
    };
    let s = Snapshot {
        queue,
        in_flight: shared.in_flight.load(Ordering::SeqCst) as u64,
        uploaded: shared.stats.uploaded.load(Ordering::Relaxed),
        nar_bytes: shared.stats.nar_bytes.load(Ordering::Relaxed),
        resumed_bytes: cache.resumed_bytes(),
        requests: cache.request_counts(),
    };
    render(&shared.metrics, &s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::queue::{Due, Failed};

    /// The value of the sample `name` (with its labels, as written) in `text`.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_is_named_narflow_and_counts_what_happened() {
        let m = Metrics::default();
        let due = |p: &str| Due {
            path: p.into(),
            generation: 1,
            queued: 0,
        };
        let failed = |kind, message: &str| Failed {
            kind,
            message: message.into(),
        };
        m.failed(&Outcomes {
            retry: vec![
                (due("a"), failed("cache", "HTTP 503")),
                (due("b"), failed("cache", "HTTP 503")),
            ],
            attention: vec![(due("c"), failed("corrupt", "NarHash mismatch"))],
            ..Outcomes::default()
        });
        m.published(1000, 1020);
        m.watched(2);
        m.watched(1);
        m.published(1000, 3000);
        m.ran(
            10,
            &[StageStats {
                name: "walk",
                threads: 2,
                busy: Duration::from_millis(1500),
                ..Default::default()
            }],
        );
        let s = Snapshot {
            queue: Some(super::super::queue::Counts {
                pending: 4,
                failing: 3,
                needs_attention: 1,
                done: 9,
                dropped: 0,
            }),
            in_flight: 2,
            uploaded: 9,
            nar_bytes: 900,
            resumed_bytes: 700,
            requests: vec![crate::cache::RequestCount {
                operation: "PutObject",
                requests: 12,
                retries: 2,
            }],
        };
        let text = render(&m, &s);
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("narflow_"), "{l}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        let v = |n| sample(&text, n).unwrap_or_else(|| panic!("{n} in\n{text}"));
        assert_eq!(
            v(r#"narflow_path_failures_total{kind="cache",retry="transient"}"#),
            2.0
        );
        assert_eq!(
            v(r#"narflow_path_failures_total{kind="corrupt",retry="permanent"}"#),
            1.0
        );
        assert_eq!(v("narflow_handoff_to_published_seconds_count"), 2.0);
        assert_eq!(
            v(r#"narflow_handoff_to_published_seconds_bucket{le="0.025"}"#),
            1.0
        );
        assert_eq!(v("narflow_handoff_to_published_seconds_sum"), 2.02);
        assert_eq!(v(r#"narflow_stage_busy_seconds_total{stage="walk"}"#), 1.5);
        assert_eq!(v(r#"narflow_stage_threads{stage="walk"}"#), 2.0);
        assert_eq!(v("narflow_uploaded_file_bytes_total"), 10.0);
        assert_eq!(v("narflow_watched_paths_total"), 3.0);
        assert_eq!(v("narflow_uploaded_paths_total"), 9.0);
        assert_eq!(v("narflow_uploaded_nar_bytes_total"), 900.0);
        assert_eq!(v("narflow_resumed_bytes_total"), 700.0);
        assert_eq!(v(r#"narflow_queue_paths{state="pending"}"#), 4.0);
        assert_eq!(v(r#"narflow_queue_paths{state="in_flight"}"#), 2.0);
        assert_eq!(v(r#"narflow_queue_paths{state="needs_attention"}"#), 1.0);
        assert_eq!(
            v(r#"narflow_cache_requests_total{operation="PutObject"}"#),
            12.0
        );
        assert_eq!(
            v(r#"narflow_cache_request_retries_total{operation="PutObject"}"#),
            2.0
        );
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics)
        );
        assert_eq!(
            route(b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n"),
            Some(Route::Metrics)
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(
            route(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Some(Route::NotFound)
        );
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::MethodNotAllowed)
        );
        assert_eq!(route(b"\x00\x01 nonsense\r\n\r\n"), Some(Route::BadRequest));
    }

    #[test]
    fn a_taken_address_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = bind(addr).unwrap_err().to_string();
        assert!(e.contains(&format!("metrics address {addr}")), "{e}");
        assert!(e.contains("--metrics-listen"), "{e}");
    }
}
