//! The demo's gateway chapter: the survivor's form arrives from outside over HTTPS, with an
//! API key, and the gateway sends it to payments-svc.svc through the mesh. Owns the demo's
//! certificate (made with openssl), its API key (`hms-ctl gateway key new`), the gateway
//! spec and the outside client's calls; never starts or stops the agent (demo.rs does).

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{proc, tools};

/// The gateway's https listener in the demo (loopback only).
pub const PORT: u16 = 18443;
/// The name the outside client uses; the demo's certificate is for it.
const HOST: &str = "survivor.demo";
const FORM: &str = r#"{"userId":"HUD123","amount":500}"#;

/// Runs the chapter; true when the keyed call got a 2xx.
pub fn run(work: &Path, ctl: &dyn Fn(&[&OsStr]) -> anyhow::Result<String>) -> anyhow::Result<bool> {
    let dir = work.join("gateway");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert = dir.join("survivor.demo.pem");
    let key = dir.join("survivor.demo.key");
    let mut openssl = tools::command("openssl");
    openssl
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={HOST}")])
        .args(["-addext", &format!("subjectAltName=DNS:{HOST}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    println!("   $ {}", proc::describe(&openssl));
    let out = openssl
        .stdin(Stdio::null())
        .output()
        .context("could not run openssl; `cargo xtask setup` installs it")?;
    if !out.status.success() {
        bail!(
            "openssl could not make the demo's certificate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    println!("   $ hms-ctl gateway key new survivor-app");
    let made = ctl(&[
        "gateway".as_ref(),
        "key".as_ref(),
        "new".as_ref(),
        "survivor-app".as_ref(),
    ])?;
    // `key: KEY` and `spec line: survivor-app: HASH`: the last word of each.
    let field = |name: &str| {
        made.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().last())
            .map(str::to_owned)
    };
    let (Some(api_key), Some(hash)) = (field("key:"), field("spec line:")) else {
        bail!("`hms-ctl gateway key new` printed no key and hash: {made}");
    };
    println!(
        "   key {}… for the survivor's phone app; only its hash goes into the spec",
        &api_key[..8]
    );

    let spec = dir.join("gateway.yaml");
    let yaml = format!(
        "\
name: public
listeners:
  - name: web
    address: 127.0.0.1
    port: {PORT}
    protocol: https
    certificates: [{{cert: {cert}, key: {key}}}]
authenticators:
  phone-app:
    api_key:
      keys: {{survivor-app: {hash}}}
routes:
  - name: pay
    hostnames: [{HOST}]
    matches: [{{path: {{exact: /pay}}, method: POST}}]
    auth: phone-app
    max_body: 64KiB
    backends: [{{service: payments-svc}}]
",
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(&spec, &yaml).with_context(|| format!("writing {}", spec.display()))?;
    println!("   {}:", spec.display());
    for line in yaml.lines() {
        println!("     {line}");
    }
    println!("   $ hms-ctl gateway apply {}", spec.display());
    print!(
        "{}",
        indent(&ctl(&[
            "gateway".as_ref(),
            "apply".as_ref(),
            spec.as_os_str()
        ])?)
    );
    wait_for_listener()?;

    println!("   Without the key, the door answers:");
    let (code, body) = outside_call(&cert, None)?;
    println!("   HTTP {code}: {}", body.trim());
    println!("   With the key:");
    let (code, body) = outside_call(&cert, Some(&api_key))?;
    println!("   HTTP {code}");
    print!("{}", indent(&body));

    println!("   What the gateway saw: hms-ctl tap gateway --last 2 -o wide");
    print!(
        "{}",
        indent(&ctl(&[
            "tap".as_ref(),
            "gateway".as_ref(),
            "--last".as_ref(),
            "2".as_ref(),
            "-o".as_ref(),
            "wide".as_ref(),
        ])?)
    );
    Ok((200..300).contains(&code))
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// Bounded wait for the agent to bind the listener the spec declared.
fn wait_for_listener() -> anyhow::Result<()> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "the gateway did not listen on 127.0.0.1:{PORT} within 10 s; see the agent's log"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// curl from outside the mesh (not in the demo cgroup), as the survivor's phone would.
fn outside_call(cert: &Path, key: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut cmd = tools::command("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        FORM,
    ])
    .arg("--cacert")
    .arg(cert)
    .args(["--resolve", &format!("{HOST}:{PORT}:127.0.0.1")]);
    if let Some(k) = key {
        cmd.args(["-H", &format!("x-api-key: {k}")]);
    }
    let url = format!("https://{HOST}:{PORT}/pay");
    println!(
        "   $ {} {url}",
        proc::describe(&cmd).replace(key.unwrap_or("\u{0}"), "$API_KEY")
    );
    cmd.args(["-w", "\n%{http_code}", "--max-time", "15", &url]);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("could not run curl; `cargo xtask setup` installs it")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_ref()));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if code == 0 {
        println!(
            "   curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((code, body.to_string()))
}
