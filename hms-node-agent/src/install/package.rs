//! What the Debian package ships besides the binaries: the units (for `/usr/bin`, under
//! `/lib/systemd/system`) and the conffile `/etc/hms/agent.yaml`, rendered by the same code as
//! `install` so the two never drift. `hms-node-agent package-files --out DIR` writes them for
//! `cargo xtask deb`. Never touches the host: everything goes under the given directory.

use super::*;

/// Where the package puts its units (bookworm's debhelper uses this path too).
pub const PACKAGE_UNIT_DIR: &str = "/lib/systemd/system";

/// Writes the package's units and conffile under `out`; returns the paths written (as
/// installed).
pub fn stage(out: &Path) -> anyhow::Result<Vec<String>> {
    let units = UnitSettings::resolve(&RunArgs::default(), false)?;
    let mut files: Vec<(String, String)> = LISTENERS
        .iter()
        .map(|l| {
            (
                format!("{PACKAGE_UNIT_DIR}/{}", l.unit),
                render_socket(l, &units, &BY_PACKAGE),
            )
        })
        .collect();
    files.push((
        format!("{PACKAGE_UNIT_DIR}/{SERVICE_UNIT}"),
        render_service(&units, &BY_PACKAGE),
    ));
    files.push((CONFIG_PATH.to_string(), render_package_config()));
    for (path, text) in &files {
        let full = under(out, path);
        if let Some(dir) = full.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&full, text.as_bytes(), 0o644)?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}
