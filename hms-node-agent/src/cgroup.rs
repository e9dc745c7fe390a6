//! Finding the cgroup v2 hierarchy. Owns mountinfo parsing; never creates or removes cgroups
//! of its own (tests and `hms-ctl run` do that through their own helpers).
//!
//! Hosts differ: pure v2 mounts it at `/sys/fs/cgroup`, hybrid hosts at
//! `/sys/fs/cgroup/unified`. We always read `/proc/self/mountinfo` instead of guessing.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mountinfo`.
pub fn v2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to find the cgroup v2 mount")?;
    match v2_root_from_mountinfo(&mountinfo) {
        Some(root) => Ok(root),
        None => bail!(
            "no cgroup2 filesystem is mounted; HMS needs cgroup v2 (mount it with \
             `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with systemd's unified hierarchy)"
        ),
    }
}

/// Parses mountinfo lines: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SRC SUPER`.
pub fn v2_root_from_mountinfo(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where each service's processes run: the spec's `cgroup:` (relative to the v2 root, an
/// absolute path, or a systemd unit), or by default `<hooked cgroup>/<name>`, so that a
/// service started with `hms-ctl run` is both known as itself and redirected when it calls
/// others.
#[derive(Debug, Clone)]
pub struct ServiceCgroups {
    /// The cgroup v2 mount.
    pub root: PathBuf,
    /// The cgroup the agent's hooks are attached to (`--cgroup`).
    pub hooked: PathBuf,
}

impl ServiceCgroups {
    pub fn dir_of(&self, spec: &hms_ctl::spec::ServiceSpec) -> PathBuf {
        match &spec.cgroup {
            Some(c) => crate::resilience::policy::service_cgroup_dir(&self.root, c),
            None => self.hooked.join(&spec.name),
        }
    }
}

/// Why `dir`, the cgroup directory a registry spec gives service `service`, must not be that
/// service's identity: a spec is a registry value any writer could have put there, so one
/// that names the agent's own cgroup or an ancestor of it (the agent's and everything
/// beside it would be the service), or an ancestor of another service's cgroup (that
/// service's processes would be this one too), or a path the spec rules refuse (`/`,
/// `..`, `system.slice`, ...), is refused. None: usable.
pub fn identity_refusal<'a>(
    spec: &hms_ctl::spec::ServiceSpec,
    dir: &Path,
    agent: Option<&Path>,
    others: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Option<String> {
    if let Some(c) = &spec.cgroup
        && let Err(e) = hms_ctl::spec::validate_cgroup(c)
    {
        return Some(e);
    }
    if let Some(agent) = agent
        && agent.starts_with(dir)
    {
        return Some(format!(
            "{} is the agent's own cgroup or an ancestor of it ({})",
            dir.display(),
            agent.display()
        ));
    }
    for (other, other_dir) in others {
        if other != spec.name && other_dir != dir && other_dir.starts_with(dir) {
            return Some(format!(
                "{} is an ancestor of service {other}'s cgroup {}",
                dir.display(),
                other_dir.display()
            ));
        }
    }
    None
}

/// The cgroup v2 directory a process runs in (`/proc/PID/cgroup`, the `0::` line), as a path
/// under `root`.
pub fn cgroup_of_pid(root: &Path, pid: u32) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("process {pid} has no cgroup v2 entry"))?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// The kernel's id of a cgroup v2 directory (what `bpf_get_current_cgroup_id` returns): the
/// directory's inode number.
pub fn cgroup_id(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)
        .with_context(|| format!("reading cgroup directory {}", dir.display()))?
        .ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_above_the_agent_or_another_service_is_no_identity() {
        let spec = |name: &str, cgroup: &str| {
            let mut s = hms_ctl::spec::parse(&format!("name: {name}\nport: 1\n"), "t").unwrap();
            s.cgroup = Some(cgroup.into());
            s
        };
        let agent = Path::new("/sys/fs/cgroup/system.slice/hms-node-agent.service");
        let pay = Path::new("/sys/fs/cgroup/hms/pay");
        let others = [("pay", pay)];
        let check = |s: &hms_ctl::spec::ServiceSpec, dir: &str| {
            identity_refusal(s, Path::new(dir), Some(agent), others)
        };
        // The service's own leaf: fine, also beside another service.
        assert_eq!(
            check(&spec("pay", "hms/pay"), "/sys/fs/cgroup/hms/pay"),
            None
        );
        assert_eq!(
            check(&spec("ledger", "hms/ledger"), "/sys/fs/cgroup/hms/ledger"),
            None
        );
        // Written into the registry past hms-ctl: the root, `..`, a shared slice.
        for (c, dir) in [
            ("/", "/"),
            ("hms/..", "/sys/fs/cgroup/hms/.."),
            ("system.slice", "/sys/fs/cgroup/system.slice"),
        ] {
            assert!(check(&spec("evil", c), dir).is_some(), "{c}");
        }
        // An ancestor of the agent's cgroup that the spec rules do not know by name.
        let e = check(
            &spec("evil", "/sys/fs/cgroup/system.slice/hms-node-agent.service"),
            "/sys/fs/cgroup/system.slice/hms-node-agent.service",
        )
        .unwrap();
        assert!(e.contains("agent's own cgroup"), "{e}");
        // An ancestor of another service's cgroup.
        let e = check(&spec("evil", "hms"), "/sys/fs/cgroup/hms").unwrap();
        assert!(e.contains("service pay's cgroup"), "{e}");
    }

    #[test]
    fn finds_hybrid_unified_mount() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v2_root_from_mountinfo(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_pure_v2_mount_with_optional_fields() {
        let mi = "29 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            v2_root_from_mountinfo(mi),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_v2_mount_is_none() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(v2_root_from_mountinfo(mi), None);
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }
}
