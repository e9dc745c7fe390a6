//! A route's door as the gateway drives it: spec in, `admit`/`finish` decisions out.

use super::*;
use hms_ctl::gateway::door::KeyHash;
use hyper::Request;
use hyper::header::{ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};

use crate::proxy::http::errors::X_HMS_ERROR;

fn spec(yaml: &str) -> (BTreeMap<String, AuthenticatorSpec>, RouteDoorSpec) {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        authenticators: BTreeMap<String, AuthenticatorSpec>,
        route: RouteDoorSpec,
    }
    let d: Doc = serde_saphyr::from_str(yaml).unwrap();
    (d.authenticators, d.route)
}

fn door(yaml: &str) -> RouteDoor {
    let (auths, route) = spec(yaml);
    hms_ctl::gateway::door::validate_authenticators(&auths).unwrap();
    route.validate(&auths).unwrap();
    let auths =
        Authenticators::compile(&auths, Default::default(), &DoorOptions::default()).unwrap();
    RouteDoor::compile("r", &route, &auths).unwrap()
}

fn conn(client: &str) -> ConnInfo {
    ConnInfo {
        client: client.parse().unwrap(),
        tls: false,
        sni: None,
        client_chain: Vec::new(),
    }
}

fn req(method: &str, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
    let mut b = Request::builder().method(method).uri("/x");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn api_key_yaml(extra: &str) -> String {
    format!(
        "authenticators:\n  partners:\n    api_key:\n      keys:\n        acme: {}\nroute:\n  auth: partners\n{extra}",
        KeyHash::of("acme-secret")
    )
}

#[tokio::test]
async fn an_api_key_route_admits_the_key_names_it_and_strips_it_before_the_backend() {
    let d = door(&api_key_yaml(""));
    let parts = req("GET", &[("x-api-key", "acme-secret"), ("x-other", "kept")]);
    let a = d.admit(&parts, &conn("192.0.2.1:5000")).await.unwrap();
    assert_eq!(
        a.subject,
        Some(Subject {
            method: "api-key",
            name: "acme".into()
        })
    );
    let mut headers = parts.headers.clone();
    a.apply(&mut headers);
    assert!(headers.get("x-api-key").is_none());
    assert_eq!(headers["x-other"], "kept");
    // Sent as `Authorization: ApiKey`, the key is removed with its header.
    let parts = req("GET", &[("authorization", "ApiKey acme-secret")]);
    let a = d.admit(&parts, &conn("192.0.2.1:5000")).await.unwrap();
    let mut headers = parts.headers.clone();
    a.apply(&mut headers);
    assert!(headers.get("authorization").is_none());
    // The backend's own Authorization beside an x-api-key is left alone.
    let parts = req(
        "GET",
        &[
            ("x-api-key", "acme-secret"),
            ("authorization", "Basic dTpw"),
        ],
    );
    let a = d.admit(&parts, &conn("192.0.2.1:5000")).await.unwrap();
    let mut headers = parts.headers.clone();
    a.apply(&mut headers);
    assert_eq!(headers["authorization"], "Basic dTpw");

    let r = d
        .admit(&req("GET", &[]), &conn("192.0.2.1:5000"))
        .await
        .unwrap_err();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()[X_HMS_ERROR], "unauthenticated");
    assert!(
        r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("ApiKey ")
    );
    assert_eq!(
        d.metrics
            .refused
            .get_or_create(&metrics::RouteReason {
                route: "r".into(),
                reason: "unauthenticated".into()
            })
            .get(),
        1
    );
}

#[tokio::test]
async fn a_per_key_limit_is_per_key_and_answers_429_with_retry_after() {
    let d = door(&api_key_yaml(
        "  rate_limit: { rate: 1rpm, burst: 2, by: key }\n",
    ));
    let ok = req("GET", &[("x-api-key", "acme-secret")]);
    // Different addresses: the limit follows the key, not the address.
    d.admit(&ok, &conn("192.0.2.1:1")).await.unwrap();
    d.admit(&ok, &conn("192.0.2.2:1")).await.unwrap();
    let r = d.admit(&ok, &conn("192.0.2.3:1")).await.unwrap_err();
    assert_eq!(
        (r.status().as_u16(), &r.headers()[X_HMS_ERROR]),
        (429, &HeaderValue::from_static("rate-limited"))
    );
    let secs: u64 = r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
}

