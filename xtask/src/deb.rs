//! `cargo xtask deb`: builds `hms_<version>_amd64.deb` with `dpkg-deb` from files the repo
//! keeps (`xtask/deb/`: control, maintainer scripts, copyright, changelog, lintian
//! overrides) and what the agent renders itself (`hms-node-agent package-files`: the units
//! for /usr/bin and the conffile /etc/hms/agent.yaml, the same code as `install`), then runs
//! lintian on it. Owns the package's layout. Never installs anything on this host.
//!
//! `--bin-dir DIR` packages other binaries (the system VM test's older release) with this
//! tree's packaging; `--pre-notify` then gives the service the unit such a release can run
//! under (`Type=exec`, no `ExecReload`): it never sends READY=1 and dies of SIGHUP.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::{proc, tools, workspace};

pub struct Options {
    /// `release` (what users get) or `dev` (the tests' debug build, stripped).
    pub release: bool,
    /// Package version [default: the workspace's].
    pub version: Option<String>,
    /// Take hms-node-agent and hms-ctl from here instead of building them.
    pub bin_dir: Option<PathBuf>,
    /// The service unit for a release before Type=notify.
    pub pre_notify: bool,
    /// Where the .deb goes [default: target/deb/].
    pub out_dir: Option<PathBuf>,
    pub lintian: bool,
    /// xz the package's contents (what users get); the system VM's packages use gzip -1,
    /// which unpacks several times faster than xz under emulation (lintian refuses none).
    pub compress: bool,
}

/// Builds the package; returns its path.
pub fn build(opts: &Options) -> anyhow::Result<PathBuf> {
    let root = workspace::root();
    let target = workspace::target_dir();
    let profile = if opts.release { "release" } else { "debug" };
    // With --bin-dir the binaries are there already (a `cargo build -p` here would rebuild
    // the agent with other features than the workspace build made it with).
    if opts.bin_dir.is_none() {
        let mut cargo = workspace::cargo();
        cargo.args(["build", "-p", "hms-node-agent", "-p", "hms-ctl", "--bins"]);
        if opts.release {
            cargo.arg("--release");
        }
        proc::run(&mut cargo).context("building the binaries to package")?;
    }
    let own_agent = target.join(profile).join("hms-node-agent");
    if !own_agent.exists() {
        bail!(
            "{} is missing (it renders the package's units): `cargo build --bins{}` first",
            own_agent.display(),
            if opts.release { " --release" } else { "" }
        );
    }
    let bins = opts.bin_dir.clone().unwrap_or_else(|| target.join(profile));
    let version = match &opts.version {
        Some(v) => v.clone(),
        None => workspace_version(&root)?,
    };
    let name = format!("hms_{version}_amd64");
    let out_dir = opts.out_dir.clone().unwrap_or_else(|| target.join("deb"));
    let stage = out_dir.join(format!("{name}.staging"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("removing the old {}", stage.display()))?;
    }
    std::fs::create_dir_all(stage.join("usr/bin"))?;

    // Binaries, stripped: the debug build's are 200 MB each with debug info.
    for bin in ["hms-node-agent", "hms-ctl"] {
        let src = bins.join(bin);
        if !src.is_file() {
            bail!("{} is missing; build it first", src.display());
        }
        let dst = stage.join("usr/bin").join(bin);
        proc::run(
            tools::command("strip")
                .args(["--strip-unneeded", "--remove-section=.comment", "-o"])
                .arg(&dst)
                .arg(&src),
        )
        .with_context(|| format!("stripping {}", src.display()))?;
        set_mode(&dst, 0o755)?;
    }
    std::os::unix::fs::symlink("hms-ctl", stage.join("usr/bin/hms-svc"))?;

    // Units and conffile from the agent's own rendering (always this tree's agent).
    proc::run(
        tools::workspace_binary(&own_agent)
            .arg("package-files")
            .arg("--out")
            .arg(&stage),
    )
    .context("rendering the package's units and conffile")?;
    if opts.pre_notify {
        let path = stage.join("lib/systemd/system/hms-node-agent.service");
        let unit = std::fs::read_to_string(&path)?;
        std::fs::write(&path, pre_notify_unit(&unit))?;
    }

    let keep = root.join("xtask/deb");
    let doc = stage.join("usr/share/doc/hms");
    std::fs::create_dir_all(&doc)?;
    std::fs::copy(keep.join("copyright"), doc.join("copyright"))?;
    let changelog = std::fs::read_to_string(keep.join("changelog"))?
        .replace("@VERSION@", &version)
        .replace("@DATE@", &rfc2822_now()?);
    std::fs::write(doc.join("changelog"), changelog)?;
    proc::run(
        tools::command("gzip")
            .args(["-9n"])
            .arg(doc.join("changelog")),
    )?;
    let overrides = stage.join("usr/share/lintian/overrides");
    std::fs::create_dir_all(&overrides)?;
    std::fs::copy(keep.join("lintian-overrides"), overrides.join("hms"))?;

    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        std::fs::copy(keep.join(script), debian.join(script))?;
        set_mode(&debian.join(script), 0o755)?;
    }
    std::fs::write(debian.join("conffiles"), "/etc/hms/agent.yaml\n")?;
    let control = std::fs::read_to_string(keep.join("control"))?
        .replace("@VERSION@", &version)
        .replace("@INSTALLED_SIZE@", &installed_size_kib(&stage)?.to_string())
        .replace("@DEPENDS@", DEPENDS);
    std::fs::write(debian.join("control"), control)?;
    fix_modes(&stage)?;

    let deb = out_dir.join(format!("{name}.deb"));
    proc::run(
        tools::command("dpkg-deb")
            .arg("--root-owner-group")
            .args(if opts.compress {
                ["-Zxz", "-z1"]
            } else {
                ["-Zgzip", "-z1"]
            })
            .arg("--build")
            .arg(&stage)
            .arg(&deb),
    )
    .context("building the package with dpkg-deb")?;
    std::fs::remove_dir_all(&stage)?;
    if opts.lintian {
        lintian(&deb)?;
    }
    println!("deb: {}", deb.display());
    Ok(deb)
}

