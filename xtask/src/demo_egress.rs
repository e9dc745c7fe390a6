//! The demo's egress chapter: payments-svc moves the money by calling "the treasury", a
//! stand-in outside system, as `http://treasury-api.svc/transfer`; the mesh originates TLS
//! to it (egress). Owns the treasury (an HTTPS server on loopback, OUTSIDE the demo cgroup,
//! with a CA of its own made by openssl), its spec as deployed and the chapter's output.
//! Never starts or stops the agent or the services (demo.rs does).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::proc::{self, Echo, Supervised};
use crate::{interrupt, tools};

/// Where the treasury listens; must match examples/services/treasury-api.yaml (checked).
pub const PORT: u16 = 18444;
/// The name on the treasury's certificate (the spec's `tls.sni`).
const HOST: &str = "treasury.demo";
/// What payments-svc is started with, so that /pay calls the treasury through the mesh.
pub const PAYMENTS_ARGS: [&str; 2] = ["--treasury", "http://treasury-api.svc/transfer"];
/// The shipped spec's `ca_file`, which the deployed copy replaces with the demo's CA.
const SHIPPED_CA_FILE: &str = "/etc/hms/treasury-ca.pem";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The treasury: POST /transfer with `{"paymentId", "userId", "amount"}` answers 200 with a
/// receipt; one stdout line per transfer (the demo prints them).
const SERVER: &str = r#"
import http.server, json, ssl, sys, itertools
cert, key, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
receipts = itertools.count(1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, code, obj):
        out = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def do_POST(self):
        n = int(self.headers.get("content-length") or 0)
        try:
            t = json.loads(self.rfile.read(n) or b"null")
            assert self.path == "/transfer" and isinstance(t, dict) and t.get("amount", 0) > 0
        except Exception:
            return self.reply(400, {"error": "POST /transfer takes {paymentId, userId, amount}"})
        receipt = "trs-%06d" % next(receipts)
        print("transfer %s: %s to %s (payment %s, over %s, Host %s)" % (receipt,
              t.get("amount"), t.get("userId"), t.get("paymentId"), self.connection.version(),
              self.headers.get("host")), flush=True)
        self.reply(200, {"receiptId": receipt, "paymentId": t.get("paymentId"), "status": "settled"})
srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// The running treasury; stopped when dropped.
pub struct Treasury {
    server: Supervised,
}

/// Makes the treasury's CA and certificate, starts it, and deploys its spec (a copy of the
/// shipped one with the CA's path filled in).
pub fn start(
    root: &Path,
    work: &Path,
    ctl: &dyn Fn(&[&OsStr]) -> anyhow::Result<String>,
) -> anyhow::Result<Treasury> {
    let dir = work.join("treasury");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    make_pki(&dir)?;

    let mut cmd = tools::command("python3");
    cmd.arg("-c")
        .arg(SERVER)
        .arg(dir.join("server.pem"))
        .arg(dir.join("server.key"))
        .arg(PORT.to_string());
    println!(
        "   $ python3 -c <treasury: http.server + ssl> server.pem server.key {PORT}   (outside the demo cgroup)"
    );
    let log = dir.join("treasury.log");
    let mut server = Supervised::spawn("treasury", cmd, &log, Echo::LogOnly)?;
    wait_for_port(&mut server)?;
    println!(
        "   the treasury is listening on https://127.0.0.1:{PORT} (log: {})",
        log.display()
    );

    let shipped = shipped_spec(root);
    let text = std::fs::read_to_string(&shipped)
        .with_context(|| format!("reading {}; the demo needs it", shipped.display()))?;
    let yaml = deployable(&text, &dir.join("ca.pem"))
        .with_context(|| format!("in {}", shipped.display()))?;
    let spec = dir.join("treasury-api.yaml");
    std::fs::write(&spec, &yaml).with_context(|| format!("writing {}", spec.display()))?;
    println!(
        "   {} with ca_file set to the demo's CA ({}):",
        shipped.display(),
        spec.display()
    );
    for line in yaml.lines().filter(|l| !l.starts_with('#')) {
        println!("     {line}");
    }
    println!("   $ hms-ctl deploy {}", spec.display());
    print!("{}", indent(&ctl(&["deploy".as_ref(), spec.as_os_str()])?));
    Ok(Treasury { server })
}

