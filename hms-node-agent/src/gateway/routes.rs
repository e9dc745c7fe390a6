//! Which route a request takes and which backend it goes to. Owns matching and the weighted
//! pick; never changes a request (that is `filters`) and never sends one.
//!
//! Matching, as Gateway API orders it:
//! 1. the route must attach to the listener the request came on, and its hostnames (if any)
//!    must cover the request's host (`Host` or `:authority`, port dropped); an exact
//!    hostname beats a wildcard;
//! 2. among the routes left, each match (path, method, headers, query; all must hold) is a
//!    candidate; the most specific wins: an exact path over a prefix, a longer prefix over a
//!    shorter one, then a method, then more headers, then more query parameters; a tie
//!    goes to the route (and match) written first;
//! 3. a path prefix matches whole segments: `/pay` matches `/pay` and `/pay/x`, not `/payx`.
//!
//! The backend: a random pick weighted by `weight` (a 90/10 split sends about 100 of 1000
//! to the 10).

use hyper::http::request::Parts;
use rand::Rng;

use hms_ctl::gateway::{BackendSpec, GatewaySpec, MatchSpec, PathMatch, RouteSpec};

/// A route and its index in the spec (for the tie-break and metrics).
#[derive(Debug)]
pub struct Route {
    pub spec: RouteSpec,
    /// `<gateway>/<route>`.
    pub label: String,
}

/// The routes of one listener.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// What a route without `matches:` has: every request.
static MATCH_ALL: MatchSpec = MatchSpec {
    path: None,
    method: None,
    headers: std::collections::BTreeMap::new(),
    query: std::collections::BTreeMap::new(),
};

/// Why it matched, in order of importance (compared as a tuple: larger wins).
type Specificity = (u8, u8, usize, u8, usize, usize);

impl RouteTable {
    pub fn for_listener(spec: &GatewaySpec, listener: &str) -> RouteTable {
        RouteTable {
            routes: spec
                .routes
                .iter()
                .filter(|r| r.listeners.is_empty() || r.listeners.iter().any(|l| l == listener))
                .map(|r| Route {
                    spec: r.clone(),
                    label: format!("{}/{}", spec.name, r.name),
                })
                .collect(),
        }
    }

    /// Steps 1-3: the route for a request and, for a prefix match, the matched prefix.
    pub fn find(&self, parts: &Parts, host: Option<&str>) -> Option<(&Route, Option<&str>)> {
        let host = host.map(strip_port).map(|h| h.to_ascii_lowercase());
        let mut best: Option<(Specificity, &Route, Option<&str>)> = None;
        for route in &self.routes {
            let Some(host_rank) = host_rank(&route.spec.hostnames, host.as_deref()) else {
                continue;
            };
            let matches = if route.spec.matches.is_empty() {
                std::slice::from_ref(&MATCH_ALL)
            } else {
                &route.spec.matches[..]
            };
            for m in matches {
                let Some((path_rank, prefix)) = match_one(m, parts) else {
                    continue;
                };
                let rank: Specificity = (
                    host_rank,
                    path_rank.0,
                    path_rank.1,
                    u8::from(m.method.is_some()),
                    m.headers.len(),
                    m.query.len(),
                );
                // Strictly greater: the first written wins a tie.
                if best.as_ref().is_none_or(|(b, _, _)| rank > *b) {
                    best = Some((rank, route, prefix));
                }
            }
        }
        best.map(|(_, r, p)| (r, p))
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') => h,
        _ => host,
    }
}

/// None: no hostname covers it. 2: exact, 1: wildcard, 0: the route takes any host.
fn host_rank(hostnames: &[String], host: Option<&str>) -> Option<u8> {
    if hostnames.is_empty() {
        return Some(0);
    }
    let host = host?;
    let mut rank = None;
    for h in hostnames {
        let h = h.to_ascii_lowercase();
        if h == host {
            return Some(2);
        }
        if let Some(base) = h.strip_prefix("*.")
            && let Some((_, rest)) = host.split_once('.')
            && rest == base
        {
            rank = Some(1);
        }
    }
    rank
}

/// ((2 exact | 1 prefix, prefix length), the matched prefix) when every part matches.
fn match_one<'a>(m: &'a MatchSpec, parts: &Parts) -> Option<((u8, usize), Option<&'a str>)> {
    let path = parts.uri.path();
    let (rank, prefix) = match &m.path {
        None => ((1, 1), Some("/")),
        Some(PathMatch::Exact(p)) => {
            if path != p {
                return None;
            }
            ((2, p.len()), None)
        }
        Some(PathMatch::Prefix(p)) => {
            if !prefix_matches(p, path) {
                return None;
            }
            ((1, p.trim_end_matches('/').len()), Some(p.as_str()))
        }
    };
    if let Some(method) = &m.method
        && parts.method.as_str() != method
    {
        return None;
    }
    for (name, value) in &m.headers {
        let found = parts
            .headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes());
        if !found {
            return None;
        }
    }
    if !m.query.is_empty() {
        let query = parts.uri.query().unwrap_or("");
        for (name, value) in &m.query {
            let found = query.split('&').any(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                k == name && v == value
            });
            if !found {
                return None;
            }
        }
    }
    Some((rank, prefix))
}

