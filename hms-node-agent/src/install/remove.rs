//! `uninstall`: stop every agent, detach and unpin, remove every file install wrote, and on
//! `--purge` the state, with the CA's keys moved to a backup first. Never writes config.

use super::*;

#[derive(Debug, Default)]
pub struct UninstallReport {
    pub root: PathBuf,
    pub systemd: Vec<String>,
    pub stopped: Vec<i32>,
    pub cleanup: Option<String>,
    pub removed: Vec<String>,
    pub notes: Vec<String>,
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !is_host_root(&self.root) {
            writeln!(f, "uninstalling from {}", self.root.display())?;
        }
        for line in &self.systemd {
            writeln!(f, "  ran      {line}")?;
        }
        for pid in &self.stopped {
            writeln!(f, "  stopped  agent pid {pid}")?;
        }
        if let Some(c) = &self.cleanup {
            writeln!(f, "  {c}")?;
        }
        for path in &self.removed {
            writeln!(f, "  removed  {path}")?;
        }
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

/// `hms-node-agent uninstall`.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<UninstallReport> {
    let root = args.root.as_path();
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    let host = is_host_root(root);
    let mut report = UninstallReport {
        root: root.to_path_buf(),
        ..UninstallReport::default()
    };
    // The installed settings say where the pins and state are.
    let config_path = under(root, CONFIG_PATH);
    let installed = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| parse_config(&t, &config_path).ok())
        .unwrap_or_default();
    // The CA's root keys leave the state dir only when the operator says so, before
    // anything is stopped or removed.
    if args.purge && !args.purge_ca_keys {
        let state = installed
            .state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let ca = under(root, &state.to_string_lossy()).join(crate::identity::CA_DIR);
        if ca.is_dir() {
            bail!(
                "this host holds the mesh CA's root keys ({}/{}); nothing was changed. Every host's \
                 trust in the mesh depends on them: save a copy with `hms-ctl ca backup --out FILE` \
                 first, then run `hms-node-agent uninstall --purge --purge-ca-keys` (the keys are \
                 moved to {CA_BACKUP_DIR}/hms-ca-<time>, 0700), or uninstall without --purge",
                state.display(),
                crate::identity::CA_DIR
            );
        }
    }

    // 1. Nothing running: the units, then any agent started by hand from the installed binary.
    if host && systemd_running() {
        let mut disable = vec!["disable", "--now"];
        disable.extend(enable_list());
        if let Err(e) = systemctl(&disable, &mut report.systemd) {
            report.notes.push(format!("warning: {e:#}"));
        }
    }
    report.stopped = stop_agents(&under(root, AGENT_BIN))?;

    // 2. Nothing attached or pinned.
    let pin_dir = match (&args.pin_dir, host) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(
            installed
                .pin_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_PIN_DIR.into()),
        ),
        (None, false) => None,
    };
    match pin_dir {
        Some(p) => {
            let r = crate::redirect::cleanup(&p)?;
            report.cleanup = Some(r.to_string());
        }
        None => report.notes.push(
            "kernel cleanup skipped: --root is not /, so the host's pins are left alone (pass --pin-dir to clean one)"
                .into(),
        ),
    }

    // 3. No file.
    let manifest = Manifest::read(root);
    let mut files: Vec<String> = vec![
        AGENT_BIN.into(),
        CTL_BIN.into(),
        SVC_LINK.into(),
        CONFIG_PATH.into(),
        format!("{UNIT_DIR}/{SERVICE_UNIT}"),
    ];
    files.extend(LISTENERS.iter().map(|l| format!("{UNIT_DIR}/{}", l.unit)));
    for (p, _) in &manifest.files {
        if !files.contains(p) {
            files.push(p.clone());
        }
    }
    files.push(MANIFEST_PATH.into());
    for f in &files {
        let full = under(root, f);
        match std::fs::remove_file(&full) {
            Ok(()) => report.removed.push(f.clone()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", full.display())),
        }
    }
    if args.purge {
        purge_state(root, &installed, &mut report)?;
    }
    // Directories install created (deepest first), and /etc/hms, if empty.
    let mut dirs = manifest.dirs.clone();
    if !dirs.iter().any(|d| d == CONFIG_DIR) {
        dirs.push(CONFIG_DIR.into());
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for d in dirs {
        let full = under(root, &d);
        if std::fs::remove_dir(&full).is_ok() {
            report.removed.push(format!("{d}/"));
        }
    }
    if host
        && systemd_running()
        && let Err(e) = systemctl(&["daemon-reload"], &mut report.systemd)
    {
        report.notes.push(format!("warning: {e:#}"));
    }
    if !args.purge {
        let state = installed
            .state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        if under(root, &state.to_string_lossy()).exists() {
            report.notes.push(format!(
                "kept the agent's state in {} (registry, certificates); `uninstall --purge` deletes it",
                state.display()
            ));
        }
    }
    Ok(report)
}

/// Deletes the state dir and the runtime dir, refusing paths that are not plainly HMS's.
pub(super) fn purge_state(
    root: &Path,
    installed: &RunArgs,
    report: &mut UninstallReport,
) -> anyhow::Result<()> {
    let state = installed
        .state_dir
        .clone()
        .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
    let looks_ours = |p: &Path| {
        p.is_absolute()
            && p.components().count() > 2
            && p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("hms"))
    };
    if !looks_ours(&state) {
        bail!(
            "not purging state dir {}: its name does not contain `hms`; delete it yourself",
            state.display()
        );
    }
    let full = under(root, &state.to_string_lossy());
    // The mesh's CA keys are never lost to a purge: on the CA's host they move to a backup
    // directory first, and the report says where (purging the last copy of the root keys
    // would end every host's trust in the mesh).
    let ca = full.join(crate::identity::CA_DIR);
    if ca.is_dir() {
        let kept = backup_ca(root, &ca)?;
        report.notes.push(format!(
            "kept the mesh CA's keys (this host is the CA) at {kept}: move them back to \
             {}/{} to restore, or delete them yourself once another host holds the CA",
            state.display(),
            crate::identity::CA_DIR
        ));
    }
    match std::fs::remove_dir_all(&full) {
        Ok(()) => report.removed.push(format!("{}/", state.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", full.display())),
    }
    let socket = installed
        .admin_socket
        .clone()
        .unwrap_or_else(|| hms_ctl::api::DEFAULT_SOCKET.into());
    let full = under(root, &socket.to_string_lossy());
    if std::fs::remove_file(&full).is_ok() {
        report.removed.push(socket.display().to_string());
    }
    if let Some(dir) = socket.parent().filter(|d| looks_ours(d))
        && std::fs::remove_dir(under(root, &dir.to_string_lossy())).is_ok()
    {
        report.removed.push(format!("{}/", dir.display()));
    }
    Ok(())
}

/// Where a purge moves the CA's directory: `/var/backups/hms-ca-<unix seconds>`, mode 0700.
pub(super) const CA_BACKUP_DIR: &str = "/var/backups";

/// Moves the CA directory `ca` into a new backup directory (under `root`); its path as the
/// host sees it.
pub(super) fn backup_ca(root: &Path, ca: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let parent = under(root, CA_BACKUP_DIR);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let (mut name, mut n) = (format!("hms-ca-{stamp}"), 1);
    while parent.join(&name).exists() {
        name = format!("hms-ca-{stamp}-{n}");
        n += 1;
    }
    let dest = parent.join(&name);
    if std::fs::rename(ca, &dest).is_err() {
        // Another file system: copy, then the purge removes the original with the state.
        copy_tree(ca, &dest).with_context(|| {
            format!(
                "backing up the CA from {} to {}",
                ca.display(),
                dest.display()
            )
        })?;
    }
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dest.display()))?;
    Ok(format!("{CA_BACKUP_DIR}/{name}"))
}

pub(super) fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dst = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dst)?;
        } else {
            std::fs::copy(entry.path(), &dst)?;
        }
    }
    Ok(())
}

/// SIGTERM (then, after the drain deadline, SIGKILL) to every `run` process of the installed
/// binary. Returns their pids.
pub(super) fn stop_agents(binary: &Path) -> anyhow::Result<Vec<i32>> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let me = std::process::id() as i32;
    let deleted = format!("{} (deleted)", binary.display());
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(pids);
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe != binary && exe.to_string_lossy() != deleted {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).nth(1) == Some(b"run".as_slice()) {
            pids.push(pid);
        }
    }
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let alive = |pid: i32| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    Ok(pids)
}

pub(super) fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}