/// What the binaries load (`ldd`: libc, libm, libgcc_s); glibc 2.34+ for the Rust std.
const DEPENDS: &str = "libc6 (>= 2.34), libgcc-s1 (>= 4.2)";

/// lintian with errors and warnings fatal; every override in xtask/deb/lintian-overrides
/// says why.
pub fn lintian(deb: &Path) -> anyhow::Result<()> {
    proc::run(
        tools::command("lintian")
            // Not --show-overrides: with it, overridden warnings fail --fail-on too.
            .args(["--fail-on", "error,warning", "--display-info"])
            .arg(deb),
    )
    .context("lintian found problems in the package (fix them, or override one in xtask/deb/lintian-overrides with the reason)")
}

/// The service unit an agent before Type=notify can run under.
pub fn pre_notify_unit(unit: &str) -> String {
    unit.lines()
        .filter(|l| !l.starts_with("ExecReload="))
        .map(|l| if l == "Type=notify" { "Type=exec" } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

pub fn workspace_version(root: &Path) -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && let Some(v) = line.strip_prefix("version") {
            let v = v.trim().trim_start_matches('=').trim().trim_matches('"');
            return Ok(v.to_string());
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// Now as RFC 2822 (`Tue, 01 Dec 2026 13:30:00 +0000`), the changelog's date format.
fn rfc2822_now() -> anyhow::Result<String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    Ok(rfc2822(secs))
}

fn rfc2822(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Directories 0755, files 0644 (executables and maintainer scripts 0755), whatever the
/// umask was.
fn fix_modes(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            set_mode(&path, 0o755)?;
            fix_modes(&path)?;
        } else {
            let exec = meta.permissions().mode() & 0o111 != 0;
            set_mode(&path, if exec { 0o755 } else { 0o644 })?;
        }
    }
    Ok(())
}

fn installed_size_kib(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_dir() {
            total += installed_size_kib(&entry.path())? * 1024;
        } else {
            total += meta.len();
        }
    }
    Ok(total.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pre_notify_unit_is_type_exec_without_reload() {
        let unit = "[Service]\nType=notify\nExecStart=/usr/bin/x\nExecReload=/bin/sh -c \"kill -HUP $MAINPID\"\n";
        assert_eq!(
            pre_notify_unit(unit),
            "[Service]\nType=exec\nExecStart=/usr/bin/x\n"
        );
    }

    #[test]
    fn changelog_dates_are_rfc2822() {
        assert_eq!(rfc2822(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc2822(1_795_095_000), "Thu, 19 Nov 2026 13:30:00 +0000");
    }

    #[test]
    fn the_package_version_is_the_workspace_version() {
        let v = workspace_version(&workspace::root()).unwrap();
        assert!(v.chars().next().unwrap().is_ascii_digit(), "{v}");
    }
}
