//! The one list of everything outside the workspace that the build, the demo, the bench and
//! the tests run or read: each program, system file and Python module, where Debian puts it
//! and which Debian package provides it. `cargo xtask setup` installs exactly these packages;
//! the tests in `tools_guard` check that each entry really is provided by its package (`dpkg
//! -S`) and that no code spawns a program any other way than through [`command`].
//!
//! Owns the list and the one way to start a listed program. Never decides when a program
//! runs or what it is given. Uses only `std`: vm-tests includes this same file
//! (`#[path]`), so the tests and setup cannot drift apart.
//!
//! Why a list and not PATH: a machine keeps whatever was once installed by hand, so a test
//! that shells out to a program nobody installs passes here and fails on a fresh host. Every
//! listed program is started by its Debian path, which also keeps shims earlier on PATH out
//! (pyenv's `python3` is not Debian's and lacks Debian's Python modules).

#![allow(dead_code)] // xtask and vm-tests each use part of the list.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Who provides an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// A Debian package: the one `dpkg -S PATH` names. Setup installs it.
    Debian(&'static str),
    /// The Rust toolchain the README assumes (rustup); found on PATH.
    Rustup,
    /// Built from crates.io and installed by setup (`cargo install`); found on PATH.
    CargoInstall,
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Run by [`command`].
    Program,
    /// Read by a build script or a test (headers, `.proto` includes, libraries).
    File,
    /// Imported by a Python program a test runs with Debian's `/usr/bin/python3`; `path` is
    /// the module's dotted name.
    PythonModule,
}

#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// What callers ask for (`command("curl")`); for files, a short name.
    pub name: &'static str,
    pub kind: Kind,
    /// Where Debian 12 puts it (merged /usr: `/usr/bin/...`), the module name for Python
    /// modules, or empty for programs found on PATH (rustup's, cargo-installed).
    pub path: &'static str,
    pub provider: Provider,
    /// Who needs it, for the reader and for the guard's messages.
    pub used_by: &'static str,
    /// Copied into the VM's initramfs (`cargo xtask vm-test`) with its libraries.
    pub in_vm: bool,
}

const fn deb(
    name: &'static str,
    kind: Kind,
    path: &'static str,
    package: &'static str,
    used_by: &'static str,
    in_vm: bool,
) -> Tool {
    Tool {
        name,
        kind,
        path,
        provider: Provider::Debian(package),
        used_by,
        in_vm,
    }
}

use Kind::{File, Program, PythonModule};

