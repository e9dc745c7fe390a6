//! The node proxy. `outbound` accepts what the kernel redirected to `--outbound` and carries
//! it to an instance of the service the caller named: `detect` tells HTTP from the rest,
//! `http` handles HTTP/1.1, HTTP/2 and gRPC per request, `splice` carries everything else;
//! `external` is the endpoint of an external service (egress: the outside system).

pub mod detect;
pub mod external;
pub mod http;
pub mod inbound;
pub mod inbound_http;
pub mod outbound;
pub mod splice;

pub use outbound::{Outbound, ProxyStats};