/// Whole-segment prefix: `/pay` covers `/pay`, `/pay/` and `/pay/x`; `/` covers everything.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
}

/// The weighted pick; None when every weight is 0.
pub fn pick_backend<'a>(
    backends: &'a [BackendSpec],
    rng: &mut impl Rng,
) -> Option<&'a BackendSpec> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = rng.random_range(0..total);
    for b in backends {
        let w = u64::from(b.weight);
        if n < w {
            return Some(b);
        }
        n -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn table(yaml_routes: &str) -> RouteTable {
        let yaml = format!(
            "name: g\nlisteners: [{{name: a, port: 80, protocol: http}}, {{name: b, port: 81, protocol: http}}]\nroutes:\n{yaml_routes}"
        );
        let spec = hms_ctl::gateway::parse(&yaml, "t").unwrap();
        RouteTable::for_listener(&spec, "a")
    }

    fn name(t: &RouteTable, p: &Parts, host: Option<&str>) -> Option<String> {
        t.find(p, host).map(|(r, _)| r.spec.name.clone())
    }

    #[test]
    fn the_most_specific_match_wins() {
        let t = table(
            "  - {name: all, backends: [{service: a}]}\n  - {name: pay, matches: [{path: {prefix: /pay}}], backends: [{service: a}]}\n  - {name: exact, matches: [{path: {exact: /pay/now}}], backends: [{service: a}]}\n  - {name: post, matches: [{path: {prefix: /pay}, method: POST}], backends: [{service: a}]}\n  - {name: canary, matches: [{path: {prefix: /pay}, method: POST, headers: {x-canary: \"1\"}}], backends: [{service: a}]}\n  - {name: q, matches: [{path: {prefix: /pay}, query: {v: \"2\"}}], backends: [{service: a}]}\n",
        );
        assert_eq!(name(&t, &parts("GET", "/", &[]), None).unwrap(), "all");
        assert_eq!(name(&t, &parts("GET", "/pay/x", &[]), None).unwrap(), "pay");
        assert_eq!(
            name(&t, &parts("GET", "/payment", &[]), None).unwrap(),
            "all"
        );
        assert_eq!(
            name(&t, &parts("GET", "/pay/now", &[]), None).unwrap(),
            "exact"
        );
        assert_eq!(name(&t, &parts("POST", "/pay", &[]), None).unwrap(), "post");
        assert_eq!(
            name(&t, &parts("POST", "/pay", &[("x-canary", "1")]), None).unwrap(),
            "canary"
        );
        assert_eq!(
            name(&t, &parts("GET", "/pay?a=1&v=2", &[]), None).unwrap(),
            "q"
        );
    }

    #[test]
    fn hostnames_and_listeners_narrow_the_routes() {
        let t = table(
            "  - {name: any, backends: [{service: a}]}\n  - {name: wild, hostnames: [\"*.example.com\"], backends: [{service: a}]}\n  - {name: shop, hostnames: [shop.example.com], backends: [{service: a}]}\n  - {name: other, listeners: [b], hostnames: [x.example.com], backends: [{service: a}]}\n",
        );
        let p = parts("GET", "/", &[]);
        assert_eq!(name(&t, &p, Some("shop.example.com:8443")).unwrap(), "shop");
        assert_eq!(name(&t, &p, Some("x.example.com")).unwrap(), "wild");
        assert_eq!(name(&t, &p, Some("a.b.example.com")).unwrap(), "any");
        assert_eq!(name(&t, &p, None).unwrap(), "any");
    }

    #[test]
    fn weights_split_requests() {
        let backends = vec![
            BackendSpec {
                service: "stable".into(),
                weight: 90,
            },
            BackendSpec {
                service: "canary".into(),
                weight: 10,
            },
            BackendSpec {
                service: "off".into(),
                weight: 0,
            },
        ];
        let mut rng = rand::rng();
        let mut canary = 0;
        for _ in 0..10_000 {
            match pick_backend(&backends, &mut rng).unwrap().service.as_str() {
                "canary" => canary += 1,
                "stable" => {}
                other => panic!("picked {other}"),
            }
        }
        assert!((800..=1200).contains(&canary), "{canary}");
    }
}
