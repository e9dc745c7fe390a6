//! The tap hub: where every flow the mesh sees is published (HTTP requests from the proxy,
//! TCP connections from the kernel's ring buffer) and read by `hms-ctl tap`. It keeps a
//! bounded ring of recent events per service (for `--last N`) and feeds live subscribers
//! through bounded channels. Publishing never waits: a subscriber that does not keep up
//! loses events and is told how many; a full ring drops its oldest event.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hms_ctl::api::{TapEvent, TapFilter, TapKind};
use tokio::sync::mpsc;

/// Recent events kept per service.
pub const RING_PER_SERVICE: usize = 1000;
/// Events buffered for one live subscriber before it starts losing them.
pub const SUBSCRIBER_BUFFER: usize = 1024;

/// Request headers whose values never appear in a tap.
pub const REDACTED_HEADERS: [&str; 4] = [
    "authorization",
    "cookie",
    "set-cookie",
    "proxy-authorization",
];

struct Subscriber {
    filter: TapFilter,
    tx: mpsc::Sender<Arc<TapEvent>>,
    lost: Arc<AtomicU64>,
}

/// Connections (by client address) that carried HTTP, remembered until the kernel's close
/// record for them arrives; bounded in case close records are lost.
const MAX_HTTP_FLOWS: usize = 65536;

/// An event as the hub keeps it. HTTP exchanges stay in the compact form the proxy captured
/// them in and become a [`TapEvent`] only when a tap reads them: most are never read, and the
/// proxy publishes one per request.
enum Recorded {
    Http(HttpTap),
    Event(TapEvent),
}

impl Recorded {
    fn to_event(&self) -> TapEvent {
        match self {
            Recorded::Http(h) => h.to_event(),
            Recorded::Event(e) => e.clone(),
        }
    }

    fn parties(&self) -> (&str, &str) {
        match self {
            Recorded::Http(h) => (&h.caller, &h.callee),
            Recorded::Event(e) => (&e.caller, &e.callee),
        }
    }
}

/// One HTTP exchange as the proxy records it.
pub struct HttpTap {
    pub time_unix_ms: u64,
    pub caller: Arc<str>,
    pub caller_process: Arc<str>,
    pub callee: Arc<str>,
    pub method: hyper::Method,
    pub authority: Option<Box<str>>,
    pub path: Box<str>,
    pub status: u16,
    pub latency_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub retries: u32,
    pub upstream: Option<SocketAddrV4>,
    /// An external service's outside system (`https://host:port`): shown as the upstream.
    pub external: Option<Arc<str>>,
    pub trace_id: Box<str>,
    pub mesh_error: Option<&'static str>,
    pub headers: TapHeaders,
    /// Gateway requests: the outside client and the door's subject.
    pub client: Option<std::net::SocketAddr>,
    pub subject: Option<Arc<str>>,
}

impl HttpTap {
    pub fn to_event(&self) -> TapEvent {
        TapEvent {
            time_unix_ms: self.time_unix_ms,
            kind: TapKind::Http,
            caller: self.caller.to_string(),
            caller_process: self.caller_process.to_string(),
            callee: self.callee.to_string(),
            method: Some(self.method.as_str().to_owned()),
            authority: self.authority.as_deref().map(str::to_owned),
            path: Some(self.path.to_string()),
            status: Some(self.status),
            latency_ms: self.latency_ms,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            retries: self.retries,
            upstream: match &self.external {
                Some(name) => Some(name.to_string()),
                None => self.upstream.map(|a| a.to_string()),
            },
            trace_id: Some(self.trace_id.to_string()),
            mesh_error: self.mesh_error.map(str::to_owned),
            headers: self.headers.to_pairs(),
            rtt_us: None,
            retransmits: None,
            connect_ms: None,
            client: self.client.map(|c| c.to_string()),
            subject: self.subject.as_deref().map(str::to_owned),
        }
    }
}

/// Request headers as a tap keeps them: bounded in number and size, sensitive values
/// redacted at capture so they never reach memory a tap reader can see. Packed into one
/// buffer (names and values back to back, with their end offsets) because every request is
/// captured and a string per name and value was most of the proxy's allocations.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TapHeaders {
    text: String,
    /// End offsets in `text`: name, value, name, value...
    ends: Vec<u32>,
}

impl TapHeaders {
    /// Headers past this many are not kept.
    pub const MAX_HEADERS: usize = 32;

