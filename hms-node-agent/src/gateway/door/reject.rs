//! The door's answers when it does not let a request in, in the mesh's `x-hms-error` style
//! (status, `x-hms-error: <reason>`, a one-line body that says what to do next). Owns the
//! status, reason and challenge of each refusal; never decides whether to refuse.

use std::time::Duration;

use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::proxy::http::body::{ProxyBody, full};
use crate::proxy::http::errors::X_HMS_ERROR;
use crate::resilience::rate_limit::retry_after_header_secs;

/// Why the door refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 401: no credentials, or credentials that are not valid. `challenge` is the
    /// `WWW-Authenticate` value (RFC 9110 §11.6.1: every 401 carries one).
    Unauthorized {
        reason: &'static str,
        challenge: String,
        message: String,
    },
    /// 403: the caller is known but not accepted here.
    Forbidden {
        reason: &'static str,
        message: String,
    },
    /// 429 with `Retry-After`.
    RateLimited { retry_after: Duration },
    /// 413: the declared body is over the route's `max_body`.
    TooLarge { limit: u64 },
    /// 503: the door cannot check credentials right now (no issuer keys were ever loaded).
    Unavailable {
        reason: &'static str,
        message: String,
    },
}

impl Rejection {
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Unauthorized { reason, .. }
            | Rejection::Forbidden { reason, .. }
            | Rejection::Unavailable { reason, .. } => reason,
            Rejection::RateLimited { .. } => "rate-limited",
            Rejection::TooLarge { .. } => "body-too-large",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Rejection::Forbidden { .. } => StatusCode::FORBIDDEN,
            Rejection::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn message(&self) -> String {
        match self {
            Rejection::Unauthorized { message, .. }
            | Rejection::Forbidden { message, .. }
            | Rejection::Unavailable { message, .. } => message.clone(),
            Rejection::RateLimited { retry_after } => format!(
                "hms: this client is over the route's rate limit; retry in {} s",
                retry_after_header_secs(*retry_after)
            ),
            Rejection::TooLarge { limit } => {
                format!("hms: the request body is over this route's limit of {limit} bytes")
            }
        }
    }

    /// The complete answer.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut r = Response::new(full(format!("{}\n", self.message())));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(X_HMS_ERROR, HeaderValue::from_static(self.reason()));
        match self {
            Rejection::Unauthorized { challenge, .. } => {
                // Challenges are built from the spec's names and fixed texts; a value that
                // is not a header value cannot happen, and would only lose the hint.
                if let Ok(v) = HeaderValue::from_str(challenge) {
                    h.insert(WWW_AUTHENTICATE, v);
                }
            }
            Rejection::RateLimited { retry_after } => {
                h.insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_header_secs(*retry_after)),
                );
            }
            _ => {}
        }
        r
    }
}

/// A quoted-string for a challenge parameter (RFC 9110 §5.6.4): `"` and `\` escaped.
pub fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        // Control characters cannot be in a header value; drop them.
        if !c.is_control() {
            out.push(c);
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_status_reason_and_their_headers() {
        let r = Rejection::Unauthorized {
            reason: "invalid-token",
            challenge: format!(
                "Bearer realm={}, error=\"invalid_token\"",
                quoted("us\"ers")
            ),
            message: "hms: token expired".into(),
        }
        .response();
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()[X_HMS_ERROR], "invalid-token");
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"us\\\"ers\", error=\"invalid_token\""
        );
        let r = Rejection::RateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .response();
        assert_eq!(
            (r.status().as_u16(), &r.headers()[RETRY_AFTER]),
            (429, &HeaderValue::from(2u64))
        );
        assert_eq!(Rejection::TooLarge { limit: 10 }.response().status(), 413);
    }
}
