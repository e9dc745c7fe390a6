//! Test hosts as network namespaces: a "switch" namespace holding a bridge, and one namespace
//! per host joined to it by a veth pair, each with loopback up and an address in a private
//! test subnet that exists only inside these namespaces. Nothing is configured in the
//! caller's own namespace, so traffic can never leave the machine. Dropping the network
//! deletes every namespace it made (which also removes their interfaces). The links carry
//! IPv4 (`new`) or IPv6 only (`ipv6_only`: no IPv4 address on any link; loopback keeps
//! 127.0.0.1 and ::1 as on every host).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use anyhow::{Context, bail};

use crate::ports;

pub struct TestNet {
    switch: String,
    pub hosts: Vec<TestHost>,
}

pub struct TestHost {
    /// The namespace name (`ip netns exec NAME ...`).
    pub netns: String,
    /// The host's address on its link (10.98.0.i, or fd98::i on an IPv6-only network).
    pub addr: IpAddr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = crate::tools::command("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2; run `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TestNet {
    /// `n` hosts with addresses 10.98.0.1 .. 10.98.0.n/24.
    pub fn new(n: usize) -> anyhow::Result<TestNet> {
        Self::build(n, false, [10, 98, 0])
    }

    /// `n` hosts with addresses A.B.C.1 .. A.B.C.n/24 (e.g. the README's 10.0.0.x; the
    /// namespaces are isolated, so any subnet is private to the test).
    pub fn on_subnet(n: usize, subnet: [u8; 3]) -> anyhow::Result<TestNet> {
        Self::build(n, false, subnet)
    }

    /// `n` hosts with addresses fd98::1 .. fd98::n/64 and no IPv4 on their links.
    pub fn ipv6_only(n: usize) -> anyhow::Result<TestNet> {
        Self::build(n, true, [10, 98, 0])
    }

    fn build(n: usize, ipv6: bool, subnet: [u8; 3]) -> anyhow::Result<TestNet> {
        let tag = format!("hms{}x{}", std::process::id() % 100_000, ports::unique());
        let switch = format!("{tag}-sw");
        let mut net = TestNet {
            switch: switch.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for i in 1..=n {
            let netns = format!("{tag}-h{i}");
            ip(&["netns", "add", &netns])?;
            let addr = if ipv6 {
                IpAddr::V6(Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, i as u16))
            } else {
                IpAddr::V4(Ipv4Addr::new(subnet[0], subnet[1], subnet[2], i as u8))
            };
            net.hosts.push(TestHost {
                netns: netns.clone(),
                addr,
            });
            // Create the pair inside the switch namespace, then move one end to the host.
            let (sw_end, host_end) = (format!("s{i}"), format!("h{i}"));
            ip(&[
                "-n", &switch, "link", "add", &sw_end, "type", "veth", "peer", "name", &host_end,
            ])?;
            ip(&["-n", &switch, "link", "set", &host_end, "netns", &netns])?;
            ip(&["-n", &switch, "link", "set", &sw_end, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &sw_end, "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "link", "set", &host_end, "name", "eth0"])?;
            if ipv6 {
                // nodad: usable at once instead of after duplicate address detection.
                let cidr = format!("{addr}/64");
                ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
            } else {
                let cidr = format!("{addr}/24");
                ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
            }
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// The name of the switch-side interface of host `i` (0-based), for packet captures.
    pub fn switch_port(&self, i: usize) -> (String, String) {
        (self.switch.clone(), format!("s{}", i + 1))
    }
}

impl TestHost {
    /// The host's IPv4 address; panics on an IPv6-only network.
    pub fn ipv4(&self) -> Ipv4Addr {
        match self.addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => panic!("host {} is IPv6-only ({a})", self.netns),
        }
    }

    /// A command that runs inside this host's namespace.
    pub fn command(&self, name: &str) -> Command {
        crate::tools::in_netns(&self.netns, name)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for h in &self.hosts {
            kill_all_in(&h.netns);
            let _ = ip(&["netns", "del", &h.netns]);
        }
        kill_all_in(&self.switch);
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

fn kill_all_in(netns: &str) {
    if let Ok(out) = crate::tools::command("ip")
        .args(["netns", "pids", netns])
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of processes inside our own test namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