    pub fn capture(headers: &hyper::HeaderMap) -> TapHeaders {
        let kept = || headers.iter().take(Self::MAX_HEADERS);
        let size: usize = kept()
            .map(|(k, v)| k.as_str().len() + v.len().min(MAX_HEADER_VALUE) + 3)
            .sum();
        let mut text = String::with_capacity(size);
        let mut ends = Vec::with_capacity(2 * kept().count());
        for (k, v) in kept() {
            text.push_str(k.as_str());
            ends.push(text.len() as u32);
            push_tap_header_value(&mut text, k.as_str(), v.as_bytes());
            ends.push(text.len() as u32);
        }
        TapHeaders { text, ends }
    }

    pub fn to_pairs(&self) -> Vec<(String, String)> {
        let mut start = 0;
        let mut parts = self.ends.iter().map(|&end| {
            let part = &self.text[start..end as usize];
            start = end as usize;
            part.to_owned()
        });
        let mut pairs = Vec::with_capacity(self.ends.len() / 2);
        while let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            pairs.push((name, value));
        }
        pairs
    }
}

#[derive(Default)]
pub struct TapHub {
    recent: Mutex<HashMap<String, VecDeque<Arc<Recorded>>>>,
    http_flows: Mutex<std::collections::HashSet<std::net::SocketAddr>>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Events all subscribers together lost, for metrics.
    pub lost_total: AtomicU64,
    pub published_total: AtomicU64,
}

/// A live subscription; `lost` grows when the hub had to skip this subscriber.
pub struct Subscription {
    pub events: mpsc::Receiver<Arc<TapEvent>>,
    pub lost: Arc<AtomicU64>,
}

impl TapHub {
    pub fn publish(&self, event: TapEvent) {
        self.record(Recorded::Event(event));
    }

    /// Publishes one HTTP exchange; it is turned into a [`TapEvent`] only for the live
    /// subscribers it matches, or when a tap reads the ring.
    pub fn publish_http(&self, event: HttpTap) {
        self.record(Recorded::Http(event));
    }

