//! What goes into the VM's root file system (the initramfs), and writing it out. Owns the
//! tree: parent directories, Debian's merged-/usr symlinks, host programs with every shared
//! library `ldd` names (placed where the dynamic loader looks), busybox and its applet links,
//! small generated files. Never decides which programs the tests need (`vmtest` does) or
//! what /init does (`vm_init`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

use crate::tools;
use crate::vm_cpio::{Member, Writer};

enum Entry {
    Dir,
    /// Contents read from a host file when the archive is written.
    HostFile {
        src: PathBuf,
        mode: u32,
    },
    Data {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
}

/// The tree, keyed by path relative to `/` (sorted, so parents come before children).
#[derive(Default)]
pub struct Rootfs {
    entries: BTreeMap<String, Entry>,
}

/// Debian 12 is merged-/usr: /bin, /sbin, /lib, /lib64 are links into /usr. Mirroring that
/// lets paths from `ldd` (`/lib/x86_64-linux-gnu/...`) and from scripts (`/bin/sh`) resolve.
const MERGED_USR: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];

impl Rootfs {
    pub fn new() -> Self {
        let mut fs = Self::default();
        for (link, target) in MERGED_USR {
            fs.dir(&format!("/{target}"));
            fs.entries
                .insert((*link).to_owned(), Entry::Symlink((*target).to_owned()));
        }
        fs
    }

    /// `/lib/x/y` -> `usr/lib/x/y`: the key under which a path is stored.
    fn key(path: &str) -> String {
        let rel = path.trim_start_matches('/');
        for (link, target) in MERGED_USR {
            if rel == *link {
                return (*target).to_owned();
            }
            if let Some(rest) = rel.strip_prefix(&format!("{link}/")) {
                return format!("{target}/{rest}");
            }
        }
        rel.to_owned()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&Self::key(path))
    }

    /// Creates `path` and its parents.
    pub fn dir(&mut self, path: &str) {
        let key = Self::key(path);
        let mut so_far = String::new();
        for part in key.split('/').filter(|p| !p.is_empty()) {
            if !so_far.is_empty() {
                so_far.push('/');
            }
            so_far.push_str(part);
            self.entries.entry(so_far.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent_dir(&mut self, key: &str) {
        if let Some((parent, _)) = key.rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// A host file at `path` inside, keeping its permission bits.
    pub fn host_file(&mut self, path: &str, src: &Path) -> anyhow::Result<()> {
        let meta = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
        let key = Self::key(path);
        self.parent_dir(&key);
        self.entries.insert(
            key,
            Entry::HostFile {
                src: src.to_path_buf(),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(())
    }

    pub fn data(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        let key = Self::key(path);
        self.parent_dir(&key);
        self.entries.insert(
            key,
            Entry::Data {
                data: data.into(),
                mode,
            },
        );
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let key = Self::key(path);
        self.parent_dir(&key);
        self.entries.insert(key, Entry::Symlink(target.to_owned()));
    }

    /// A host program or library at the same path inside, plus every library it loads.
    pub fn elf_with_libs(&mut self, path: &Path) -> anyhow::Result<()> {
        self.elf_at(path, path)
    }

    /// A host ELF file `src` placed at `inside`, plus every library it loads.
    pub fn elf_at(&mut self, inside: &Path, src: &Path) -> anyhow::Result<()> {
        self.host_file(&inside.to_string_lossy(), src)?;
        for lib in shared_libs(src)? {
            if !self.contains(&lib.to_string_lossy()) {
                self.host_file(&lib.to_string_lossy(), &lib)?;
            }
        }
        Ok(())
    }

    /// A host directory tree (files, links, dirs) at the same path inside, skipping entries
    /// whose name is in `skip`. Shared objects in it get their libraries too.
    pub fn host_tree(&mut self, dir: &Path, skip: &[&str]) -> anyhow::Result<()> {
        self.dir(&dir.to_string_lossy());
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            if skip.iter().any(|s| name.to_str() == Some(*s)) {
                continue;
            }
            let kind = entry.file_type()?;
            let inside = path.to_string_lossy().into_owned();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                self.symlink(&inside, &target.to_string_lossy());
            } else if kind.is_dir() {
                self.host_tree(&path, skip)?;
            } else if path.extension().is_some_and(|e| e == "so") {
                self.elf_with_libs(&path)?;
            } else {
                self.host_file(&inside, &path)?;
            }
        }
        Ok(())
    }

    /// Busybox as `/usr/bin/busybox` plus a link for each applet that no real program
    /// already occupies (so `bash`, `curl` etc. stay the real ones). Call it last.
    pub fn busybox(&mut self, busybox: &Path) -> anyhow::Result<()> {
        self.elf_at(Path::new("/usr/bin/busybox"), busybox)?;
        let list = tools::command("busybox")
            .arg("--list-full")
            .output()
            .with_context(|| format!("running `{} --list-full`", busybox.display()))?;
        if !list.status.success() {
            bail!("`{} --list-full` failed", busybox.display());
        }
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if applet.is_empty() || self.contains(applet) {
                continue;
            }
            self.symlink(applet, "/usr/bin/busybox");
        }
        Ok(())
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write_cpio(&self, path: &Path) -> anyhow::Result<u64> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut cpio = Writer::new(BufWriter::with_capacity(1 << 20, file));
        let write_err = || format!("writing {}", path.display());
        for (key, entry) in &self.entries {
            match entry {
                Entry::Dir => cpio.add(Member::Dir {
                    path: key,
                    mode: 0o755,
                }),
                Entry::Symlink(target) => cpio.add(Member::Symlink { path: key, target }),
                Entry::Data { data, mode } => cpio.add(Member::File {
                    path: key,
                    mode: *mode,
                    data,
                }),
                Entry::HostFile { src, mode } => {
                    let data =
                        std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    cpio.add(Member::File {
                        path: key,
                        mode: *mode,
                        data: &data,
                    })
                }
            }
            .with_context(write_err)?;
        }
        cpio.finish().with_context(write_err)?;
        Ok(std::fs::metadata(path)?.len())
    }
}

/// The libraries (and the dynamic loader) `ldd` says `elf` loads, by the path the loader
/// will look them up under. Statically linked files have none.
fn shared_libs(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = tools::command("ldd")
        .arg(elf)
        .output()
        .context("running ldd (it comes with libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable" (static) is fine; anything else is not.
        let err = String::from_utf8_lossy(&out.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("`ldd {}` failed: {err}{text}", elf.display());
    }
    parse_ldd(&text).with_context(|| format!("reading `ldd {}`", elf.display()))
}

fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("a library is missing on this host: {line}");
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` lives in the kernel.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            libs.push(normalize(Path::new(path)));
        }
    }
    Ok(libs)
}

fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f71)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f71)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn stores_merged_usr_paths_once() {
        let mut fs = Rootfs::new();
        fs.data("/lib/x86_64-linux-gnu/libc.so.6", "x", 0o755);
        assert!(fs.contains("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(fs.contains("/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(fs.contains("/usr/lib/x86_64-linux-gnu"));
        assert!(matches!(fs.entries.get("lib"), Some(Entry::Symlink(t)) if t == "usr/lib"));
    }
}
