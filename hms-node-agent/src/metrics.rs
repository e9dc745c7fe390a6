//! Prometheus metrics on `--metrics` (`/metrics`, Prometheus text format). Counters the data
//! path updates live in [`Metrics`] (label families, cheap atomic increments); values that
//! already exist elsewhere (circuit state, DNS answers, ring-buffer and tap losses, active
//! connections) are read at scrape time by [`StateCollector`] instead of being copied on
//! every event. Never blocks the data path: a scrape only takes short locks.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: String,
    pub destination: String,
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub destination: String,
    /// `sent` (caller to service) or `received`.
    pub direction: String,
}

/// Metrics the data path updates.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<DestinationLabels, Histogram>,
    pub retries: Family<DestinationLabels, Counter>,
    pub rate_limited: Family<DestinationLabels, Counter>,
    pub denied: Family<EdgeLabels, Counter>,
    pub timeouts: Family<DestinationLabels, Counter>,
    pub flows: Family<EdgeLabels, Counter>,
    pub flow_bytes: Family<ByteLabels, Counter>,
    /// Tunnel streams from other hosts refused before policy: `caller-not-placed` (the
    /// peer claimed a service the operator did not place on it), `not-own-instance`.
    pub inbound_refused: Family<ReasonLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hms");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by caller, service and status class",
            requests.clone(),
        );
        let request_duration = Family::<DestinationLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request latency seen by the proxy, request start to end of response",
            request_duration.clone(),
        );
        let retries = Family::<DestinationLabels, Counter>::default();
        registry.register("retries", "Retries the proxy made", retries.clone());
        let rate_limited = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests answered 429 by the mesh's rate limit",
            rate_limited.clone(),
        );
        let denied = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "denied",
            "Requests and connections refused by access policy",
            denied.clone(),
        );
        let timeouts = Family::<DestinationLabels, Counter>::default();
        registry.register(
            "timeouts",
            "Requests answered 504 by a route timeout",
            timeouts.clone(),
        );
        let flows = Family::<EdgeLabels, Counter>::default();
        registry.register(
            "flows",
            "Redirected TCP connections that closed, from the kernel's flow records",
            flows.clone(),
        );
        let flow_bytes = Family::<ByteLabels, Counter>::default();
        registry.register(
            "flow_bytes",
            "Bytes carried by redirected TCP connections, from the kernel's flow records",
            flow_bytes.clone(),
        );
        let inbound_refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "inbound_refused",
            "Tunnel streams from other hosts refused: a caller not placed on the peer, a port that is not one of this host's instances",
            inbound_refused.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            requests,
            request_duration,
            retries,
            rate_limited,
            denied,
            timeouts,
            flows,
            flow_bytes,
            inbound_refused,
        }
    }

    /// Adds a family a module owns (the gateway's), under the `hms_` prefix.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register_collector(collector);
    }

    /// The exposition text.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }

    pub fn record_request(&self, source: &str, destination: &str, status: u16, started: Instant) {
        self.requests
            .get_or_create(&RequestLabels {
                source: source.into(),
                destination: destination.into(),
                status_class: format!("{}xx", status / 100),
            })
            .inc();
        self.request_duration
            .get_or_create(&DestinationLabels {
                destination: destination.into(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The series [`Metrics::record_request`] would update for one caller and service, looked up
/// once and then kept (series are never removed from their family, so a kept handle counts
/// into the exported series): a connection's caller and service never change, and hashing
/// freshly built labels on every request cost more than the counting.
#[derive(Debug)]
pub struct EdgeSeries {
    source: String,
    destination: String,
    /// By status / 100 (hyper's status codes are 100..=999).
    requests: [OnceLock<Counter>; 10],
    duration: OnceLock<Histogram>,
}

impl EdgeSeries {
    /// Nothing is looked up (or created in a family) before the first request.
    pub fn new(source: &str, destination: &str) -> EdgeSeries {
        EdgeSeries {
            source: source.to_owned(),
            destination: destination.to_owned(),
            requests: Default::default(),
            duration: OnceLock::new(),
        }
    }

    /// The same update as [`Metrics::record_request`]; a series appears in the family on its
    /// first request, as it does there.
    pub fn record(&self, metrics: &Metrics, status: u16, started: Instant) {
        let class = usize::from(status / 100);
        let Some(cell) = self.requests.get(class) else {
            return metrics.record_request(&self.source, &self.destination, status, started);
        };
        cell.get_or_init(|| {
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    source: self.source.clone(),
                    destination: self.destination.clone(),
                    status_class: format!("{class}xx"),
                })
                .clone()
        })
        .inc();
        self.duration
            .get_or_init(|| {
                metrics
                    .request_duration
                    .get_or_create(&DestinationLabels {
                        destination: self.destination.clone(),
                    })
                    .clone()
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A value read at scrape time.
pub type Reading = Box<dyn Fn() -> u64 + Send + Sync>;

/// One value read at scrape time; readings sharing a name form one metric family.
pub struct ReadingSpec {
    /// Full metric name (`hms_...`).
    pub name: String,
    pub help: String,
    pub counter: bool,
    pub labels: Vec<(String, String)>,
    pub read: Reading,
}

/// A family whose series are computed at scrape time.
pub struct SeriesSpec {
    pub name: String,
    pub help: String,
    pub counter: bool,
    pub read: Box<SeriesFn>,
}

/// Metrics whose values live elsewhere, read on each scrape.
pub struct StateCollector {
    pub readings: Vec<ReadingSpec>,
    pub series: Vec<SeriesSpec>,
}

pub type SeriesFn = dyn Fn() -> Vec<(Vec<(String, String)>, i64)> + Send + Sync;

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Readings of one name are grouped under one descriptor.
        let kind = |counter: bool| {
            if counter {
                ConstCounter::new(0u64).metric_type()
            } else {
                ConstGauge::new(0i64).metric_type()
            }
        };
        let mut names: Vec<&String> = self.readings.iter().map(|r| &r.name).collect();
        names.dedup();
        for name in names {
            let group: Vec<&ReadingSpec> =
                self.readings.iter().filter(|r| &r.name == name).collect();
            let first = group[0];
            let mut metric =
                encoder.encode_descriptor(name, &first.help, None, kind(first.counter))?;
            for r in group {
                let enc = metric.encode_family(&r.labels)?;
                if r.counter {
                    ConstCounter::new((r.read)()).encode(enc)?;
                } else {
                    ConstGauge::new((r.read)() as i64).encode(enc)?;
                }
            }
        }
        for s in &self.series {
            let mut metric = encoder.encode_descriptor(&s.name, &s.help, None, kind(s.counter))?;
            for (labels, value) in (s.read)() {
                let enc = metric.encode_family(&labels)?;
                if s.counter {
                    ConstCounter::new(value.max(0) as u64).encode(enc)?;
                } else {
                    ConstGauge::new(value).encode(enc)?;
                }
            }
        }
        Ok(())
    }
}

/// A scraper must send its request within this time of connecting.
pub const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until drained. One request per connection (no
/// keep-alive: an idle scraper connection holds nothing), its head within
/// [`METRICS_HEADER_TIMEOUT`], at most `cap` connections (the oldest idle one is shed).
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    drain: crate::drain::Drain,
    cap: Arc<crate::limits::ConnCap>,
) -> anyhow::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = drain.signaled() => return Ok(()),
        };
        let Some(slot) = cap.admit() else {
            tracing::warn!("metrics connection cap reached with none idle; closing");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let idle = slot.idle_flag();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    idle.set(false);
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            match metrics.render() {
                                Ok(text) => hyper::Response::builder()
                                    .header(
                                        hyper::header::CONTENT_TYPE,
                                        "text/plain; version=0.0.4; charset=utf-8",
                                    )
                                    .body(http_body_util::Full::new(bytes::Bytes::from(text))),
                                Err(_) => hyper::Response::builder().status(500).body(
                                    http_body_util::Full::new(bytes::Bytes::from_static(
                                        b"encoding metrics failed\n",
                                    )),
                                ),
                            }
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                    b"metrics are at /metrics\n",
                                )))
                        };
                        Ok::<_, hyper::http::Error>(resp.unwrap_or_default())
                    }
                });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = served => {}
                _ = slot.shed() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_edge_series_count_like_record_request() {
        let by_labels = Metrics::new();
        let kept = Metrics::new();
        let edge = EdgeSeries::new("host", "svc");
        let t = Instant::now();
        for status in [200, 204, 503, 200, 101, 999] {
            by_labels.record_request("host", "svc", status, t);
            edge.record(&kept, status, t);
        }
        let counts = |m: &Metrics| {
            m.render()
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("hms_requests_total") || l.contains("_count"))
                .map(str::to_owned)
                .collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(counts(&kept), counts(&by_labels));
        assert!(
            counts(&kept)
                .iter()
                .any(|l| l.contains("2xx") && l.ends_with(" 3"))
        );
    }
}