impl Treasury {
    /// Prints what the treasury received and the mesh's tap of treasury-api; true when at
    /// least one transfer went out through egress and was settled.
    pub fn show(
        &mut self,
        ctl: &dyn Fn(&[&OsStr]) -> anyhow::Result<String>,
    ) -> anyhow::Result<bool> {
        if let Some(status) = self.server.exited() {
            bail!(
                "the treasury exited ({status}); its log {}:\n{}",
                self.server.log().display(),
                proc::tail(self.server.log(), 20)
            );
        }
        let log = std::fs::read_to_string(self.server.log()).unwrap_or_default();
        let transfers: Vec<&str> = log.lines().filter(|l| l.starts_with("transfer ")).collect();
        println!("   What the treasury received (its own log, outside the mesh):");
        for line in &transfers {
            println!("     {line}");
        }
        if transfers.is_empty() {
            println!("     nothing: payments-svc's calls did not reach it; see the agent's log");
        }
        println!("   What the mesh saw: hms-ctl tap treasury-api --last 3 -o wide");
        let tap = ctl(&[
            "tap".as_ref(),
            "treasury-api".as_ref(),
            "--last".as_ref(),
            "3".as_ref(),
            "-o".as_ref(),
            "wide".as_ref(),
        ])?;
        print!("{}", indent(&tap));
        // The treasury's log proves the transfer arrived; the tap's upstream proves it
        // arrived through the mesh's egress, not by some direct path.
        let upstream = format!("https://127.0.0.1:{PORT}");
        if !tap.contains(&upstream) {
            println!("     no tap line with upstream {upstream}: the mesh did not carry the call");
        }
        Ok(!transfers.is_empty() && tap.contains(&upstream))
    }
}

fn shipped_spec(root: &Path) -> PathBuf {
    root.join("examples/services/treasury-api.yaml")
}

/// The shipped spec with its `ca_file` pointed at `ca`; an error if the spec no longer has
/// the line to replace or no longer points at the demo's treasury.
fn deployable(shipped: &str, ca: &Path) -> anyhow::Result<String> {
    let external = format!("external: https://127.0.0.1:{PORT}");
    if !shipped.lines().any(|l| l.trim() == external) {
        bail!("the spec must say `{external}` (where the demo starts the treasury)");
    }
    let line = format!("ca_file: {SHIPPED_CA_FILE}");
    if !shipped.contains(&line) {
        bail!("the spec must say `{line}` (the demo replaces it with its own CA)");
    }
    Ok(shipped.replace(&line, &format!("ca_file: {}", ca.display())))
}

/// A CA of the treasury's own and a server certificate for HOST signed by it.
fn make_pki(dir: &Path) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        format!("subjectAltName=DNS:{HOST}\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .with_context(|| format!("writing {}", ext.display()))?;
    let mut ca = tools::command("openssl");
    ca.args(["req", "-x509"])
        .args(ec)
        .args(["-days", "1", "-subj", "/CN=treasury demo CA", "-keyout"])
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem"));
    let mut csr = tools::command("openssl");
    csr.args(["req", "-new"])
        .args(ec)
        .args(["-subj", &format!("/CN={HOST}"), "-keyout"])
        .arg(dir.join("server.key"))
        .arg("-out")
        .arg(dir.join("server.csr"));
    let mut sign = tools::command("openssl");
    sign.args(["x509", "-req", "-in"])
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .args(["-set_serial", "1", "-days", "1", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(dir.join("server.pem"));
    for mut cmd in [ca, csr, sign] {
        println!("   $ {}", proc::describe(&cmd));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("could not run openssl; `cargo xtask setup` installs it")?;
        if !out.status.success() {
            bail!(
                "openssl could not make the treasury's certificates: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Bounded wait for the treasury's TLS port (xtask is outside the demo cgroup, so this
/// connect is not redirected).
fn wait_for_port(server: &mut Supervised) -> anyhow::Result<()> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", PORT)).is_err() {
        interrupt::check()?;
        if let Some(status) = server.exited() {
            bail!(
                "the treasury exited during startup ({status}); is port {PORT} in use? Its log {}:\n{}",
                server.log().display(),
                proc::tail(server.log(), 20)
            );
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "the treasury did not listen on 127.0.0.1:{PORT} within {READY_TIMEOUT:?}; see {}",
                server.log().display()
            );
        }
        interrupt::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_treasury_spec_parses_and_its_deployed_copy_names_the_demo_s_ca() {
        let file = shipped_spec(&crate::workspace::root());
        let text = std::fs::read_to_string(&file).unwrap();
        let ca = Path::new("/tmp/hms-demo/treasury/ca.pem");
        let deployed = deployable(&text, ca).unwrap();
        for yaml in [&text, &deployed] {
            let spec = hms_ctl::spec::parse(yaml, &file.display().to_string())
                .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
            assert_eq!(spec.name, "treasury-api");
        }
        assert!(deployed.contains("ca_file: /tmp/hms-demo/treasury/ca.pem"));
        assert!(!deployed.contains(SHIPPED_CA_FILE));
        assert!(deployed.contains(&format!("sni: {HOST}")));
    }
}
