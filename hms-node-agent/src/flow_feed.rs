//! Joins the kernel's flow records (ring buffer) with what the agent knows: the callee from
//! the original destination's VIP, the caller from the cgroup id. Every closed connection
//! feeds the flow metrics; connections that carried raw TCP become a tap line of their own
//! (bytes, RTT, duration), while HTTP connections are already tapped request by request.

use std::sync::Arc;

use hms_ctl::api::{TapEvent, TapKind};

use crate::metrics::{ByteLabels, EdgeLabels, Metrics};
use crate::proxy::Outbound;
use crate::redirect::{EndedBy, FlowKind, FlowReader, FlowRecord};
use crate::tap::TapHub;

pub async fn run(
    mut reader: FlowReader,
    outbound: Arc<Outbound>,
    tap: Arc<TapHub>,
    metrics: Arc<Metrics>,
    drain: crate::drain::Drain,
) {
    loop {
        let record = tokio::select! {
            r = reader.next() => match r {
                Some(r) => r,
                None => break,
            },
            // A successor reads the ring buffer from now on (it has one consumer).
            _ = drain.signaled() => return,
        };
        if record.dns {
            continue;
        }
        if record.kind == FlowKind::EgressRefused {
            publish_refused_egress(&record, &outbound, &tap);
            continue;
        }
        if let FlowKind::Close {
            duration, ended_by, ..
        } = record.kind
        {
            publish_close(&record, duration, ended_by, &outbound, &tap, &metrics);
        }
    }
    tracing::warn!(
        "the flow record reader stopped; TCP taps and flow metrics are no longer updated"
    );
}

/// A connect the kernel refused as undeclared egress: one TCP tap line under the caller,
/// with the destination as callee and `egress-refused` as the mesh's decision.
fn publish_refused_egress(record: &FlowRecord, outbound: &Outbound, tap: &TapHub) {
    let snapshot = outbound.store.snapshot();
    let caller = outbound
        .caller_of(record.cgroup_id, record.pid, &snapshot)
        .to_string();
    let destination = if record.ipv6 {
        format!(
            "[ipv6 ..:{:x}]:{}",
            u32::from(*record.original_dst.ip()),
            record.original_dst.port()
        )
    } else {
        record.original_dst.to_string()
    };
    tracing::info!(%caller, process = %format!("{}[{}]", record.comm, record.pid), %destination, "refused undeclared egress (EPERM)");
    tap.publish(TapEvent {
        time_unix_ms: record
            .connected_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        kind: TapKind::Tcp,
        caller,
        caller_process: format!("{}[{}]", record.comm, record.pid),
        callee: destination.clone(),
        method: None,
        authority: None,
        path: None,
        status: None,
        latency_ms: 0.0,
        request_bytes: 0,
        response_bytes: 0,
        retries: 0,
        upstream: Some(destination),
        trace_id: None,
        mesh_error: Some("egress-refused".into()),
        headers: Vec::new(),
        rtt_us: None,
        retransmits: None,
        connect_ms: None,
        client: None,
        subject: None,
    });
}

/// Payload bytes from the kernel's sequence counters: SYN and FIN each take one.
fn payload(record: &FlowRecord, ended_by: EndedBy) -> (u64, u64) {
    let sent = record.bytes_acked.saturating_sub(2);
    let received = match ended_by {
        EndedBy::Peer => record.bytes_received.saturating_sub(1),
        EndedBy::Client | EndedBy::Abort => record.bytes_received,
    };
    (sent, received)
}

fn publish_close(
    record: &FlowRecord,
    duration: std::time::Duration,
    ended_by: EndedBy,
    outbound: &Outbound,
    tap: &TapHub,
    metrics: &Metrics,
) {
    let snapshot = outbound.store.snapshot();
    let callee = match snapshot.by_vip(*record.original_dst.ip()) {
        Some(s) => s.spec.name.clone(),
        // A VIP nobody owns: the proxy refused it and logged why.
        None => return,
    };
    let caller = outbound
        .caller_of(record.cgroup_id, record.pid, &snapshot)
        .to_string();
    let (sent, received) = payload(record, ended_by);
    metrics
        .flows
        .get_or_create(&EdgeLabels {
            source: caller.clone(),
            destination: callee.clone(),
        })
        .inc();
    for (direction, bytes) in [("sent", sent), ("received", received)] {
        metrics
            .flow_bytes
            .get_or_create(&ByteLabels {
                destination: callee.clone(),
                direction: direction.into(),
            })
            .inc_by(bytes);
    }
    if tap.take_http_flow(record.client) {
        return;
    }
    let ended = record.connected_at + record.connect_latency + duration;
    tap.publish(TapEvent {
        time_unix_ms: ended
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        kind: TapKind::Tcp,
        caller,
        caller_process: format!("{}[{}]", record.comm, record.pid),
        callee,
        method: None,
        authority: None,
        path: None,
        status: None,
        latency_ms: duration.as_secs_f64() * 1000.0,
        request_bytes: sent,
        response_bytes: received,
        retries: 0,
        upstream: None,
        trace_id: None,
        mesh_error: None,
        headers: Vec::new(),
        rtt_us: Some(record.srtt.as_micros() as u32),
        retransmits: Some(record.total_retrans),
        connect_ms: Some(record.connect_latency.as_secs_f64() * 1000.0),
        client: None,
        subject: None,
    });
}