    fn record(&self, event: Recorded) {
        self.published_total.fetch_add(1, Ordering::Relaxed);
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let mut push = |svc: &str| {
                // Known services find their ring without allocating the key.
                let ring = match recent.get_mut(svc) {
                    Some(ring) => ring,
                    None => recent.entry(svc.to_string()).or_default(),
                };
                if ring.len() == RING_PER_SERVICE {
                    ring.pop_front();
                }
                ring.push_back(event.clone());
            };
            let (caller, callee) = event.parties();
            push(callee);
            if caller != callee {
                push(caller);
            }
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if subs.is_empty() {
            return;
        }
        let event = Arc::new(event.to_event());
        subs.retain(|s| {
            if !s.filter.matches(&event) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
                    self.lost_total.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// The last `n` recorded events matching `filter`, oldest first.
    pub fn recent(&self, filter: &TapFilter, n: usize) -> Vec<Arc<TapEvent>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = recent.get(&filter.service) else {
            return Vec::new();
        };
        let mut out: Vec<Arc<TapEvent>> = ring
            .iter()
            .rev()
            .map(|e| e.to_event())
            .filter(|e| filter.matches(e))
            .take(n)
            .map(Arc::new)
            .collect();
        out.reverse();
        out
    }

    pub fn subscribe(&self, filter: TapFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let lost = Arc::new(AtomicU64::new(0));
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Subscriber {
                filter,
                tx,
                lost: lost.clone(),
            });
        Subscription { events: rx, lost }
    }

    /// The proxy saw HTTP on the connection from `client`.
    pub fn mark_http_flow(&self, client: std::net::SocketAddr) {
        let mut flows = self.http_flows.lock().unwrap_or_else(|p| p.into_inner());
        if flows.len() >= MAX_HTTP_FLOWS {
            flows.clear();
        }
        flows.insert(client);
    }

    /// Whether the connection from `client` carried HTTP; forgets it (its close arrived).
    pub fn take_http_flow(&self, client: std::net::SocketAddr) -> bool {
        self.http_flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Longest header value a tap shows; longer ones are cut and end in `…`.
const MAX_HEADER_VALUE: usize = 256;

/// A header value as a tap may show it.
pub fn tap_header_value(name: &str, value: &[u8]) -> String {
    let mut out = String::new();
    push_tap_header_value(&mut out, name, value);
    out
}

fn push_tap_header_value(out: &mut String, name: &str, value: &[u8]) {
    if REDACTED_HEADERS.contains(&name) {
        out.push_str("[redacted]");
        return;
    }
    out.push_str(&String::from_utf8_lossy(
        &value[..value.len().min(MAX_HEADER_VALUE)],
    ));
    if value.len() > MAX_HEADER_VALUE {
        out.push('…');
    }
}

#[cfg(test)]
mod tests {
    use hms_ctl::api::TapKind;

    use super::*;

    fn event(caller: &str, callee: &str, status: u16, path: &str) -> TapEvent {
        TapEvent {
            time_unix_ms: 0,
            kind: TapKind::Http,
            caller: caller.into(),
            caller_process: "curl[1]".into(),
            callee: callee.into(),
            method: Some("GET".into()),
            authority: None,
            path: Some(path.into()),
            status: Some(status),
            latency_ms: 1.0,
            request_bytes: 0,
            response_bytes: 0,
            retries: 0,
            upstream: None,
            trace_id: None,
            mesh_error: None,
            headers: vec![],
            rtt_us: None,
            retransmits: None,
            connect_ms: None,
            client: None,
            subject: None,
        }
    }

    fn filter(service: &str) -> TapFilter {
        TapFilter {
            service: service.into(),
            ..Default::default()
        }
    }

    #[test]
    fn last_n_returns_the_newest_matching_events_in_order() {
        let hub = TapHub::default();
        for i in 0..20 {
            hub.publish(event("host", "payments-svc", 200, &format!("/{i}")));
        }
        let got = hub.recent(&filter("payments-svc"), 10);
        let paths: Vec<_> = got.iter().map(|e| e.path.clone().unwrap()).collect();
        assert_eq!(paths, (10..20).map(|i| format!("/{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn events_are_filed_under_caller_and_callee_and_filters_apply() {
        let hub = TapHub::default();
        hub.publish(event("payments-svc", "identity-svc", 200, "/verify"));
        hub.publish(event("payments-svc", "eligibility-svc", 503, "/check"));
        hub.publish(event("host", "payments-svc", 200, "/pay"));
        assert_eq!(hub.recent(&filter("identity-svc"), 10).len(), 1);
        assert_eq!(hub.recent(&filter("payments-svc"), 10).len(), 3);
        let mut f = filter("payments-svc");
        f.to = Some("eligibility-svc".into());
        assert_eq!(hub.recent(&f, 10)[0].path.as_deref(), Some("/check"));
        let mut f = filter("payments-svc");
        f.status = Some("5xx".into());
        assert_eq!(hub.recent(&f, 10).len(), 1);
        let mut f = filter("payments-svc");
        f.from = Some("host".into());
        assert_eq!(hub.recent(&f, 10)[0].path.as_deref(), Some("/pay"));
    }

    #[test]
    fn a_slow_subscriber_loses_events_and_is_told_how_many() {
        let hub = TapHub::default();
        let sub = hub.subscribe(filter("a"));
        for _ in 0..(SUBSCRIBER_BUFFER + 500) {
            hub.publish(event("host", "a", 200, "/"));
        }
        assert_eq!(sub.lost.load(Ordering::Relaxed), 500);
        assert_eq!(hub.lost_total.load(Ordering::Relaxed), 500);
        drop(sub);
        hub.publish(event("host", "a", 200, "/"));
        assert_eq!(hub.subscriber_count(), 0, "closed subscribers are dropped");
    }

    #[test]
    fn captured_headers_come_back_as_pairs_with_secrets_redacted() {
        let mut h = hyper::HeaderMap::new();
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.append("x-request-id", "abc".parse().unwrap());
        h.append("x-request-id", "".parse().unwrap());
        h.insert("x-long", "v".repeat(300).parse().unwrap());
        for i in 0..40 {
            h.insert(
                hyper::header::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                "1".parse().unwrap(),
            );
        }
        let pairs = TapHeaders::capture(&h).to_pairs();
        let expected: Vec<(String, String)> = h
            .iter()
            .take(TapHeaders::MAX_HEADERS)
            .map(|(k, v)| (k.to_string(), tap_header_value(k.as_str(), v.as_bytes())))
            .collect();
        assert_eq!(pairs, expected);
        assert_eq!(pairs.len(), TapHeaders::MAX_HEADERS);
        assert!(pairs.contains(&("authorization".into(), "[redacted]".into())));
        assert!(pairs.contains(&("x-request-id".into(), String::new())));
        let long = &pairs.iter().find(|(k, _)| k == "x-long").unwrap().1;
        assert_eq!(long, &format!("{}…", "v".repeat(256)));
        assert!(
            TapHeaders::capture(&hyper::HeaderMap::new())
                .to_pairs()
                .is_empty()
        );
    }

    #[test]
    fn sensitive_headers_are_redacted() {
        assert_eq!(tap_header_value("authorization", b"Bearer x"), "[redacted]");
        assert_eq!(tap_header_value("x-request-id", b"abc"), "abc");
    }
}
