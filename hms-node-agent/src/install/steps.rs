//! `install`: what it writes, in order (binaries, config, units, manifest), then enabling and
//! starting where systemd runs. Never removes anything (`remove`).

use super::*;

#[derive(Debug, Default)]
pub struct InstallReport {
    pub root: PathBuf,
    /// Paths as on the installed system.
    pub files: Vec<(String, FileAction)>,
    pub systemd: Vec<String>,
    pub notes: Vec<String>,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !is_host_root(&self.root) {
            writeln!(f, "installed into {}", self.root.display())?;
        }
        for (path, action) in &self.files {
            let what = match action {
                FileAction::Wrote => "wrote    ",
                FileAction::Unchanged => "unchanged",
                FileAction::Kept => "kept     ",
            };
            writeln!(f, "  {what} {path}")?;
        }
        for line in &self.systemd {
            writeln!(f, "  ran      {line}")?;
        }
        for note in &self.notes {
            writeln!(f, "{note}")?;
        }
        Ok(())
    }
}

pub(super) fn source_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("finding this executable (/proc/self/exe)")?;
    if exe.to_string_lossy().ends_with(" (deleted)") {
        bail!(
            "{} was replaced or deleted while running; run install from the new binary",
            exe.display()
        );
    }
    let ctl = exe.with_file_name("hms-ctl");
    if !ctl.is_file() {
        bail!(
            "hms-ctl is not next to {} ({} is missing); build both (`cargo build --release --bins`) and run install from there",
            exe.display(),
            ctl.display()
        );
    }
    Ok((exe, ctl))
}

/// The config text to install, and whether it replaces an edited file.
pub(super) fn decide_config(
    root: &Path,
    args: &InstallArgs,
    old: &Manifest,
) -> anyhow::Result<(String, Option<FileAction>)> {
    let path = under(root, CONFIG_PATH);
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file_settings = match &args.settings.config {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading config file {}", file.display()))?;
            Some(parse_config(&text, file)?)
        }
        None => None,
    };
    let given = file_settings.is_some() || !set_values(&args.settings).is_empty();
    if !given && let Some(text) = existing {
        // No settings asked for: keep what is there (edited or not), units follow it.
        parse_config(&text, &path)?;
        return Ok((text, Some(FileAction::Kept)));
    }
    let settings = match &file_settings {
        Some(file) => merge(&args.settings, file)?,
        None => args.settings.clone(),
    };
    let text = render_config(&settings);
    if let Some(existing) = existing
        && existing != text
    {
        let ours = old.hash_of(CONFIG_PATH) == Some(fnv1a(existing.as_bytes()));
        if !ours && !args.force {
            bail!(
                "{} was edited after install (or not written by it) and differs from the \
                 settings given; keep it by running install without settings, or pass --force \
                 to replace it",
                path.display()
            );
        }
    }
    Ok((text, None))
}

