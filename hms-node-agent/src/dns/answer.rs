//! Deciding what to do with one DNS message: answer `*.svc` from the registry, forward
//! everything else verbatim, or reject what cannot be parsed. Pure: no sockets, so every rule
//! is unit-tested.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

use crate::registry::Snapshot;

/// TTL of `*.svc` answers. Short, so a redeploy is seen quickly; VIPs are stable anyway.
pub const SVC_TTL: u32 = 5;

/// The zone we answer for.
const ZONE: &str = "svc";

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back to the caller.
    Reply(Vec<u8>),
    /// Not ours: pass the query unchanged to the resolver the caller asked.
    Forward,
    /// Nothing sensible to reply to (too short to carry an id, or not a query).
    Drop,
}

/// How the decision went, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Vip,
    NoData,
    NxDomain,
    FormErr,
    Forwarded,
    Dropped,
}

/// The IPv6 VIP of IPv4 VIP `vip` under `prefix` (a /96): the prefix, then the IPv4 VIP.
pub fn vip6(prefix: Ipv6Addr, vip: Ipv4Addr) -> Ipv6Addr {
    crate::config::Ipv6Prefix96(prefix).vip6(vip)
}

/// `vip6_prefix`: answer AAAA (and the AAAA half of ANY) from it; `None` means IPv6 callers
/// are not served, so AAAA is NODATA.
pub fn decide(
    query: &[u8],
    snapshot: &Snapshot,
    vip6_prefix: Option<Ipv6Addr>,
) -> (Decision, Outcome) {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => return formerr(query),
    };
    if msg.message_type() != MessageType::Query {
        return (Decision::Drop, Outcome::Dropped);
    }
    let [q] = msg.queries() else {
        // Zero or several questions: no resolver we forward to would accept it either.
        return formerr(query);
    };
    let name = q.name().to_lowercase();
    let labels: Vec<&[u8]> = name.iter().collect();
    if msg.op_code() != OpCode::Query || labels.last() != Some(&ZONE.as_bytes()) {
        return (Decision::Forward, Outcome::Forwarded);
    }
    let service = match labels.as_slice() {
        [svc, _zone] => std::str::from_utf8(svc)
            .ok()
            .and_then(|s| snapshot.service(s)),
        _ => None,
    };
    let mut reply = Message::new();
    reply
        .set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .add_query(q.clone());
    let outcome = match service {
        None => {
            reply.set_response_code(ResponseCode::NXDomain);
            Outcome::NxDomain
        }
        Some(svc) => {
            // A, AAAA and ANY say the same thing: one VIP per family. ANY is answered
            // rather than refused (RFC 8482 allows either) so it stays consistent with both.
            let t = q.query_type();
            let with_a = matches!(t, RecordType::A | RecordType::ANY);
            let with_aaaa = matches!(t, RecordType::AAAA | RecordType::ANY);
            if with_a {
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    SVC_TTL,
                    RData::A(A(svc.vip)),
                ));
            }
            if let (true, Some(prefix)) = (with_aaaa, vip6_prefix) {
                reply.add_answer(Record::from_rdata(
                    q.name().clone(),
                    SVC_TTL,
                    RData::AAAA(AAAA(vip6(prefix, svc.vip))),
                ));
            }
            // Every other type (and AAAA without IPv6): the name exists, with no such data.
            if reply.answers().is_empty() {
                Outcome::NoData
            } else {
                Outcome::Vip
            }
        }
    };
    match reply.to_vec() {
        Ok(bytes) => (Decision::Reply(bytes), outcome),
        Err(_) => formerr(query),
    }
}

