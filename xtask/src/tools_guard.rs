//! The guard around the tool list (`tools.rs`): every entry is really provided by the package
//! it names (asked of dpkg, so a wrong or missing package fails here instead of on a
//! newcomer's fresh host), and the build, the demo, the bench and the tests start programs
//! only through the list, so a program nobody installs cannot slip in. Runs in `cargo xtask
//! test` after setup, like every other test.

use std::path::{Path, PathBuf};

use crate::tools::{self, Kind, Provider, TOOLS, Tool};
use crate::workspace;

/// The crates whose code runs during the build, the demo, the bench or the tests. The
/// agent's and hms-ctl's own spawns (systemctl from `install`, the agent re-executing itself
/// for an upgrade, `hms-ctl run -- CMD`) are the product's, not the test suite's.
const SCANNED: &[&str] = &["xtask", "vm-tests", "examples"];
/// The one file allowed to construct a `std::process::Command` from a program name.
const THE_ONE_PLACE: &str = "xtask/src/tools.rs";

/// `dpkg -S`'s owner of `path`, trying the /bin <-> /usr/bin alias too: on merged-/usr
/// Debian 12, dpkg records many programs under /bin and /sbin.
fn dpkg_owner(path: &str) -> Option<String> {
    let mut candidates = vec![path.to_string()];
    for (usr, root) in [("/usr/bin/", "/bin/"), ("/usr/sbin/", "/sbin/")] {
        if let Some(rest) = path.strip_prefix(usr) {
            candidates.push(format!("{root}{rest}"));
        }
    }
    candidates.iter().find_map(|p| {
        let out = tools::command("dpkg-query").args(["-S", p]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("diversion by"))
            .find_map(|l| l.split_once(": ").map(|(pkg, _)| pkg.to_string()))
            .map(|pkgs| {
                // "libzstd-dev:amd64" -> "libzstd-dev"; "a, b: path" -> "a"
                let first = pkgs.split(", ").next().unwrap_or_default();
                first.split(':').next().unwrap_or_default().to_string()
            })
    })
}

/// The file Debian's python3 loads for `module`.
fn python_module_file(module: &str) -> Result<String, String> {
    let out = tools::command("python3")
        .args([
            "-c",
            "import importlib.util, sys; print(importlib.util.find_spec(sys.argv[1]).origin)",
            module,
        ])
        .output()
        .map_err(|e| format!("running /usr/bin/python3: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check(tool: &Tool) -> Result<(), String> {
    match tool.provider {
        Provider::Debian(package) => {
            let path = match tool.kind {
                Kind::Program | Kind::File => tool.path.to_string(),
                Kind::PythonModule => python_module_file(tool.path)
                    .map_err(|e| format!("Debian's python3 cannot import `{}`: {e}", tool.path))?,
            };
            if !Path::new(&path).exists() {
                return Err(format!(
                    "{path} does not exist; is `{package}` installed (`cargo xtask setup`)?"
                ));
            }
            match dpkg_owner(&path) {
                Some(owner) if owner == package => Ok(()),
                Some(owner) => Err(format!(
                    "{path} belongs to package `{owner}`, but the list says `{package}`"
                )),
                None => Err(format!(
                    "{path} belongs to no Debian package (installed by hand?); the list says `{package}`"
                )),
            }
        }
        Provider::Rustup | Provider::CargoInstall => {
            let path = tools::program_path(tool);
            if path.is_absolute() && path.exists() {
                Ok(())
            } else {
                Err(format!(
                    "`{}` is not on PATH; run `cargo xtask setup`",
                    tool.name
                ))
            }
        }
    }
}

#[test]
fn every_listed_tool_is_provided_by_the_package_it_names() {
    let wrong: Vec<String> = TOOLS
        .iter()
        .filter_map(|t| {
            check(t)
                .err()
                .map(|e| format!("{} ({}): {e}", t.name, t.used_by))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "tool list entries that do not hold:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn tool_names_are_unique_and_programs_run_by_their_debian_path() {
    for (i, t) in TOOLS.iter().enumerate() {
        assert!(
            !TOOLS[..i].iter().any(|o| o.name == t.name),
            "`{}` is listed twice",
            t.name
        );
        if let (Kind::Program | Kind::File, Provider::Debian(_)) = (t.kind, t.provider) {
            assert!(t.path.starts_with('/'), "{}: give its Debian path", t.name);
        }
        if t.in_vm {
            assert!(
                matches!(t.provider, Provider::Debian(_)),
                "{}: only Debian files can be copied into the VM",
                t.name
            );
        }
    }
}

/// Every `.rs` file below the scanned crates, with its path relative to the workspace.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                out.push((rel, std::fs::read_to_string(&p).unwrap_or_default()));
            }
        }
    }
    let root: PathBuf = workspace::root();
    let mut out = Vec::new();
    for krate in SCANNED {
        walk(&root.join(krate), &root, &mut out);
    }
    out
}

