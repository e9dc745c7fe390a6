//! Answers the mesh itself gives, distinguishable from the service's own: a status code, the
//! header `x-hms-error: <reason>` and a one-line body. gRPC callers get the matching
//! `grpc-status` in a trailers-only response instead, so their client libraries report it.

use std::time::Duration;

use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::body::{ProxyBody, full};

pub const X_HMS_ERROR: &str = "x-hms-error";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshError {
    NoEndpoint,
    ConnectFailed,
    CircuitOpen,
    Timeout,
    RateLimited {
        retry_after: Duration,
    },
    Denied,
    /// The destination host refused this host's claim to call as the caller service: the
    /// operator did not place that service on this host.
    CallerNotPlaced,
    /// The upstream failed mid-exchange (reset, malformed response).
    UpstreamFailed,
}

impl MeshError {
    /// The mesh error another host's agent answered a tunnel request with.
    pub fn from_refusal(status: u16, reason: &str, retry_after: Option<Duration>) -> MeshError {
        match (status, reason) {
            (403, "caller-not-placed") => MeshError::CallerNotPlaced,
            (403, _) => MeshError::Denied,
            (429, _) => MeshError::RateLimited {
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            (503, "circuit-open") => MeshError::CircuitOpen,
            (503, _) => MeshError::NoEndpoint,
            (504, _) => MeshError::Timeout,
            _ => MeshError::ConnectFailed,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            MeshError::NoEndpoint => "no-endpoint",
            MeshError::ConnectFailed => "connect-failed",
            MeshError::CircuitOpen => "circuit-open",
            MeshError::Timeout => "timeout",
            MeshError::RateLimited { .. } => "rate-limited",
            MeshError::Denied => "denied",
            MeshError::CallerNotPlaced => "caller-not-placed",
            MeshError::UpstreamFailed => "upstream-failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::NoEndpoint | MeshError::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::ConnectFailed | MeshError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            MeshError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            MeshError::Denied | MeshError::CallerNotPlaced => StatusCode::FORBIDDEN,
        }
    }

    /// gRPC status code: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, PERMISSION_DENIED.
    fn grpc_status(&self) -> u16 {
        match self {
            MeshError::NoEndpoint
            | MeshError::ConnectFailed
            | MeshError::CircuitOpen
            | MeshError::UpstreamFailed => 14,
            MeshError::Timeout => 4,
            MeshError::RateLimited { .. } => 8,
            MeshError::Denied | MeshError::CallerNotPlaced => 7,
        }
    }

    pub fn response(&self, service: &str, grpc: bool) -> Response<ProxyBody> {
        let message = match self {
            MeshError::NoEndpoint => format!("hms: {service} has no instance to send to"),
            MeshError::ConnectFailed => {
                format!("hms: could not connect to any instance of {service}")
            }
            MeshError::CircuitOpen => {
                format!("hms: every instance of {service} is ejected after failures")
            }
            MeshError::Timeout => format!("hms: {service} did not answer within the route timeout"),
            MeshError::RateLimited { .. } => format!("hms: {service} is rate limited; retry later"),
            MeshError::Denied => format!("hms: this caller is not allowed to call {service}"),
            MeshError::CallerNotPlaced => format!(
                "hms: {service}'s host does not accept this host as the calling service: the service is not placed here (on the CA host: `hms-ctl place SERVICE --on HOSTS`)"
            ),
            MeshError::UpstreamFailed => format!("hms: {service} failed while answering"),
        };
        let mut resp = if grpc {
            let mut r = Response::new(super::body::empty());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&message) {
                r.headers_mut().insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(full(format!("{message}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        resp.headers_mut()
            .insert(X_HMS_ERROR, HeaderValue::from_static(self.reason()));
        if let MeshError::RateLimited { retry_after } = self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_errors_carry_status_reason_and_retry_after() {
        let r = MeshError::RateLimited {
            retry_after: Duration::from_millis(300),
        }
        .response("notify-svc", false);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[X_HMS_ERROR], "rate-limited");
        assert_eq!(r.headers()[RETRY_AFTER], "1");
        let r = MeshError::Timeout.response("a", true);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()[X_HMS_ERROR], "timeout");
    }
}
