//! The node proxy. `outbound` accepts what the kernel redirected to `--outbound` and carries
//! it to an instance of the service the caller named. Today that is an L4 splice; the HTTP
//! layer (retries, timeouts, breakers, limits) plugs in between accept and dial.

pub mod outbound;
pub mod splice;

pub use outbound::{Outbound, ProxyStats};
