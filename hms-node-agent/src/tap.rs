//! The tap hub: where every flow the mesh sees is published (HTTP requests from the proxy,
//! TCP connections from the kernel's ring buffer) and read by `hms-ctl tap`. It keeps a
//! bounded ring of recent events per service (for `--last N`) and feeds live subscribers
//! through bounded channels. Publishing never waits: a subscriber that does not keep up
//! loses events and is told how many; a full ring drops its oldest event.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hms_ctl::api::{TapEvent, TapFilter};
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

#[derive(Default)]
pub struct TapHub {
    recent: Mutex<HashMap<String, VecDeque<Arc<TapEvent>>>>,
    http_flows: Mutex<std::collections::HashSet<std::net::SocketAddrV4>>,
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
        self.published_total.fetch_add(1, Ordering::Relaxed);
        let event = Arc::new(event);
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let mut push = |svc: &str| {
                let ring = recent.entry(svc.to_string()).or_default();
                if ring.len() == RING_PER_SERVICE {
                    ring.pop_front();
                }
                ring.push_back(event.clone());
            };
            push(&event.callee);
            if event.caller != event.callee {
                push(&event.caller);
            }
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
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
            .filter(|e| filter.matches(e))
            .take(n)
            .cloned()
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
    pub fn mark_http_flow(&self, client: std::net::SocketAddrV4) {
        let mut flows = self.http_flows.lock().unwrap_or_else(|p| p.into_inner());
        if flows.len() >= MAX_HTTP_FLOWS {
            flows.clear();
        }
        flows.insert(client);
    }

    /// Whether the connection from `client` carried HTTP; forgets it (its close arrived).
    pub fn take_http_flow(&self, client: std::net::SocketAddrV4) -> bool {
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

/// A header value as a tap may show it.
pub fn tap_header_value(name: &str, value: &[u8]) -> String {
    if REDACTED_HEADERS.contains(&name) {
        return "[redacted]".into();
    }
    const MAX: usize = 256;
    let text = String::from_utf8_lossy(&value[..value.len().min(MAX)]).into_owned();
    if value.len() > MAX {
        format!("{text}…")
    } else {
        text
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
    fn sensitive_headers_are_redacted() {
        assert_eq!(tap_header_value("authorization", b"Bearer x"), "[redacted]");
        assert_eq!(tap_header_value("x-request-id", b"abc"), "abc");
    }
}