/// `hms-node-agent install`.
pub fn install(args: &InstallArgs) -> anyhow::Result<InstallReport> {
    // The join token comes from a file (never argv, where every local user can read it) and
    // goes into the 0600 config file.
    let mut args = args.clone();
    if let Some(path) = args.settings.join_token_file.take() {
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the join token from {}", path.display()))?;
        args.settings.join_token = Some(token.trim().to_string());
    }
    let args = &args;
    let root = args.root.as_path();
    if !root.is_dir() {
        bail!("--root {} is not a directory", root.display());
    }
    if args.settings.takeover {
        bail!(
            "--takeover belongs to `hms-node-agent run` (an upgrade's successor); install does not persist it"
        );
    }
    let host = is_host_root(root);
    let (exe, ctl) = source_binaries()?;
    let old = Manifest::read(root);
    let (config_text, config_action) = decide_config(root, args, &old)?;
    let settings = parse_config(&config_text, Path::new(CONFIG_PATH))?;
    let units = UnitSettings::resolve(&settings, host)?;

    let mut w = Writer {
        root,
        old,
        new: Manifest::default(),
        report: InstallReport {
            root: root.to_path_buf(),
            ..InstallReport::default()
        },
    };
    // Directories created by an earlier install are still ours to remove.
    w.new.dirs = w.old.dirs.clone();

    let mut changed = false;
    for (src, dst) in [(&exe, AGENT_BIN), (&ctl, CTL_BIN)] {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        changed |= w.file(dst, &bytes, 0o755)? == FileAction::Wrote;
    }
    w.link(SVC_LINK, "hms-ctl")?;
    let old_hash = w.old.hash_of(CONFIG_PATH);
    // A join token is a secret: a config that holds one is readable by root only (and stays
    // so when an unchanged file is kept).
    let config_mode = if settings.join_token.is_some() {
        0o600
    } else {
        0o644
    };
    let action = w.file(CONFIG_PATH, config_text.as_bytes(), config_mode)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let path = under(root, CONFIG_PATH);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(config_mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
    }
    changed |= action == FileAction::Wrote;
    if config_action == Some(FileAction::Kept) {
        // An existing config left as it is: edited by the user unless it is what install
        // wrote last time. It keeps the old hash (so settings given later still need --force
        // to replace the edits); one install never wrote is never claimed.
        if old_hash != Some(fnv1a(config_text.as_bytes()))
            && let Some(last) = w.report.files.last_mut()
        {
            last.1 = FileAction::Kept;
        }
        match old_hash {
            Some(h) => {
                if let Some(e) = w.new.files.iter_mut().find(|(p, _)| p == CONFIG_PATH) {
                    e.1 = h;
                }
            }
            None => w.new.files.retain(|(p, _)| p != CONFIG_PATH),
        }
    }
    let mut sockets_changed = false;
    for l in &LISTENERS {
        let a = w.file(
            &format!("{UNIT_DIR}/{}", l.unit),
            render_socket(l, &units, &BY_INSTALL).as_bytes(),
            0o644,
        )?;
        sockets_changed |= a == FileAction::Wrote;
    }
    changed |= sockets_changed;
    changed |= w.file(
        &format!("{UNIT_DIR}/{SERVICE_UNIT}"),
        render_service(&units, &BY_INSTALL).as_bytes(),
        0o644,
    )? == FileAction::Wrote;

    w.ensure_dir(CONFIG_DIR)?;
    let manifest = w.new.render();
    write_atomic(&under(root, MANIFEST_PATH), manifest.as_bytes(), 0o644)?;

    let mut report = w.report;
    let by_hand = format!("{AGENT_BIN} run --config {CONFIG_PATH}");
    if !host {
        report.notes.push(format!(
            "not enabled: --root is not / (on the target host: `systemctl daemon-reload && systemctl enable --now {}`)",
            enable_list().join(" ")
        ));
    } else if !systemd_running() {
        report.notes.push(format!(
            "systemd is not running on this host ({SYSTEMD_RUNNING} is missing): the units are \
             written but not enabled. Start the agent by hand, as root:\n    {by_hand}"
        ));
    } else {
        let was_active = systemctl_quiet(&["is-active", "--quiet", SERVICE_UNIT]);
        systemctl(&["daemon-reload"], &mut report.systemd)?;
        let mut enable = vec!["enable", "--now"];
        enable.extend(enable_list());
        systemctl(&enable, &mut report.systemd)?;
        if was_active && changed {
            // Restart hands over: the socket units keep the listeners open meanwhile.
            systemctl(&["try-restart", SERVICE_UNIT], &mut report.systemd)?;
        }
        if was_active && sockets_changed {
            report.notes.push(format!(
                "listen addresses changed: they take effect after `systemctl stop {SERVICE_UNIT} && systemctl restart {}`",
                LISTENERS.map(|l| l.unit).join(" ")
            ));
        }
        report
            .notes
            .push("enabled and started; `systemctl status hms-node-agent` shows it".into());
    }
    Ok(report)
}

pub(super) fn enable_list() -> Vec<&'static str> {
    let mut v: Vec<&str> = LISTENERS.iter().map(|l| l.unit).collect();
    v.push(SERVICE_UNIT);
    v
}

pub(super) fn systemctl(args: &[&str], log: &mut Vec<String>) -> anyhow::Result<()> {
    let line = format!("systemctl {}", args.join(" "));
    let status = Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running {line}"))?;
    log.push(line.clone());
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

pub(super) fn systemctl_quiet(args: &[&str]) -> bool {
    Command::new("systemctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
