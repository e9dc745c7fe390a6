//! The second kernel the vm-tests boot: Debian's 6.1 (bookworm's stable kernel, the oldest
//! one HMS supports). Owns choosing the package, downloading it once into `target/vm/debs/`,
//! unpacking it into `target/vm/kernel/<package>/`, and picking the kernel modules the tests
//! need (with their dependencies, in load order). Never boots anything (`vm_qemu` does).
//!
//! Debian builds cgroup v2, the bpf syscall, BPF_JIT, CGROUP_BPF, sockmap, bpffs, tmpfs,
//! devtmpfs and loopback networking into the image; the socket-diag families the agent uses to
//! find a UDP socket's cookie (`NETLINK_SOCK_DIAG` for UDP) are modules, so are shipped here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::proc;
use crate::tools;

/// The metapackage whose dependency names the current bookworm 6.1 image.
const META_PACKAGE: &str = "linux-image-amd64";
const SERIES: &str = "linux-image-6.1.";

/// Modules to load in the VM, in the order given (each after its dependencies):
/// inet_diag/udp_diag/tcp_diag serve NETLINK_SOCK_DIAG for inet sockets (the agent looks up
/// UDP socket cookies with it), netlink_diag and unix_diag make `ss` work for debugging, and
/// veth and bridge join the multi-host tests' network namespaces.
pub const MODULES: &[&str] = &[
    "inet_diag",
    "udp_diag",
    "tcp_diag",
    "netlink_diag",
    "unix_diag",
    "veth",
    "bridge",
];

pub struct Kernel {
    /// e.g. `linux-image-6.1.0-56-amd64-unsigned`.
    pub package: String,
    /// e.g. `6.1.0-56-amd64` (what `uname -r` says in the VM).
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `.ko` files in load order.
    pub modules: Vec<PathBuf>,
    /// `lib/modules/<release>` of the unpacked package.
    pub module_dir: PathBuf,
}

/// One download and unpacking at a time: `cargo xtask test` prepares the kernel for both
/// VMs from two threads.
static PREPARING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Downloads (once) and unpacks the kernel package under `vm_dir`.
pub fn prepare(vm_dir: &Path) -> anyhow::Result<Kernel> {
    let _one = PREPARING.lock().unwrap_or_else(|p| p.into_inner());
    let debs = vm_dir.join("debs");
    std::fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = deb(&debs)?;
    let package = deb_package(&deb);
    let root = vm_dir.join("kernel").join(&package);
    let done = root.join(".unpacked");
    if !done.exists() {
        if root.exists() {
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("removing the half-unpacked {}", root.display()))?;
        }
        std::fs::create_dir_all(&root)?;
        println!("vm-test: unpacking {}", deb.display());
        proc::run(tools::command("dpkg-deb").arg("-x").arg(&deb).arg(&root))
            .context("unpacking the kernel package (dpkg-deb comes with dpkg)")?;
        std::fs::write(&done, "")?;
    }
    let (vmlinuz, release) = find_vmlinuz(&root.join("boot"))?;
    let module_dir = root.join("lib/modules").join(&release);
    let modules = resolve_modules(&module_dir, MODULES)?;
    Ok(Kernel {
        package,
        release,
        vmlinuz,
        modules,
        module_dir,
    })
}

/// The cached .deb for the wanted package, downloading it if it is not there yet.
fn deb(debs: &Path) -> anyhow::Result<PathBuf> {
    let wanted = match package_name() {
        Ok(name) => name,
        Err(err) => {
            // No apt metadata (or no apt): a kernel downloaded earlier is as good.
            if let Some(cached) = newest_cached(debs)? {
                println!(
                    "vm-test: could not find the current kernel package ({err:#}); using {}",
                    cached.display()
                );
                return Ok(cached);
            }
            return Err(err);
        }
    };
    if let Some(cached) = cached(debs, &wanted)? {
        println!("vm-test: kernel package cached: {}", cached.display());
        return Ok(cached);
    }
    println!("vm-test: downloading {wanted} (about 70 MB, once)");
    let download = proc::run(
        tools::command("apt-get")
            .args(["download", "-q"])
            .arg(&wanted)
            .current_dir(debs),
    );
    match (download, cached(debs, &wanted)?) {
        (Ok(()), Some(deb)) => Ok(deb),
        (Ok(()), None) => bail!(
            "`apt-get download {wanted}` succeeded but left no {wanted}_*.deb in {}",
            debs.display()
        ),
        (Err(err), _) => {
            if let Some(older) = newest_cached(debs)? {
                println!(
                    "vm-test: download failed ({err:#}); using the older {}",
                    older.display()
                );
                return Ok(older);
            }
            Err(err).context(format!(
                "downloading {wanted}; check that apt can reach deb.debian.org (try `apt-get update`)"
            ))
        }
    }
}

