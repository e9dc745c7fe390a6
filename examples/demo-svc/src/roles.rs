//! What each demo role answers, and payments-svc's calls to identity-svc, eligibility-svc
//! and (with `--treasury`) the outside treasury.
//! Owns the story's business rules (tiny on purpose); never touches sockets directly.
//!
//! | role        | route            | answer                                              |
//! |-------------|------------------|-----------------------------------------------------|
//! | identity    | GET /verify      | 200 `{"status":"verified"}` for a well-formed userId |
//! | eligibility | GET /check       | 200 `{"status":"eligible"}` for a well-formed userId |
//! | payments    | POST /pay        | 200 approved after both checks, 422 declined, 502 if a check could not be made |
//! |             |                  | with `--treasury URL`: also POSTs the transfer there; its `receiptId` goes into the answer, 502 if it fails |
//! | notify      | POST /sms        | 202 `{"status":"queued"}`                            |
//! | every role  | GET /, /healthz  | its name; `{"status":"ok"}`                          |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::http::request::Parts;
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::{HttpResponse, error};

/// A call to another service that takes longer than this fails the payment with 502 rather
/// than leaving the caller hanging.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Identity,
    Eligibility,
    Payments,
    Notify,
}

impl Role {
    /// The service name, which is also the DNS label callers use (`<name>.svc`).
    pub fn service_name(self) -> &'static str {
        match self {
            Role::Identity => "identity-svc",
            Role::Eligibility => "eligibility-svc",
            Role::Payments => "payments-svc",
            Role::Notify => "notify-svc",
        }
    }
}

pub struct Services {
    role: Role,
    /// payments only: the outside system that moves the money (`--treasury`); none: /pay
    /// approves without calling out, as every test but the demo expects.
    treasury: Option<String>,
    /// Plain HTTP client with the default resolver (getaddrinfo): names go through the
    /// system's DNS path, which the mesh captures.
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Services {
    pub fn new(role: Role, treasury: Option<String>) -> Self {
        Self {
            role,
            treasury,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// The response, plus a note for the request's log line.
    pub async fn answer(&self, req: &Parts, body: Bytes) -> (HttpResponse, String) {
        let path = req.uri.path();
        let no_note = |resp| (resp, String::new());
        match (self.role, path) {
            (_, "/") => no_note(only(
                req,
                Method::GET,
                json!({"service": self.role.service_name(), "role": format!("{:?}", self.role).to_lowercase()}),
                StatusCode::OK,
            )),
            (_, "/healthz") => no_note(only(
                req,
                Method::GET,
                json!({"status": "ok"}),
                StatusCode::OK,
            )),
            (Role::Identity, "/verify") => no_note(lookup(req, "verified", "unknown")),
            (Role::Eligibility, "/check") => no_note(lookup(req, "eligible", "ineligible")),
            (Role::Payments, "/pay") if req.method == Method::POST => self.pay(&body).await,
            (Role::Notify, "/sms") if req.method == Method::POST => no_note(sms(&body)),
            (Role::Payments, "/pay") | (Role::Notify, "/sms") => no_note(error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{path} takes POST with a JSON body"),
            )),
            _ => no_note(error(
                StatusCode::NOT_FOUND,
                format!(
                    "{} has no route {} {path}; try GET /",
                    self.role.service_name(),
                    req.method
                ),
            )),
        }
    }

    /// payments /pay: validate, ask identity-svc and eligibility-svc (by name, concurrently),
    /// then approve or decline.
    async fn pay(&self, body: &[u8]) -> (HttpResponse, String) {
        let request = match parse_object(body, &["userId", "amount"]) {
            Ok(v) => v,
            Err(msg) => return (error(StatusCode::BAD_REQUEST, msg), String::new()),
        };
        let user = request["userId"].as_str().unwrap_or_default();
        let amount = &request["amount"];
        if user.is_empty() {
            let msg = "userId must be a non-empty string";
            return (error(StatusCode::BAD_REQUEST, msg), String::new());
        }
        if !amount.as_f64().is_some_and(|a| a > 0.0) {
            let msg = "amount must be a positive number";
            return (error(StatusCode::BAD_REQUEST, msg), String::new());
        }
        let user_q = encode_query_value(user);
        let (identity, eligibility) = tokio::join!(
            self.check(format!("http://identity-svc.svc/verify?userId={user_q}")),
            self.check(format!("http://eligibility-svc.svc/check?userId={user_q}")),
        );
        let note = format!(
            " identity={} eligibility={}",
            short(&identity),
            short(&eligibility)
        );
        let (identity, eligibility) = match (identity, eligibility) {
            (Ok(i), Ok(e)) => (i, e),
            (Err(err), _) | (_, Err(err)) => {
                return (error(StatusCode::BAD_GATEWAY, err), note);
            }
        };
        let checks = json!({"identity": identity, "eligibility": eligibility});
        let resp = if identity == "verified" && eligibility == "eligible" {
            let payment_id = new_id("pay");
            let mut answer = json!({"status": "approved", "paymentId": payment_id, "userId": user, "amount": amount, "checks": checks});
            if let Some(url) = &self.treasury {
                let transfer = json!({"paymentId": payment_id, "userId": user, "amount": amount});
                match self.transfer(url, transfer).await {
                    Ok(receipt) => answer["treasuryReceipt"] = Value::String(receipt),
                    Err(err) => {
                        let note = format!("{note} treasury=error({err})");
                        return (error(StatusCode::BAD_GATEWAY, err), note);
                    }
                }
            }
            crate::json(StatusCode::OK, answer)
        } else {
            crate::json(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"status": "declined", "userId": user, "checks": checks}),
            )
        };
        (resp, note)
    }

