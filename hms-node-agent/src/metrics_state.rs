//! The metrics read at scrape time from state the agent keeps anyway: circuit state per
//! instance, DNS answers, connections, tap deliveries. Wiring only; the values' meaning is
//! defined where they are kept.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::dns::DnsResponder;
use crate::metrics::{ReadingSpec, SeriesSpec, StateCollector};
use crate::proxy::Outbound;
use crate::tap::TapHub;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn collector(
    outbound: Arc<Outbound>,
    dns: Arc<DnsResponder>,
    tap: Arc<TapHub>,
    redirector: Arc<crate::redirect::Redirector>,
    identity: Arc<crate::mesh_identity::MeshIdentity>,
) -> StateCollector {
    let mut readings: Vec<ReadingSpec> = Vec::new();
    let id = identity.clone();
    readings.push(ReadingSpec {
        name: "identity_trust_bundle_refused".into(),
        help: "Distinct trust bundles from the registry this host refused: a root that no root it trusts vouched for with a cross-certificate".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || id.trust_bundles_refused()),
    });
    readings.push(ReadingSpec {
        name: "identity_trust_chain_broken".into(),
        help: "1 when the mesh's trust bundle no longer trusts this host's certificate (it must re-join; see hms-ctl status)".into(),
        counter: false,
        labels: vec![],
        read: Box::new(move || u64::from(identity.trust_chain_broken())),
    });
    readings.push(ReadingSpec {
        name: "egress_refused".into(),
        help: "Connects from the redirected cgroup the kernel refused (EPERM) as undeclared egress (--refuse-undeclared-egress)".into(),
        counter: true,
        labels: vec![],
        read: {
            let r = redirector.clone();
            Box::new(move || r.egress_refusal().1)
        },
    });
    readings.push(ReadingSpec {
        name: "ringbuf_records_lost".into(),
        help: "Kernel flow records dropped because the ring buffer was full".into(),
        counter: true,
        labels: vec![],
        read: {
            let r = redirector.clone();
            Box::new(move || r.ringbuf_drops())
        },
    });
    for (name, help, pick) in [
        (
            "sk_msg_redirected_messages",
            "Sends the sk_msg bypass moved straight into the peer socket",
            0usize,
        ),
        (
            "sk_msg_redirected_bytes",
            "Bytes the sk_msg bypass moved straight into the peer socket",
            1,
        ),
        (
            "sk_msg_passed_messages",
            "Sends of sockets in the sk_msg bypass whose peer was not in it (carried by TCP)",
            2,
        ),
    ] {
        let r = redirector.clone();
        readings.push(ReadingSpec {
            name: name.into(),
            help: help.into(),
            counter: true,
            labels: vec![],
            read: Box::new(move || {
                let s = r.sk_msg_stats();
                [s.redirected, s.redirected_bytes, s.passed][pick]
            }),
        });
    }
    let o = outbound.clone();
    readings.push(ReadingSpec {
        name: "active_connections".into(),
        help: "Redirected connections the proxy is carrying now".into(),
        counter: false,
        labels: vec![],
        read: Box::new(move || o.stats.active.load(Ordering::Relaxed)),
    });
    let o = outbound.clone();
    readings.push(ReadingSpec {
        name: "connections_refused".into(),
        help: "Redirected connections closed without being proxied (no record, unknown VIP, wrong port, denied, dead instance)".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || o.stats.refused.load(Ordering::Relaxed)),
    });
    for (answer, pick) in [
        ("vip", 0usize),
        ("nodata", 1),
        ("nxdomain", 2),
        ("forwarded", 3),
        ("formerr", 4),
        ("servfail", 5),
        ("dropped", 6),
    ] {
        let d = dns.clone();
        readings.push(ReadingSpec {
            name: "dns_queries".into(),
            help: "DNS queries answered by the agent, by kind of answer".into(),
            counter: true,
            labels: labels(&[("answer", answer)]),
            read: Box::new(move || {
                let c = d.stats.counters();
                [
                    c.vip,
                    c.nodata,
                    c.nxdomain,
                    c.forwarded,
                    c.formerr,
                    c.servfail,
                    c.dropped,
                ][pick]
            }),
        });
    }
    let o = outbound.clone();
    readings.push(ReadingSpec {
        name: "bad_requests".into(),
        help: "Downstream HTTP connections ended by a malformed or oversized request head, or a client too slow to send one".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || o.http.stats.bad_requests.load(Ordering::Relaxed)),
    });
    let limits = dns.caps.clone();
    // One family after another (the text format wants each family's series together).
    type Read = fn(&crate::limits::ConnCap) -> u64;
    let families: [(&str, &str, bool, Read); 5] = [
        (
            "listener_connections",
            "Connections a listener holds now, under its cap (hms_listener_connection_cap)",
            false,
            |c| c.open() as u64,
        ),
        (
            "listener_connection_cap",
            "Connections a listener may hold (a share of the fd limit)",
            false,
            |c| c.max() as u64,
        ),
        (
            "listener_connections_shed",
            "Idle connections a listener at its cap closed to admit a new one",
            true,
            |c| c.shed.load(Ordering::Relaxed),
        ),
        (
            "listener_connections_refused",
            "New connections a listener at its cap closed at once (none idle to shed)",
            true,
            |c| c.refused.load(Ordering::Relaxed),
        ),
        (
            "listener_connections_refused_user_share",
            "New connections closed because their user (uid), or at the gateway their client address, already held half the listener's cap",
            true,
            |c| c.refused_user_share.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, counter, read) in families {
        for (i, cap) in limits.listeners().iter().enumerate() {
            let l = limits.clone();
            readings.push(ReadingSpec {
                name: name.into(),
                help: help.into(),
                counter,
                labels: labels(&[("listener", cap.name)]),
                read: Box::new(move || read(l.listeners()[i])),
            });
        }
    }
    let d = dns.clone();
    readings.push(ReadingSpec {
        name: "dns_remote_refused".into(),
        help: "DNS queries and connections from other hosts, dropped (--dns bound off loopback with --dns-allow-remote answers this host only)".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || {
            d.local_only
                .as_ref()
                .map_or(0, |l| l.refused.load(Ordering::Relaxed))
        }),
    });
    let l = limits.clone();
    readings.push(ReadingSpec {
        name: "dns_forwards_dropped".into(),
        help: "Forwarded DNS queries dropped because the bounded forward pool was full".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || l.dns_forwards_dropped.load(Ordering::Relaxed)),
    });
    let l = limits.clone();
    readings.push(ReadingSpec {
        name: "fd_limit".into(),
        help: "The agent's file descriptor limit (RLIMIT_NOFILE soft, raised to the hard one at start)".into(),
        counter: false,
        labels: vec![],
        read: Box::new(move || l.fd_limit),
    });
    let o = outbound.clone();
    readings.push(ReadingSpec {
        name: "upstream_unprocessed".into(),
        help: "Attempts an instance did not process (HTTP/2 GOAWAY or REFUSED_STREAM, an HTTP/1.1 connection found closed before the request was written), sent again on a fresh connection and not counted against the instance".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || o.http.stats.unprocessed.load(Ordering::Relaxed)),
    });
    let t = tap.clone();
    readings.push(ReadingSpec {
        name: "tap_events_lost".into(),
        help: "Tap events live subscribers missed because they read too slowly".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || t.lost_total.load(Ordering::Relaxed)),
    });
    let t = tap.clone();
    readings.push(ReadingSpec {
        name: "tap_events".into(),
        help: "Events published to the tap hub".into(),
        counter: true,
        labels: vec![],
        read: Box::new(move || t.published_total.load(Ordering::Relaxed)),
    });
    let circuit_state = per_instance(outbound.clone(), |h| match h.state.as_str() {
        "closed" => 0,
        "half_open" => 2,
        _ => 1,
    });
    let ejections = per_instance(outbound, |h| h.ejections_total as i64);
    StateCollector {
        readings,
        series: vec![
            SeriesSpec {
                name: "circuit_state".into(),
                help: "Circuit of each instance: 0 closed (healthy), 1 open (ejected), 2 half-open (probing)".into(),
                counter: false,
                read: circuit_state,
            },
            SeriesSpec {
                name: "circuit_ejections".into(),
                help: "Times each instance was ejected by its circuit breaker".into(),
                counter: true,
                read: ejections,
            },
        ],
    }
}

/// A series with one value per instance of every service, labelled by destination and
/// instance, read from the proxy's breaker state at scrape time.
fn per_instance(
    outbound: Arc<Outbound>,
    value: fn(&hms_ctl::api::InstanceHealth) -> i64,
) -> Box<crate::metrics::SeriesFn> {
    Box::new(move || {
        let snapshot = outbound.store.snapshot();
        snapshot
            .services()
            .flat_map(|s| {
                outbound
                    .http
                    .states
                    .health(&s.spec.name)
                    .into_iter()
                    .map(move |h| {
                        (
                            labels(&[
                                ("destination", &s.spec.name),
                                ("instance", &h.addr.to_string()),
                            ]),
                            value(&h),
                        )
                    })
            })
            .collect()
    })
}