/// `linux-image-6.1.0-56-amd64-unsigned`: what `linux-image-amd64` currently depends on, in
/// its unsigned flavour (same image, no Secure Boot signature, which QEMU does not need).
fn package_name() -> anyhow::Result<String> {
    let out = proc::probe(tools::command("apt-cache").args(["depends", META_PACKAGE]))
        .with_context(|| format!("`apt-cache depends {META_PACKAGE}` failed; is apt installed?"))?;
    pick_image(&out).with_context(|| {
        format!(
            "`apt-cache depends {META_PACKAGE}` names no {SERIES}* image (is this Debian 12 with \
             bookworm in sources.list? try `apt-get update`):\n{out}"
        )
    })
}

fn pick_image(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches(['<']).trim_end_matches(['>']);
        dep.starts_with(SERIES)
            .then(|| format!("{}-unsigned", dep.trim_end_matches("-unsigned")))
    })
}

fn debs_in(debs: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(debs).with_context(|| format!("listing {}", debs.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(SERIES) && name.ends_with(".deb") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn cached(debs: &Path, package: &str) -> anyhow::Result<Option<PathBuf>> {
    Ok(debs_in(debs)?
        .into_iter()
        .find(|p| deb_package(p) == package))
}

fn newest_cached(debs: &Path) -> anyhow::Result<Option<PathBuf>> {
    Ok(debs_in(debs)?.pop())
}

/// `linux-image-6.1.0-56-amd64-unsigned_6.1.192-2_amd64.deb` -> the package name.
fn deb_package(deb: &Path) -> String {
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    name.split('_').next().unwrap_or_default().to_owned()
}

fn find_vmlinuz(boot: &Path) -> anyhow::Result<(PathBuf, String)> {
    for entry in std::fs::read_dir(boot).with_context(|| format!("listing {}", boot.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok((path.clone(), release.to_owned()));
        }
    }
    bail!(
        "no vmlinuz-* in {}; remove that directory's parent and run vm-test again",
        boot.display()
    )
}

/// The `.ko` paths for `wanted` and their dependencies, dependencies first. Built-in modules
/// are skipped. The package ships no modules.dep (depmod writes it at install time), so
/// dependencies come from each module's own `.modinfo` section.
pub fn resolve_modules(module_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let builtin = std::fs::read_to_string(module_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|l| Some(module_name(Path::new(l).file_name()?.to_str()?)))
        .collect();
    let mut index = BTreeMap::new();
    index_modules(&module_dir.join("kernel"), &mut index)?;
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(&module_name(name), &index, &builtin, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    if builtin.contains(name) || !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let path = index.get(name).with_context(|| {
        format!("kernel module {name} is neither built in nor shipped in the kernel package")
    })?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    for dep in modinfo_depends(&bytes) {
        visit(&dep, index, builtin, seen, order)?;
    }
    order.push(path.clone());
    Ok(())
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(stem) = path.file_name().and_then(|n| n.to_str())
            && stem.ends_with(".ko")
        {
            index.insert(module_name(stem), path);
        }
    }
    Ok(())
}

/// `kernel/net/ipv4/udp-diag.ko` -> `udp_diag` (the kernel treats `-` and `_` alike).
fn module_name(file: &str) -> String {
    file.trim_end_matches(".ko").replace('-', "_")
}

/// The `depends=a,b` string from a module's `.modinfo` section (NUL-separated key=value).
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(module_name)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_unsigned_image_the_metapackage_depends_on() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            pick_image(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        assert_eq!(
            pick_image("linux-image-amd64\n  Depends: linux-image-6.12.9-amd64\n"),
            None
        );
    }

    #[test]
    fn reads_module_dependencies_from_modinfo() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=inet_diag,foo-bar\0vermagic=6.1\0";
        assert_eq!(modinfo_depends(ko), ["inet_diag", "foo_bar"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn names_deb_files_by_package() {
        let deb = Path::new("/x/linux-image-6.1.0-56-amd64-unsigned_6.1.192-2_amd64.deb");
        assert_eq!(deb_package(deb), "linux-image-6.1.0-56-amd64-unsigned");
    }
}