    /// POST the transfer to the treasury, expecting 200 with `{"receiptId": ...}`; the
    /// receipt id or an error that names the URL.
    async fn transfer(&self, url: &str, transfer: Value) -> Result<String, String> {
        let request = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(transfer.to_string())))
            .map_err(|e| format!("bad treasury url {url}: {e}"))?;
        let call = async {
            let resp = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("POST {url} failed: {}", error_chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("POST {url}: reading the answer failed: {e}"))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(format!(
                    "POST {url} answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ));
            }
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["receiptId"].as_str().map(str::to_owned))
                .ok_or_else(|| format!("POST {url} answered without a JSON \"receiptId\""))
        };
        tokio::time::timeout(CHECK_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(format!("POST {url} timed out after {CHECK_TIMEOUT:?}")))
    }

    /// GET `url`, expecting 200 with `{"status": ...}`; the status string or an error that
    /// names the URL.
    async fn check(&self, url: String) -> Result<String, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url}: {e}"))?;
        let call = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url} failed: {}", error_chain(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("GET {url}: reading the answer failed: {e}"))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(format!(
                    "GET {url} answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ));
            }
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_owned))
                .ok_or_else(|| format!("GET {url} answered without a JSON \"status\""))
        };
        tokio::time::timeout(CHECK_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(format!("GET {url} timed out after {CHECK_TIMEOUT:?}")))
    }
}

fn only(req: &Parts, method: Method, body: Value, status: StatusCode) -> HttpResponse {
    if req.method != method {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes {method}", req.uri.path()),
        );
    }
    crate::json(status, body)
}

/// identity /verify and eligibility /check: `?userId=...`; a well-formed id passes.
fn lookup(req: &Parts, yes: &str, no: &str) -> HttpResponse {
    if req.method != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} takes GET ?userId=...", req.uri.path()),
        );
    }
    let Some(user) = query_param(req.uri.query().unwrap_or(""), "userId") else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("missing query parameter: {}?userId=...", req.uri.path()),
        );
    };
    let status = if valid_user_id(&user) { yes } else { no };
    crate::json(StatusCode::OK, json!({"userId": user, "status": status}))
}

/// notify /sms: `{"userId", "msg"}` -> 202 queued.
fn sms(body: &[u8]) -> HttpResponse {
    let request = match parse_object(body, &["userId", "msg"]) {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let (Some(user), Some(msg)) = (request["userId"].as_str(), request["msg"].as_str()) else {
        return error(StatusCode::BAD_REQUEST, "userId and msg must be strings");
    };
    if user.is_empty() || msg.is_empty() {
        return error(StatusCode::BAD_REQUEST, "userId and msg must not be empty");
    }
    crate::json(
        StatusCode::ACCEPTED,
        json!({"status": "queued", "to": user, "messageId": new_id("sms"), "chars": msg.chars().count()}),
    )
}

/// A JSON object with the given fields present, or a message saying what is wrong.
fn parse_object(body: &[u8], fields: &[&str]) -> Result<Value, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("malformed JSON body: {e}; send e.g. {}", example(fields)))?;
    if !value.is_object() {
        return Err(format!(
            "the body must be a JSON object like {}",
            example(fields)
        ));
    }
    if let Some(missing) = fields.iter().find(|f| value.get(**f).is_none()) {
        return Err(format!(
            "missing field \"{missing}\"; send e.g. {}",
            example(fields)
        ));
    }
    Ok(value)
}

fn example(fields: &[&str]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|f| match *f {
            "amount" => format!("\"{f}\":500"),
            _ => format!("\"{f}\":\"...\""),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// For the log line: the check's answer, or the whole error so the log says why.
fn short(result: &Result<String, String>) -> String {
    match result {
        Ok(status) => status.clone(),
        Err(err) => format!("error({err})"),
    }
}

/// Includes the causes: hyper's top-level error ("client error (Connect)") alone hides
/// whether DNS or the connection failed.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn valid_user_id(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Unique enough for a demo: time plus a per-process counter.
fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:012x}", (nanos >> 8) ^ n)
}

/// Percent-encodes everything except RFC 3986 unreserved characters.
fn encode_query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The decoded value of `name` in a query string (`+` and `%XX` decoded).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (_, Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (other, None) => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        let odd = "HUD 123&x=ü";
        let query = format!("a=1&userId={}", encode_query_value(odd));
        assert_eq!(query_param(&query, "userId").as_deref(), Some(odd));
        assert_eq!(query_param("userId=A+B", "userId").as_deref(), Some("A B"));
        assert_eq!(query_param("user=1", "userId"), None);
    }

    #[test]
    fn malformed_json_names_the_problem() {
        let err = parse_object(b"{\"userId\":", &["userId", "amount"]).unwrap_err();
        assert!(err.starts_with("malformed JSON body"), "{err}");
        let err = parse_object(b"{\"userId\":\"HUD123\"}", &["userId", "amount"]).unwrap_err();
        assert!(err.contains("missing field \"amount\""), "{err}");
    }

    #[test]
    fn sms_is_queued_for_a_good_request_and_refused_for_a_bad_one() {
        let ok = sms(br#"{"userId":"HUD123","msg":"Your $500 relief payment is processing."}"#);
        assert_eq!(ok.status(), StatusCode::ACCEPTED);
        assert_eq!(sms(b"not json").status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            sms(br#"{"userId":"","msg":"x"}"#).status(),
            StatusCode::BAD_REQUEST
        );
    }
}
