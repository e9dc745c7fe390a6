//! Harness for tests that need a real kernel: child cgroups, real agent processes, real
//! backends and resolvers on loopback. Runs as root on the host and inside the VM.

pub mod agent;
pub mod attacker;
pub mod backend;
pub mod bench_leftovers;
pub mod bins;
pub mod cgroup;
pub mod client;
pub mod etcd;
pub mod grpc;
pub mod h2_backend;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod nginx;
pub mod old_release;
pub mod old_release_build;
pub mod peer_probe;
pub mod ports;
pub mod resolver;
pub mod tools;
pub mod websocket;

/// True inside `cargo xtask vm-test`'s VM, where software emulation makes everything several
/// times slower.
pub fn in_vm() -> bool {
    std::env::var_os("HMS_IN_VM").is_some()
}

/// A wall-clock bound for a test: as given on a real machine, three times as long in the
/// emulated VM. Behaviour is asserted either way; only the clock is forgiving.
pub fn slack(d: std::time::Duration) -> std::time::Duration {
    if in_vm() { d * 3 } else { d }
}
