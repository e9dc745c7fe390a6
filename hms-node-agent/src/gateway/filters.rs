//! A route's filters: request and response header set/remove, path prefix rewrite and
//! redirects. Owns changing a request or response as the route says; never picks a route or
//! a backend.

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode, Uri};

use hms_ctl::gateway::{HeaderFilter, RedirectSpec};

use crate::proxy::http::body::{ProxyBody, empty};

/// Set, then remove (a name in both ends up removed).
pub fn apply_headers(filter: &HeaderFilter, headers: &mut HeaderMap) {
    for (k, v) in &filter.set {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    for k in &filter.remove {
        if let Ok(k) = HeaderName::from_bytes(k.as_bytes()) {
            headers.remove(k);
        }
    }
}

/// Replaces the matched `prefix` of the path with `with` (query kept):
/// `/pay/x` with prefix `/pay` and `/` becomes `/x`; `/pay` becomes `/`.
pub fn rewrite_prefix(parts: &mut Parts, prefix: &str, with: &str) {
    let path = parts.uri.path();
    let p = prefix.trim_end_matches('/');
    let rest = path.get(p.len()..).unwrap_or("");
    let mut new = format!("{}{}", with.trim_end_matches('/'), rest);
    if !new.starts_with('/') {
        new.insert(0, '/');
    }
    if let Some(q) = parts.uri.query() {
        new.push('?');
        new.push_str(q);
    }
    let mut uri = parts.uri.clone().into_parts();
    if let Ok(pq) = new.parse() {
        uri.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(uri) {
            parts.uri = u;
        }
    }
}

/// The redirect a route answers with. `scheme`/`host`/`port` are the request's own (the
/// listener's scheme, `Host` without port, the listener's port).
pub fn redirect(
    spec: &RedirectSpec,
    parts: &Parts,
    scheme: &str,
    host: &str,
    port: u16,
) -> Response<ProxyBody> {
    let scheme = spec.scheme.as_deref().unwrap_or(scheme);
    let host = spec.hostname.as_deref().unwrap_or(host);
    // A scheme change without a port goes to the scheme's default port.
    let port = spec.port.unwrap_or(match spec.scheme.as_deref() {
        Some("https") if scheme != "http" => 443,
        Some("http") => 80,
        _ => port,
    });
    let path = spec.path.as_deref().unwrap_or(parts.uri.path());
    let default_port = (scheme == "https" && port == 443) || (scheme == "http" && port == 80);
    let mut location = format!("{scheme}://{host}");
    if !default_port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(path);
    if let Some(q) = parts.uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let status = spec
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FOUND);
    redirect_to(status, &location)
}

pub fn redirect_to(status: StatusCode, location: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        hyper::Request::builder()
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn a_prefix_rewrite_keeps_the_rest_and_the_query() {
        for (uri, prefix, with, want) in [
            ("/pay/x?a=1", "/pay", "/", "/x?a=1"),
            ("/pay", "/pay", "/", "/"),
            ("/pay/x", "/pay/", "/v2/pay", "/v2/pay/x"),
            ("/x", "/", "/api", "/api/x"),
        ] {
            let mut p = parts(uri);
            rewrite_prefix(&mut p, prefix, with);
            assert_eq!(p.uri.to_string(), want, "{uri} {prefix} {with}");
        }
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_change() {
        let spec = RedirectSpec {
            scheme: Some("https".into()),
            status: Some(301),
            ..Default::default()
        };
        let r = redirect(&spec, &parts("/a?b=1"), "http", "shop.example", 8080);
        assert_eq!(r.status(), 301);
        assert_eq!(r.headers()["location"], "https://shop.example/a?b=1");
        let spec = RedirectSpec {
            path: Some("/new".into()),
            ..Default::default()
        };
        let r = redirect(&spec, &parts("/old"), "https", "shop.example", 8443);
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "https://shop.example:8443/new");
    }
}
