//! CORS at the door (the Fetch standard's protocol): answers a browser's preflight itself,
//! and marks an allowed origin's actual responses with `Access-Control-Allow-Origin`. Owns
//! the origin check and the `Access-Control-*` headers; never refuses an actual request
//! (the browser keeps a page from reading an unmarked response; servers and curl don't
//! care), only a preflight from an origin that is not allowed.

use hyper::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderValue, ORIGIN,
    VARY,
};
use hyper::{Method, Response, StatusCode};

use hms_ctl::gateway::door::CorsSpec;

use super::reject::Rejection;
use crate::proxy::http::body::{ProxyBody, empty};

#[derive(Debug)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    methods: HeaderValue,
    /// `None`: any header (`*` in the spec): the request's own list is echoed.
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

fn join(list: &[String]) -> anyhow::Result<HeaderValue> {
    HeaderValue::from_str(&list.join(", "))
        .map_err(|_| anyhow::anyhow!("`{}` cannot be a header value", list.join(", ")))
}

impl Cors {
    pub fn compile(spec: &CorsSpec) -> anyhow::Result<Cors> {
        let any_header = spec.allow_headers.iter().any(|h| h == "*");
        Ok(Cors {
            any_origin: spec.allow_origins.iter().any(|o| o == "*"),
            origins: spec
                .allow_origins
                .iter()
                .filter(|o| *o != "*")
                .cloned()
                .collect(),
            methods: join(&spec.allow_methods)?,
            headers: if any_header {
                None
            } else {
                Some(join(&spec.allow_headers)?)
            },
            expose: (!spec.expose_headers.is_empty())
                .then(|| join(&spec.expose_headers))
                .transpose()?,
            credentials: spec.allow_credentials,
            max_age: spec.max_age.map(|d| HeaderValue::from(d.as_secs())),
        })
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any_origin
            || origin
                .to_str()
                .is_ok_and(|o| self.origins.iter().any(|a| a == o))
    }

    /// A browser's preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(ORIGIN)
            && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// The answer to a preflight: 204 with the allow headers for an allowed origin, 403
    /// `cors-denied` with none for another.
    pub fn preflight(&self, headers: &HeaderMap) -> Result<Response<ProxyBody>, Rejection> {
        let origin = headers
            .get(ORIGIN)
            .cloned()
            .unwrap_or(HeaderValue::from_static("null"));
        if !self.allows(&origin) {
            return Err(Rejection::Forbidden {
                reason: "cors-denied",
                message: format!(
                    "hms: origin {} may not call this route from a browser (it is not in the route's cors.allow_origins)",
                    String::from_utf8_lossy(origin.as_bytes())
                ),
            });
        }
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        self.mark(h, origin);
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        match &self.headers {
            Some(v) if !v.is_empty() => {
                h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
            }
            Some(_) => {}
            None => {
                if let Some(asked) = headers.get(ACCESS_CONTROL_REQUEST_HEADERS) {
                    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
                }
            }
        }
        if let Some(age) = &self.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        h.append(
            VARY,
            HeaderValue::from_static(
                "access-control-request-method, access-control-request-headers",
            ),
        );
        Ok(r)
    }

    /// The request's origin, if the route allows it (what [`Cors::mark`] later needs).
    pub fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        headers.get(ORIGIN).filter(|o| self.allows(o)).cloned()
    }

    /// The headers that let a page from `origin` read a response.
    pub fn mark(&self, h: &mut HeaderMap, origin: HeaderValue) {
        if self.any_origin && !self.credentials {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        } else {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.append(VARY, HeaderValue::from_static("origin"));
        }
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(e) = &self.expose {
            h.insert(ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cors(origins: &[&str], headers: &[&str], credentials: bool) -> Cors {
        Cors::compile(&CorsSpec {
            allow_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_methods: vec!["GET".into(), "PUT".into()],
            allow_headers: headers.iter().map(|s| s.to_string()).collect(),
            expose_headers: vec!["x-request-id".into()],
            allow_credentials: credentials,
            max_age: Some(Duration::from_secs(600)),
        })
        .unwrap()
    }

    fn req(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, HeaderValue::from_str(origin).unwrap());
        h.insert(
            ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("PUT"),
        );
        h.insert(
            ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("content-type, x-trace"),
        );
        h
    }

    #[test]
    fn an_allowed_origins_preflight_gets_204_with_the_allow_headers() {
        let c = cors(
            &["https://shop.example.com"],
            &["content-type", "x-trace"],
            true,
        );
        assert!(Cors::is_preflight(
            &Method::OPTIONS,
            &req("https://shop.example.com")
        ));
        assert!(!Cors::is_preflight(
            &Method::GET,
            &req("https://shop.example.com")
        ));
        let r = c.preflight(&req("https://shop.example.com")).unwrap();
        let h = r.headers();
        assert_eq!(r.status(), 204);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example.com");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_METHODS], "GET, PUT");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_HEADERS], "content-type, x-trace");
        assert_eq!(h[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[ACCESS_CONTROL_MAX_AGE], "600");
        assert!(h.get_all(VARY).iter().any(|v| v == "origin"));
    }

    #[test]
    fn another_origin_gets_403_and_no_allow_headers() {
        let c = cors(&["https://shop.example.com"], &[], false);
        for o in [
            "https://evil.example",
            "https://shop.example.com.evil.example",
            "null",
            "HTTPS://SHOP.EXAMPLE.COM",
        ] {
            let rej = c.preflight(&req(o)).unwrap_err();
            let r = rej.response();
            assert_eq!(
                (r.status().as_u16(), rej.reason()),
                (403, "cors-denied"),
                "{o}"
            );
            assert!(
                r.headers()
                    .keys()
                    .all(|k| !k.as_str().starts_with("access-control-")),
                "{o}"
            );
            assert_eq!(c.allowed_origin(&req(o)), None);
        }
    }

    #[test]
    fn any_origin_without_credentials_is_a_star_and_any_header_echoes_the_request() {
        let c = cors(&["*"], &["*"], false);
        let r = c.preflight(&req("https://anyone.example")).unwrap();
        assert_eq!(r.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(
            r.headers()[ACCESS_CONTROL_ALLOW_HEADERS],
            "content-type, x-trace"
        );
        let mut resp = HeaderMap::new();
        c.mark(
            &mut resp,
            c.allowed_origin(&req("https://anyone.example")).unwrap(),
        );
        assert_eq!(resp[ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(resp[ACCESS_CONTROL_EXPOSE_HEADERS], "x-request-id");
        assert!(resp.get(ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
    }
}
