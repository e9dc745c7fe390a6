//! Puts `hms-svc`, the seed chapter's name for the CLI, next to the `hms-ctl` binary this
//! build makes (`target/<profile>/hms-svc -> hms-ctl`). hms-ctl reads the name it was called
//! by, so one binary answers to both. Cargo has no notion of a binary alias; a second
//! `[[bin]]` would be a second copy. `install` and packages make the same link.
//!
//! OUT_DIR is `<target>/<profile>/build/hms-ctl-<hash>/out`, so the binaries' directory is
//! three levels up. Writing there is outside OUT_DIR, which is why this does nothing but one
//! relative symlink and never fails the build.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let Some(out) = std::env::var_os("OUT_DIR") else {
        return;
    };
    let Some(bin_dir) = std::path::Path::new(&out).ancestors().nth(3) else {
        return;
    };
    let link = bin_dir.join("hms-svc");
    if std::fs::read_link(&link).is_ok_and(|t| t == std::path::Path::new("hms-ctl")) {
        return;
    }
    let _ = std::fs::remove_file(&link);
    if let Err(e) = std::os::unix::fs::symlink("hms-ctl", &link) {
        println!(
            "cargo::warning=could not link {} -> hms-ctl: {e}",
            link.display()
        );
    }
}
