//! The mesh's door to the outside: listeners declared by `hms-ctl gateway apply`, TLS with
//! certificates chosen by SNI, routes to `.svc` services through the mesh's own resilience.
//! Inside the mesh the gateway is a caller named `gateway`. What is asked of callers at the
//! door (authentication, per-client limits, CORS, body size) is [`door`]'s.

pub mod door;
