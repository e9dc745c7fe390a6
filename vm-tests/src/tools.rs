//! The programs the tests run. The list itself is xtask's (`xtask/src/tools.rs`, included
//! here as it is), so setup installs exactly what the tests start; this module adds the
//! wrappers the tests need around it. Every external program a test starts goes through
//! [`command`], [`in_netns`] or a cgroup's `command`: a program missing from the list fails
//! the test that calls it, and xtask's `tools_guard` test fails any other way of spawning.

#[path = "../../xtask/src/tools.rs"]
mod list;

use std::path::Path;
use std::process::Command;

pub use list::{Kind, Provider, TOOLS, Tool, command, find, path_of, workspace_binary};

/// `nsenter --net=/run/netns/NS -- PROGRAM`: the listed program `name` inside a network
/// namespace. nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup and
/// bpf filesystems the agent needs.
pub fn in_netns(netns: &str, name: &str) -> Command {
    let mut c = netns_prefix(netns);
    c.arg(path_of(name));
    c
}

/// Like [`in_netns`], for one of the workspace's own binaries.
pub fn binary_in_netns(netns: &str, binary: impl AsRef<Path>) -> Command {
    let mut c = netns_prefix(netns);
    c.arg(binary.as_ref());
    c
}

fn netns_prefix(netns: &str) -> Command {
    let mut c = command("nsenter");
    c.arg(format!("--net=/run/netns/{netns}")).arg("--");
    c
}
