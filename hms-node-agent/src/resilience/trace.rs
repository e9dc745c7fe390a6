//! The mesh's request id, `x-hms-trace-id`. Owns minting and validating it; never touches
//! W3C `traceparent`/`tracestate` or any other tracing header (apps and their tracers own
//! those), and never logs or stores it (taps do).
//!
//! 1. If the request carries an `x-hms-trace-id` whose value is 1 to 128 bytes of visible
//!    ASCII (0x21–0x7E), it is kept byte for byte, so ids minted by an upstream mesh or a
//!    client's own scheme survive across hops.
//! 2. Otherwise (absent, empty, too long, spaces or control or non-ASCII bytes) a new id
//!    replaces it: 128 random bits as 32 lowercase hex characters, never all zeros.
//! 3. The request leaves with exactly one `x-hms-trace-id`: when a client sent several, the
//!    first is judged by steps 1–2 and the rest are removed, so every hop and tap agrees on
//!    one id.
//!
//! Hot path: a present valid id costs one header lookup and no allocation (the value is
//! reference-counted); minting allocates only the 32-byte header value.

use hyper::http::header::{Entry, HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

/// The header's name.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-hms-trace-id");
/// The longest trace id kept as it came.
pub const MAX_TRACE_ID_LEN: usize = 128;

/// A request's trace id: a valid `x-hms-trace-id` value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceId(HeaderValue);

impl TraceId {
    /// Step 2: a fresh random id (32 lowercase hex characters, not all zeros).
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> TraceId {
        let mut bits: u128 = rng.random();
        while bits == 0 {
            bits = rng.random();
        }
        let mut hex = [0u8; 32];
        for (i, byte) in hex.iter_mut().enumerate() {
            let nibble = ((bits >> (124 - 4 * i)) & 0xf) as usize;
            *byte = b"0123456789abcdef"[nibble];
        }
        TraceId(HeaderValue::from_bytes(&hex).expect("hex digits are a valid header value"))
    }

    /// Step 1: the value as a trace id, if it is one to keep.
    pub fn parse(value: &HeaderValue) -> Option<TraceId> {
        is_valid(value.as_bytes()).then(|| TraceId(value.clone()))
    }

    pub fn as_str(&self) -> &str {
        // Valid ids are visible ASCII, so this never fails.
        self.0.to_str().unwrap_or_default()
    }

    pub fn as_header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_valid(bytes: &[u8]) -> bool {
    (1..=MAX_TRACE_ID_LEN).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// [`ensure_trace_id_with`] with the thread's RNG.
pub fn ensure_trace_id(headers: &mut HeaderMap) -> TraceId {
    ensure_trace_id_with(headers, &mut rand::rng())
}

/// Steps 1–3: keeps a valid `x-hms-trace-id`, or mints one, and leaves exactly one in
/// `headers`. Returns the request's id.
pub fn ensure_trace_id_with<R: Rng + ?Sized>(headers: &mut HeaderMap, rng: &mut R) -> TraceId {
    match headers.entry(TRACE_ID_HEADER) {
        Entry::Occupied(mut entry) => {
            let (kept, several) = {
                let mut values = entry.iter();
                let first = values.next().and_then(TraceId::parse);
                (first, values.next().is_some())
            };
            match kept {
                Some(id) if !several => id,
                Some(id) => {
                    entry.insert(id.0.clone());
                    id
                }
                None => {
                    let id = TraceId::random(rng);
                    entry.insert(id.0.clone());
                    id
                }
            }
        }
        Entry::Vacant(entry) => {
            let id = TraceId::random(rng);
            entry.insert(id.0.clone());
            id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(11)
    }

    fn ids(headers: &HeaderMap) -> Vec<&[u8]> {
        headers
            .get_all(TRACE_ID_HEADER)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    }

    fn is_lower_hex_32(s: &str) -> bool {
        s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    #[test]
    fn a_request_without_a_trace_id_gets_a_random_128_bit_hex_one() {
        let mut h = HeaderMap::new();
        let id = ensure_trace_id_with(&mut h, &mut rng());
        assert!(is_lower_hex_32(id.as_str()), "{id}");
        assert_eq!(ids(&h), [id.as_str().as_bytes()]);
        let other = ensure_trace_id_with(&mut HeaderMap::new(), &mut SmallRng::seed_from_u64(12));
        assert_ne!(id, other);
    }

    #[test]
    fn a_trace_id_from_upstream_is_kept_unchanged() {
        for value in [
            "4bf92f3577b34da6a3ce929d0e0e4736",
            "req-42:eu/1",
            &"x".repeat(128),
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACE_ID_HEADER, value.parse().unwrap());
            let id = ensure_trace_id_with(&mut h, &mut rng());
            assert_eq!(id.as_str(), value);
            assert_eq!(ids(&h), [value.as_bytes()]);
        }
    }

    #[test]
    fn an_unusable_trace_id_is_replaced() {
        let too_long = "x".repeat(129);
        let bad: [&[u8]; 5] = [
            b"",
            b"has space",
            b"tab\there",
            too_long.as_bytes(),
            b"caf\xc3\xa9",
        ];
        for value in bad {
            let mut h = HeaderMap::new();
            h.insert(TRACE_ID_HEADER, HeaderValue::from_bytes(value).unwrap());
            let id = ensure_trace_id_with(&mut h, &mut rng());
            assert!(is_lower_hex_32(id.as_str()), "{value:?} → {id}");
            assert_eq!(ids(&h), [id.as_str().as_bytes()]);
        }
    }

    #[test]
    fn several_trace_ids_collapse_to_the_first() {
        let mut h = HeaderMap::new();
        h.append(TRACE_ID_HEADER, "first".parse().unwrap());
        h.append(TRACE_ID_HEADER, "second".parse().unwrap());
        let id = ensure_trace_id_with(&mut h, &mut rng());
        assert_eq!(id.as_str(), "first");
        assert_eq!(ids(&h), [b"first".as_slice()]);

        let mut h = HeaderMap::new();
        h.append(TRACE_ID_HEADER, "bad one".parse().unwrap());
        h.append(TRACE_ID_HEADER, "good".parse().unwrap());
        let id = ensure_trace_id_with(&mut h, &mut rng());
        assert!(is_lower_hex_32(id.as_str()));
        assert_eq!(ids(&h).len(), 1);
    }

    #[test]
    fn w3c_trace_context_headers_are_never_touched() {
        let mut h = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", parent.parse().unwrap());
        h.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        let before = h.clone();
        ensure_trace_id(&mut h);
        h.remove(TRACE_ID_HEADER);
        assert_eq!(h, before);
    }

    #[test]
    fn minted_ids_are_never_all_zeros_and_use_every_hex_digit() {
        struct Zeros(u32);
        impl rand::RngCore for Zeros {
            fn next_u32(&mut self) -> u32 {
                self.next_u64() as u32
            }
            fn next_u64(&mut self) -> u64 {
                // Zeros for the first u128, then a counter.
                self.0 += 1;
                if self.0 <= 2 { 0 } else { u64::from(self.0) }
            }
            fn fill_bytes(&mut self, dest: &mut [u8]) {
                rand::rand_core::impls::fill_bytes_via_next(self, dest)
            }
        }
        let id = TraceId::random(&mut Zeros(0));
        assert_ne!(id.as_str(), "0".repeat(32));
        let mut digits = std::collections::BTreeSet::new();
        let mut rng = rng();
        for _ in 0..20 {
            digits.extend(TraceId::random(&mut rng).as_str().chars());
        }
        assert_eq!(digits.into_iter().collect::<String>(), "0123456789abcdef");
    }
}