/// Lines that build a `Command` from a program other than through the tool list.
fn stray_spawns(file: &str, text: &str) -> Vec<String> {
    if file == THE_ONE_PLACE {
        return Vec::new();
    }
    // Spelled in pieces so that this file does not match itself.
    let forbidden = [
        concat!("Command", "::new("),
        concat!("Command", "::from("),
        concat!("exec", "vp("),
        concat!("exec", "v("),
    ];
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter(|(_, l)| forbidden.iter().any(|f| l.contains(f)))
        .filter(|(_, l)| !l.contains(concat!("Metadata", "Command", "::new(")))
        .map(|(i, l)| format!("{file}:{}: {}", i + 1, l.trim()))
        .collect()
}

/// Program names the code asks the list for (`command("curl")`, `path_of("python3")`,
/// `in_netns(ns, "etcd")`, `installed("taskset")`, a cgroup's `.command("dig")`).
fn requested_programs(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for marker in ["command(\"", "path_of(\"", "installed(\""] {
        let mut rest = text;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            if let Some(end) = rest.find('"') {
                names.push(rest[..end].to_string());
            }
        }
    }
    for marker in ["in_netns(", "command_in("] {
        let mut rest = text;
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let call = &rest[..rest.find(')').unwrap_or(rest.len())];
            if let Some((_, second)) = call.split_once(',')
                && let Some(lit) = second.trim().strip_prefix('"')
                && let Some(end) = lit.find('"')
            {
                names.push(lit[..end].to_string());
            }
        }
    }
    names
}

#[test]
fn programs_are_started_only_through_the_tool_list() {
    let files = sources();
    assert!(
        files.iter().any(|(f, _)| f == THE_ONE_PLACE),
        "the scan found no {THE_ONE_PLACE}: it is not looking where the code is"
    );
    let stray: Vec<String> = files.iter().flat_map(|(f, t)| stray_spawns(f, t)).collect();
    assert!(
        stray.is_empty(),
        "programs started outside the tool list (use tools::command(\"name\") with an entry in \
         {THE_ONE_PLACE}, or tools::workspace_binary for the workspace's own):\n  {}",
        stray.join("\n  ")
    );
    let unlisted: Vec<String> = files
        .iter()
        // This file's markers and examples are not requests.
        .filter(|(f, _)| f != "xtask/src/tools_guard.rs")
        .flat_map(|(f, t)| {
            requested_programs(t)
                .into_iter()
                .filter(|n| tools::find(n).is_none_or(|t| t.kind != Kind::Program))
                .map(move |n| format!("{f}: `{n}`"))
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "programs asked for but not in the tool list ({THE_ONE_PLACE}):\n  {}",
        unlisted.join("\n  ")
    );
}

#[test]
fn the_lint_sees_a_stray_spawn_and_an_unlisted_program() {
    let stray = concat!(
        "fn f() {\n    let o = std::process::Command",
        "::new(\"nc\").output();\n}\n"
    );
    assert_eq!(stray_spawns("vm-tests/tests/x.rs", stray).len(), 1);
    assert!(stray_spawns(THE_ONE_PLACE, stray).is_empty());
    let text = "cg.command(\"nc\"); tools::in_netns(&ns, \"socat\"); path_of(\"curl\")";
    assert_eq!(requested_programs(text), ["nc", "curl", "socat"]);
    assert!(
        tools::find("nc").is_none(),
        "the example must stay unlisted"
    );
}