/// Everything, grouped by who needs it. Packages of a minimal Debian base (coreutils,
/// util-linux, dpkg, apt, libc-bin, bash, mount) are listed too: setup checks them like the
/// rest, and a test that needs one says so here.
// One entry a line: the list reads as a table.
#[rustfmt::skip]
pub const TOOLS: &[Tool] = &[
    // The Rust toolchain (the README's precondition) and what setup builds with it.
    Tool {
        name: "cargo",
        kind: Program,
        path: "",
        provider: Provider::Rustup,
        used_by: "every build",
        in_vm: false,
    },
    Tool {
        name: "rustup",
        kind: Program,
        path: "",
        provider: Provider::Rustup,
        used_by: "setup: the nightly toolchain and rust-src for the eBPF build",
        in_vm: false,
    },
    Tool {
        name: "bpf-linker",
        kind: Program,
        path: "",
        provider: Provider::CargoInstall,
        used_by: "the eBPF build (links the kernel programs)",
        in_vm: false,
    },
    // Build: bpf-linker links against Debian's LLVM 22 (from bookworm's security updates).
    deb("llvm-config", File, "/usr/lib/llvm-22/bin/llvm-config", "llvm-22", "building bpf-linker", false),
    deb("llvm-headers", File, "/usr/include/llvm-22/llvm/Config/llvm-config.h", "llvm-22-dev", "building bpf-linker", false),
    deb("libpolly", File, "/usr/lib/llvm-22/lib/libPolly.a", "libpolly-22-dev", "building bpf-linker (LLVM links Polly)", false),
    deb("zstd.h", File, "/usr/include/zstd.h", "libzstd-dev", "building bpf-linker (LLVM links zstd)", false),
    deb("zlib.h", File, "/usr/include/zlib.h", "zlib1g-dev", "building bpf-linker (LLVM links zlib)", false),
    deb("libxml2", File, "/usr/include/libxml2/libxml/parser.h", "libxml2-dev", "building bpf-linker (LLVM links libxml2)", false),
    deb("cc", Program, "/usr/bin/gcc", "gcc", "build scripts that compile C (ring)", false),
    deb("git", Program, "/usr/bin/git", "git", "upgrade_layout test: checks out the older release it upgrades from", false),
    // Build: etcd-client's build script runs protoc, which needs Google's well-known types
    // (descriptor.proto and friends). Debian's libprotobuf-dev ships them beside protoc's own
    // package; a crate that vendors protoc would download a prebuilt binary at build time.
    deb("protoc", Program, "/usr/bin/protoc", "protobuf-compiler", "etcd-client's build script", false),
    deb("protobuf-includes", File, "/usr/include/google/protobuf/descriptor.proto", "libprotobuf-dev", "protoc's well-known types for etcd-client's build", false),
    // Setup itself.
    deb("apt-get", Program, "/usr/bin/apt-get", "apt", "setup; vm-test fetches the kernel package", false),
    deb("apt-cache", Program, "/usr/bin/apt-cache", "apt", "vm-test: which kernel bookworm's linux-image-amd64 means", false),
    deb("dpkg-query", Program, "/usr/bin/dpkg-query", "dpkg", "setup: is a package installed; the guard test (dpkg -S)", false),
    deb("dpkg-deb", Program, "/usr/bin/dpkg-deb", "dpkg", "vm-test: unpacks the kernel package", false),
    deb("mount", Program, "/usr/bin/mount", "mount", "setup: mounts bpffs when nobody has", false),
    // The demo and the tests: clients, resolvers, the kernel's view.
    deb("bash", Program, "/usr/bin/bash", "bash", "tests: /dev/tcp clients", true),
    deb("sh", Program, "/usr/bin/sh", "dash", "tests: a command `hms-ctl run` execs", true),
    deb("curl", Program, "/usr/bin/curl", "curl", "the demo and the tests: an unmodified HTTP client", true),
    deb("nginx", Program, "/usr/sbin/nginx", "nginx", "tests: a real HTTP/1.1 and h2c backend rotating its connections (keepalive_requests)", false),
    deb("dig", Program, "/usr/bin/dig", "bind9-dnsutils", "tests: DNS queries through the hooks", true),
    deb("getent", Program, "/usr/bin/getent", "libc-bin", "the demo: glibc's resolver path", false),
    deb("bpftool", Program, "/usr/sbin/bpftool", "bpftool", "tests: attached programs and pins", true),
    deb("ip", Program, "/usr/sbin/ip", "iproute2", "tests and bench: network namespaces and veth", true),
    deb("nsenter", Program, "/usr/bin/nsenter", "util-linux", "tests and bench: run inside a network namespace", true),
    deb("unshare", Program, "/usr/bin/unshare", "util-linux", "tests: an unprivileged user's own user and network namespace", true),
    deb("setpriv", Program, "/usr/bin/setpriv", "util-linux", "tests: run as an unprivileged user", true),
    deb("taskset", Program, "/usr/bin/taskset", "util-linux", "bench: pins load and server to cores", false),
    deb("sleep", Program, "/usr/bin/sleep", "coreutils", "xtask's cgroup tests: a process to move and kill", false),
    deb("cp", Program, "/usr/bin/cp", "coreutils", "install test: copies units for systemd-analyze", false),
    deb("python3", Program, "/usr/bin/python3", "python3-minimal", "tests: raw-bytes and keep-alive clients and servers", true),
    deb("python3-stdlib", PythonModule, "http.client", "libpython3.11-stdlib", "tests: Python clients and servers (http.client, http.server)", true),
    deb("python3-socket", PythonModule, "socket", "libpython3.11-minimal", "tests: raw socket clients", true),
    // The real-client matrix (vm-tests/tests/real_clients.rs): runtimes other people wrote,
    // with their defaults. Host-only: too heavy for the VM's initramfs.
    deb("java", Program, "/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "openjdk-17-jre-headless", "real_clients: Java's HttpClient with the JVM's defaults (dual-stack sockets)", false),
    deb("javac", Program, "/usr/lib/jvm/java-17-openjdk-amd64/bin/javac", "openjdk-17-jdk-headless", "real_clients: compiles the Java client in the test's temp dir", false),
    deb("go", Program, "/usr/bin/go", "golang-go", "real_clients: builds a net/http client from the standard library only", false),
    deb("node", Program, "/usr/bin/node", "nodejs", "real_clients: Node's built-in fetch", false),
    deb("h2load", Program, "/usr/bin/h2load", "nghttp2-client", "real_clients: HTTP/2 with prior knowledge, several streams; connection_rotation: HTTP/2 and HTTP/1.1 GET and POST load", false),
    deb("nghttp", Program, "/usr/bin/nghttp", "nghttp2-client", "real_clients: an HTTP/2 prior-knowledge request whose body is checked", false),
    deb("nghttpd", Program, "/usr/sbin/nghttpd", "nghttp2-server", "real_clients: an h2c instance for the HTTP/2 prior-knowledge clients", false),
    deb("python3-grpc", PythonModule, "grpc", "python3-grpcio", "real_clients: grpcio (gRPC C-core) unary and server-streaming calls", false),
    deb("python3-requests", PythonModule, "requests", "python3-requests", "real_clients: Python requests", false),
    deb("promtool", Program, "/usr/bin/promtool", "prometheus", "tests: /metrics passes `promtool check metrics`", true),
    deb("etcd", Program, "/usr/bin/etcd", "etcd-server", "tests and bench: the multi-host registry", true),
    deb("etcdctl", Program, "/usr/bin/etcdctl", "etcd-client", "tests: read the registry as an operator would", true),
    deb("systemd-socket-activate", Program, "/usr/bin/systemd-socket-activate", "systemd", "tests: socket activation as systemd does it", true),
    deb("systemd-analyze", Program, "/usr/bin/systemd-analyze", "systemd", "install test: `systemd-analyze verify` of the units", false),
    deb("haproxy", Program, "/usr/sbin/haproxy", "haproxy", "bench and its path test: the peer proxy", false),
    // vm-test: the emulator, the guest's init and the initramfs assembly.
    deb("qemu-system-x86_64", Program, "/usr/bin/qemu-system-x86_64", "qemu-system-x86", "vm-test: boots Debian's 6.1 kernel", false),
    deb("busybox", Program, "/usr/bin/busybox", "busybox-static", "vm-test: the guest's /init shell and coreutils", false),
    deb("strip", Program, "/usr/bin/strip", "binutils", "vm-test: drops debug info from copied binaries", false),
    deb("ldd", Program, "/usr/bin/ldd", "libc-bin", "vm-test: the libraries each copied program loads", false),
    // The gateway's door (vm-tests/tests/gateway_door.rs): keys made by OpenSSL, tokens
    // minted by PyJWT (with python3-cryptography for RS256/ES256/EdDSA).
    deb("openssl", Program, "/usr/bin/openssl", "openssl", "gateway_door: RSA, EC and Ed25519 keys for JWTs; CA and client certificates; gateway: `openssl s_client` TLS 1.2-only and TLS 1.3 handshakes", false),
    deb("python3-jwt", PythonModule, "jwt", "python3-jwt", "gateway_door: JWTs minted by PyJWT", false),
    deb("python3-cryptography", PythonModule, "cryptography", "python3-cryptography", "gateway_door: PyJWT's RS256/ES256/EdDSA signing", false),
    deb("python3-ssl", PythonModule, "ssl", "libpython3.11-minimal", "egress: the outside HTTPS system (http.server with ssl, its own CA, TLS 1.2-only too)", false),
    deb("pebble", Program, "/usr/bin/pebble", "pebble", "gateway_acme: a real RFC 8555 server (validation on, nonce rejections on, 30 s certificates)", false),
    // `cargo xtask deb` and `vm-test --system`: the package, its checks, the real Debian guest.
    deb("lintian", Program, "/usr/bin/lintian", "lintian", "deb: checks the hms package against Debian policy", false),
    deb("gzip", Program, "/usr/bin/gzip", "gzip", "deb: the package's changelog.gz", false),
    deb("debootstrap", Program, "/usr/sbin/debootstrap", "debootstrap", "vm-test --system: the guest's Debian 12 root (cached under target/vm-system)", false),
    deb("mkfs.ext4", Program, "/usr/sbin/mkfs.ext4", "e2fsprogs", "vm-test --system: the guest's disk image, made from the root directory", false),
];

/// The listed entry called `name`.
pub fn find(name: &str) -> Option<&'static Tool> {
    TOOLS.iter().find(|t| t.name == name)
}

