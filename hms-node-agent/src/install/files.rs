//! Files under the install root: the manifest of what install wrote (and its hashes, which
//! tell an edited config from ours), idempotent atomic writes and links, and the directories
//! created on the way. Never decides what to write (`steps`) nor calls systemctl.

use super::*;

/// What install wrote: files (path inside the root, FNV-1a hash of the content) and the
/// directories it created.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Manifest {
    pub(super) files: Vec<(String, u64)>,
    pub(super) dirs: Vec<String>,
}

impl Manifest {
    pub(super) fn parse(text: &str) -> Manifest {
        let mut m = Manifest::default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("file"), Some(hash), Some(path)) => {
                    if let Ok(h) = u64::from_str_radix(hash, 16) {
                        m.files.push((path.to_string(), h));
                    }
                }
                (Some("dir"), Some(path), None) => m.dirs.push(path.to_string()),
                _ => {}
            }
        }
        m
    }

    pub(super) fn render(&self) -> String {
        let mut out = String::from(
            "# Files and directories written by `hms-node-agent install`; `uninstall` removes them.\n",
        );
        for (path, hash) in &self.files {
            let _ = writeln!(out, "file {hash:016x} {path}");
        }
        for dir in &self.dirs {
            let _ = writeln!(out, "dir {dir}");
        }
        out
    }

    pub(super) fn hash_of(&self, path: &str) -> Option<u64> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, h)| *h)
    }

    pub(super) fn read(root: &Path) -> Manifest {
        std::fs::read_to_string(under(root, MANIFEST_PATH))
            .map(|t| Manifest::parse(&t))
            .unwrap_or_default()
    }
}

/// FNV-1a, 64 bit: stable across builds, enough to notice an edit.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `path` (absolute, as on the installed system) inside `root`.
pub(super) fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

pub(super) fn is_host_root(root: &Path) -> bool {
    root.canonicalize()
        .map(|p| p == Path::new("/"))
        .unwrap_or(false)
}

pub(super) fn systemd_running() -> bool {
    Path::new(SYSTEMD_RUNNING).is_dir()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAction {
    Wrote,
    Unchanged,
    /// An edited config left as it is (install ran without settings).
    Kept,
}

pub(super) struct Writer<'a> {
    pub(super) root: &'a Path,
    pub(super) old: Manifest,
    pub(super) new: Manifest,
    pub(super) report: InstallReport,
}

impl Writer<'_> {
    /// Creates the directories leading to `path` that are missing, remembering them.
    pub(super) fn ensure_dir(&mut self, dir: &str) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut cur = Some(Path::new(dir));
        while let Some(d) = cur {
            if d == Path::new("/") || under(self.root, &d.to_string_lossy()).exists() {
                break;
            }
            missing.push(d.to_string_lossy().into_owned());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            let full = under(self.root, &d);
            std::fs::create_dir(&full).with_context(|| format!("creating {}", full.display()))?;
            self.new.dirs.push(d);
        }
        Ok(())
    }

    /// Writes `content` to `path` (atomically, by rename) unless it already holds it.
    pub(super) fn file(
        &mut self,
        path: &str,
        content: &[u8],
        mode: u32,
    ) -> anyhow::Result<FileAction> {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        self.ensure_dir(&dir)?;
        let full = under(self.root, path);
        let action = match std::fs::read(&full) {
            Ok(existing) if existing == content => FileAction::Unchanged,
            _ => {
                write_atomic(&full, content, mode)?;
                FileAction::Wrote
            }
        };
        self.new.files.push((path.to_string(), fnv1a(content)));
        self.report.files.push((path.to_string(), action));
        Ok(action)
    }

    /// A relative symlink `path -> target` (a file name in the same directory).
    pub(super) fn link(&mut self, path: &str, target: &str) -> anyhow::Result<FileAction> {
        let full = under(self.root, path);
        let action = match std::fs::read_link(&full) {
            Ok(t) if t == Path::new(target) => FileAction::Unchanged,
            _ => {
                let tmp = full.with_file_name(".hms-svc.hms-install-tmp");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp)
                    .and_then(|()| std::fs::rename(&tmp, &full))
                    .with_context(|| format!("linking {} -> {target}", full.display()))?;
                FileAction::Wrote
            }
        };
        self.new
            .files
            .push((path.to_string(), fnv1a(target.as_bytes())));
        self.report.files.push((path.to_string(), action));
        Ok(action)
    }
}

pub(super) fn write_atomic(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.hms-install-tmp"));
    let result = (|| -> io::Result<()> {
        std::fs::write(&tmp, content)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        // Rename, not write in place: replaces a running binary without ETXTBSY.
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
