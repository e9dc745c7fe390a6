//! The pieces of `hms-ctl` that the agent shares: the admin API's wire types ([`api`]), the
//! service spec format and its validation ([`spec`]) and the admin socket client ([`client`]).
//! They live here (not in the agent) so the CLI stays free of the agent's eBPF and proxy
//! dependencies while both sides use one definition.

pub mod api;
pub mod client;
pub mod escape;
pub mod gateway;
pub mod spec;