/// The Debian packages setup installs, each once, in list order.
pub fn debian_packages() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for t in TOOLS {
        if let Provider::Debian(p) = t.provider
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// The programs the VM's initramfs carries, by their Debian paths.
pub fn vm_programs() -> Vec<&'static str> {
    TOOLS
        .iter()
        .filter(|t| t.in_vm && t.kind == Kind::Program)
        .map(|t| t.path)
        .collect()
}

/// Where a listed program is: its Debian path, or for rustup's and cargo-installed programs
/// the first match on PATH (falling back to the bare name, so the spawn error names it).
pub fn program_path(tool: &Tool) -> PathBuf {
    if !tool.path.is_empty() {
        return PathBuf::from(tool.path);
    }
    if tool.name == "cargo"
        && let Some(cargo) = std::env::var_os("CARGO")
    {
        // The cargo that launched us, so a pinned toolchain stays pinned in nested builds.
        return PathBuf::from(cargo);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(tool.name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(tool.name))
}

/// A command for the listed program `name`, started by its Debian path.
///
/// Panics when `name` is not listed: a test (or xtask step) that needs a new program adds it
/// to [`TOOLS`] with its package, so setup installs it on a fresh host. A listed program that
/// is missing on this machine panics with what to run.
pub fn command(name: &str) -> Command {
    Command::new(path_of(name))
}

/// Where the listed program `name` is, for wrappers that take it as an argument (`nsenter --
/// PROGRAM`, `taskset -c 1 PROGRAM`). Panics like [`command`].
pub fn path_of(name: &str) -> PathBuf {
    let Some(tool) = find(name).filter(|t| t.kind == Kind::Program) else {
        panic!(
            "`{name}` is not in the tool list (xtask/src/tools.rs): add it there with the Debian \
             package that provides it, so `cargo xtask setup` installs it on a fresh host"
        );
    };
    let path = program_path(tool);
    if path.is_absolute() && !path.exists() {
        let provider = match tool.provider {
            Provider::Debian(p) => format!("Debian package `{p}`"),
            Provider::Rustup => "the Rust toolchain (rustup)".to_string(),
            Provider::CargoInstall => "`cargo xtask setup`".to_string(),
        };
        panic!(
            "{} is missing (it comes with {provider}; needed by {}): run `cargo xtask setup`",
            path.display(),
            tool.used_by
        );
    }
    path
}

/// Whether the listed program `name` is on this machine (for checks that report rather
/// than panic).
pub fn installed(name: &str) -> bool {
    find(name).is_some_and(|t| {
        let p = program_path(t);
        p.is_absolute() && p.exists()
    })
}

/// A command for one of the workspace's own binaries (hms-node-agent, hms-ctl, demo-svc,
/// grpc-probe, xtask), which the build makes: they need no package.
pub fn workspace_binary(path: impl AsRef<Path>) -> Command {
    Command::new(path.as_ref())
}