fn formerr(query: &[u8]) -> (Decision, Outcome) {
    if query.len() < 2 {
        return (Decision::Drop, Outcome::Dropped);
    }
    // Never answer something that claims to be a response: two responders could loop.
    if query.len() >= 3 && query[2] & 0x80 != 0 {
        return (Decision::Drop, Outcome::Dropped);
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
        Ok(bytes) => (Decision::Reply(bytes), Outcome::FormErr),
        Err(_) => (Decision::Drop, Outcome::Dropped),
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use hms_ctl::api::ServiceInfo;

    use super::*;

    fn snapshot() -> Snapshot {
        let spec = hms_ctl::spec::parse("name: payments-svc\nport: 7000\n", "t").unwrap();
        Snapshot::new([ServiceInfo {
            spec,
            vip: Ipv4Addr::new(127, 77, 1, 2),
            instances: vec![],
        }])
    }

    const PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd48, 0x4d53, 0, 0, 0, 0, 0, 0);

    fn decide_v4(query: &[u8], snapshot: &Snapshot) -> (Decision, Outcome) {
        decide(query, snapshot, None)
    }

    #[test]
    fn with_ipv6_a_aaaa_and_any_answer_the_same_service_in_both_families() {
        let v6: Ipv6Addr = "fd48:4d53::7f4d:102".parse().unwrap();
        let q = |t| reply(decide(&query("payments-svc.svc.", t), &snapshot(), Some(PREFIX)).0);
        let m = q(RecordType::AAAA);
        assert_eq!(m.answers().len(), 1);
        assert!(matches!(m.answers()[0].data(), RData::AAAA(a) if a.0 == v6));
        let m = q(RecordType::A);
        assert_eq!(m.answers().len(), 1);
        assert!(
            matches!(m.answers()[0].data(), RData::A(a) if a.0 == Ipv4Addr::new(127, 77, 1, 2))
        );
        let m = q(RecordType::ANY);
        assert_eq!(m.answers().len(), 2);
        assert!(
            m.answers()
                .iter()
                .any(|r| matches!(r.data(), RData::AAAA(a) if a.0 == v6))
        );
        assert!(m.answers().iter().any(|r| matches!(r.data(), RData::A(_))));
        // Other types stay NODATA.
        let (_, o) = decide(
            &query("payments-svc.svc.", RecordType::MX),
            &snapshot(),
            Some(PREFIX),
        );
        assert_eq!(o, Outcome::NoData);
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(d: Decision) -> Message {
        match d {
            Decision::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn a_known_service_answers_its_vip() {
        let (d, o) = decide_v4(&query("payments-svc.svc.", RecordType::A), &snapshot());
        assert_eq!(o, Outcome::Vip);
        let m = reply(d);
        assert_eq!(m.id(), 4242);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(m.answers()[0].ttl(), SVC_TTL);
        assert!(
            matches!(m.answers()[0].data(), RData::A(a) if a.0 == Ipv4Addr::new(127, 77, 1, 2))
        );
    }

    #[test]
    fn names_are_case_insensitive() {
        let (_, o) = decide_v4(&query("Payments-SVC.svc.", RecordType::A), &snapshot());
        assert_eq!(o, Outcome::Vip);
    }

    #[test]
    fn aaaa_of_a_known_service_is_nodata() {
        let (d, o) = decide_v4(&query("payments-svc.svc.", RecordType::AAAA), &snapshot());
        assert_eq!(o, Outcome::NoData);
        let m = reply(d);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
    }

    #[test]
    fn unknown_svc_names_are_nxdomain() {
        for name in ["nope.svc.", "a.b.svc.", "svc."] {
            let (d, o) = decide_v4(&query(name, RecordType::A), &snapshot());
            assert_eq!(o, Outcome::NxDomain, "{name}");
            assert_eq!(reply(d).response_code(), ResponseCode::NXDomain);
        }
    }

    #[test]
    fn other_names_are_forwarded() {
        let (d, _) = decide_v4(&query("example.com.", RecordType::A), &snapshot());
        assert_eq!(d, Decision::Forward);
        let (d, _) = decide_v4(&query("svc.example.com.", RecordType::A), &snapshot());
        assert_eq!(d, Decision::Forward);
    }

    #[test]
    fn garbage_gets_formerr_or_is_dropped() {
        let (d, o) = decide_v4(&[0x12, 0x34, 0x01, 0x00, 0xff], &snapshot());
        assert_eq!(o, Outcome::FormErr);
        let m = reply(d);
        assert_eq!(m.id(), 0x1234);
        assert_eq!(m.response_code(), ResponseCode::FormErr);
        assert_eq!(decide_v4(&[7], &snapshot()).0, Decision::Drop);
        assert_eq!(decide_v4(&[], &snapshot()).0, Decision::Drop);
        // Random bytes never panic.
        let mut seed = 0x9e37_79b9u32;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = decide(&buf, &snapshot(), Some(PREFIX));
        }
    }
}
