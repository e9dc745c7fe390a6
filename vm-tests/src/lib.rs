//! Harness for tests that need a real kernel: child cgroups, real agent processes, real
//! backends and resolvers on loopback. Runs as root on the host and inside the VM.

pub mod agent;
pub mod backend;
pub mod bins;
pub mod cgroup;
pub mod client;
pub mod grpc;
pub mod ports;
pub mod resolver;
