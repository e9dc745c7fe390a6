//! Upgrading the agent without closing a listening socket:
//! 1. the running agent (on `hms-ctl agent upgrade` or SIGUSR2) starts its own binary again
//!    with the same flags plus `--takeover`;
//! 2. the successor asks the running agent, over the admin socket, for its listeners and
//!    receives duplicates of their fds (SCM_RIGHTS); both now accept on the same sockets, so
//!    no connection is refused or lost in between;
//! 3. the successor adopts the pinned eBPF programs, takes over the admin socket path and
//!    confirms; the old agent then stops accepting, drains its in-flight work and exits.
//!
//! This module owns the wire protocol of steps 2-3 (both sides); it never touches eBPF.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most fds a hand-over carries: the node proxy's (at most 8) and the gateway's
/// listeners. Far below the kernel's SCM_MAX_FD (253).
pub const MAX_FDS: usize = 64;

/// The successor's side: holds the connection to the old agent until [`Successor::confirm`].
pub struct Successor {
    stream: BufReader<UnixStream>,
}

/// Step 2 on the successor: connect to the running agent and receive its listeners.
pub fn request_listeners(
    admin_socket: &Path,
) -> anyhow::Result<(Successor, HashMap<String, OwnedFd>)> {
    let stream = UnixStream::connect(admin_socket).with_context(|| {
        format!(
            "--takeover: no running agent answers at {} to hand its listeners over",
            admin_socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(b"{\"op\":\"handover\"}\n")?;
    let mut data = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut data)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving the listeners from the running agent")?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().context("reading the passed fds")? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just installed these fds in our table for us.
                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    let line = String::from_utf8_lossy(&data[..n]);
    let names: Vec<String> = match serde_json::from_str::<hms_ctl::api::Response>(line.trim()) {
        Ok(hms_ctl::api::Response::Ok { data }) => serde_json::from_value(data)
            .context("the running agent's hand-over answer has no socket names")?,
        Ok(hms_ctl::api::Response::Error { message }) => {
            bail!("the running agent refused the hand-over: {message}")
        }
        Err(e) => bail!(
            "the running agent's hand-over answer is not understood ({e}); is it an older version without hand-over?"
        ),
    };
    if names.len() != fds.len() {
        bail!(
            "the running agent named {} sockets but passed {}",
            names.len(),
            fds.len()
        );
    }
    let stream = BufReader::new(stream);
    Ok((Successor { stream }, names.into_iter().zip(fds).collect()))
}

impl Successor {
    /// Step 3: tell the old agent to stop accepting and drain; returns once it agreed, and
    /// whether it told systemd that this process is the unit's main process now (an older
    /// agent does not say, and did not).
    pub fn confirm(mut self) -> anyhow::Result<bool> {
        self.stream
            .get_mut()
            .write_all(b"{\"op\":\"handover_done\"}\n")?;
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .context("waiting for the old agent to start draining")?;
        match serde_json::from_str::<hms_ctl::api::Response>(line.trim()) {
            Ok(hms_ctl::api::Response::Ok { data }) => {
                Ok(data["main_pid_sent"].as_bool().unwrap_or(false))
            }
            _ => bail!("the old agent did not confirm the hand-over: {line}"),
        }
    }
}

/// Step 2 on the running agent: send `fds` with their names as one message.
pub fn send_listeners(stream: RawFd, fds: &[(String, OwnedFd)]) -> anyhow::Result<()> {
    if fds.len() > MAX_FDS {
        bail!(
            "{} listeners to hand over; a hand-over carries at most {MAX_FDS}",
            fds.len()
        );
    }
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let mut line = serde_json::to_vec(&hms_ctl::api::Response::Ok {
        data: serde_json::json!(names),
    })?;
    line.push(b'\n');
    let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let iov = [IoSlice::new(&line)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    // The admin socket is non-blocking; one small message fits its buffer, retry briefly if
    // not.
    for _ in 0..100 {
        match sendmsg::<()>(stream, &iov, &cmsg, MsgFlags::empty(), None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e).context("passing the listeners to the successor"),
        }
    }
    bail!("the successor did not read the hand-over message")
}

/// How to start a successor: this binary (as it is on disk now, so an upgrade runs the new
/// build) with the flags this agent was started with, plus `--takeover`.
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl Relaunch {
    pub fn from_current_process() -> anyhow::Result<Relaunch> {
        let mut args: Vec<String> = std::env::args().collect();
        let argv0 = args.remove(0);
        // current_exe() follows /proc/self/exe, which points at the *old* inode after the
        // binary was replaced; argv[0] resolved now names the path, which will hold the new
        // build.
        let program = match std::fs::canonicalize(&argv0) {
            Ok(p) => p,
            Err(_) => std::env::current_exe().context("finding the agent's own binary")?,
        };
        if !args.iter().any(|a| a == "--takeover") {
            args.push("--takeover".into());
        }
        Ok(Relaunch { program, args })
    }

    /// Starts the successor; it outlives this process. Under systemd the process started
    /// here forks and exits at once (`service_manager::leave_predecessor_tree`); it is
    /// reaped here, and the successor's own pid is the hand-over connection's peer.
    pub fn spawn(&self) -> anyhow::Result<u32> {
        let mut child = std::process::Command::new(&self.program)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting the successor {}", self.program.display()))?;
        let pid = child.id();
        std::thread::spawn(move || child.wait());
        Ok(pid)
    }
}