#[tokio::test]
async fn a_per_address_limit_comes_before_authentication() {
    let d = door(&api_key_yaml(
        "  rate_limit: { rate: 1rpm, burst: 1, by: address }\n",
    ));
    let bad = req("GET", &[("x-api-key", "guess")]);
    assert_eq!(
        d.admit(&bad, &conn("192.0.2.9:1"))
            .await
            .unwrap_err()
            .status(),
        401
    );
    // The next guess from that address is not even checked.
    assert_eq!(
        d.admit(&bad, &conn("192.0.2.9:2"))
            .await
            .unwrap_err()
            .status(),
        429
    );
    assert_eq!(
        d.admit(&bad, &conn("192.0.2.10:1"))
            .await
            .unwrap_err()
            .status(),
        401
    );
}

#[tokio::test]
async fn a_declared_body_over_max_body_is_413_and_the_limit_is_there_for_streams() {
    let d = door("route:\n  max_body: 1KiB\n");
    assert_eq!(d.max_body(), Some(1024));
    let r = d
        .admit(
            &req("POST", &[("content-length", "1025")]),
            &conn("192.0.2.1:1"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (r.status().as_u16(), &r.headers()[X_HMS_ERROR]),
        (413, &HeaderValue::from_static("body-too-large"))
    );
    d.admit(
        &req("POST", &[("content-length", "1024")]),
        &conn("192.0.2.1:1"),
    )
    .await
    .unwrap();
    d.admit(&req("POST", &[]), &conn("192.0.2.1:1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn cors_preflight_is_answered_before_auth_and_refusals_and_responses_are_marked() {
    let d = door(&api_key_yaml(
        "  cors: { allow_origins: ['https://shop.example.com'], allow_headers: [x-api-key], allow_credentials: true }\n",
    ));
    let preflight = req(
        "OPTIONS",
        &[
            ("origin", "https://shop.example.com"),
            ("access-control-request-method", "POST"),
        ],
    );
    let r = d.admit(&preflight, &conn("192.0.2.1:1")).await.unwrap_err();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-headers"], "x-api-key");
    let evil = req(
        "OPTIONS",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
    );
    let r = d.admit(&evil, &conn("192.0.2.1:1")).await.unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // A refusal a page can read.
    let r = d
        .admit(
            &req("GET", &[("origin", "https://shop.example.com")]),
            &conn("192.0.2.1:1"),
        )
        .await
        .unwrap_err();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://shop.example.com"
    );
    // An admitted request's response is marked by finish.
    let a = d
        .admit(
            &req(
                "GET",
                &[
                    ("origin", "https://shop.example.com"),
                    ("x-api-key", "acme-secret"),
                ],
            ),
            &conn("192.0.2.1:1"),
        )
        .await
        .unwrap();
    let (mut parts, ()) = hyper::Response::new(()).into_parts();
    d.finish(&a, &mut parts);
    assert_eq!(
        parts.headers["access-control-allow-origin"],
        "https://shop.example.com"
    );
    assert_eq!(parts.headers["access-control-allow-credentials"], "true");
    // Another origin's actual request passes (servers don't do CORS) but is not marked.
    let a = d
        .admit(
            &req(
                "GET",
                &[
                    (ORIGIN.as_str(), "https://evil.example"),
                    ("x-api-key", "acme-secret"),
                ],
            ),
            &conn("192.0.2.1:1"),
        )
        .await
        .unwrap();
    let (mut parts, ()) = hyper::Response::new(()).into_parts();
    d.finish(&a, &mut parts);
    assert!(parts.headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn a_route_without_door_fields_admits_everyone_unchanged() {
    let d = RouteDoor::default();
    let a = d
        .admit(&req("GET", &[("x-api-key", "x")]), &conn("[2001:db8::1]:1"))
        .await
        .unwrap();
    assert!(a.subject.is_none() && a.remove_headers.is_empty() && a.add_headers.is_empty());
    assert_eq!(d.max_body(), None);
}

#[tokio::test]
async fn one_route_on_two_listeners_counts_a_client_once() {
    let (auths, route) = spec("route:\n  rate_limit: { rate: 1rpm, burst: 2, by: address }\n");
    let auths =
        Authenticators::compile(&auths, Default::default(), &DoorOptions::default()).unwrap();
    let on_http = RouteDoor::compile("r", &route, &auths).unwrap();
    let on_https = RouteDoor::compile("r", &route, &auths).unwrap();
    let c = conn("192.0.2.1:1");
    on_http.admit(&req("GET", &[]), &c).await.unwrap();
    on_https.admit(&req("GET", &[]), &c).await.unwrap();
    assert_eq!(
        on_http
            .admit(&req("GET", &[]), &c)
            .await
            .unwrap_err()
            .status(),
        429
    );
    assert_eq!(
        on_https
            .admit(&req("GET", &[]), &c)
            .await
            .unwrap_err()
            .status(),
        429
    );
}
