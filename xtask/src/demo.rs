//! `cargo xtask demo [--once]`: the seed story on this host, told step by step. Owns the
//! demo's choreography: build, demo cgroup, agent (outside the cgroup), the four demo-svc
//! services (inside it), `hms-ctl deploy`, then an unmodified curl inside the cgroup calling
//! payments-svc.svc and notify-svc.svc by name; then the survivor's form from outside
//! through the gateway over HTTPS with an API key (`demo_gateway`).
//!
//! Teardown is never a step that can be skipped: every resource is held by a guard whose Drop
//! releases it, declared so that Rust drops them in reverse order (services, agent, pinned
//! eBPF objects, cgroup), on success, on `?` error paths and after Ctrl-C alike.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cgroup::{self, OwnedCgroup};
use crate::interrupt;
use crate::proc::{self, Echo, Supervised};
use crate::tools;
use crate::{setup, workspace};

const CGROUP_NAME: &str = "hms-demo";
/// Separate from the default `/sys/fs/bpf/hms` so the demo never adopts or removes the pins
/// of an agent that runs on this host for real.
const PIN_DIR: &str = "/sys/fs/bpf/hms-demo";
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(60);
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The four services of the story; ports must match examples/services/*.yaml (checked).
struct DemoService {
    role: &'static str,
    name: &'static str,
    port: u16,
}

const SERVICES: [DemoService; 4] = [
    DemoService {
        role: "identity",
        name: "identity-svc",
        port: 7101,
    },
    DemoService {
        role: "eligibility",
        name: "eligibility-svc",
        port: 7102,
    },
    DemoService {
        role: "payments",
        name: "payments-svc",
        port: 7103,
    },
    DemoService {
        role: "notify",
        name: "notify-svc",
        port: 7104,
    },
];

/// The two calls of the story, exactly as the seed's client makes them.
const CALLS: [(&str, &str); 2] = [
    (
        "http://payments-svc.svc/pay",
        r#"{"userId":"HUD123","amount":500}"#,
    ),
    (
        "http://notify-svc.svc/sms",
        r#"{"userId":"HUD123","msg":"Your $500 relief payment is processing."}"#,
    ),
];

/// Paths the demo uses, all under the workspace so nothing is left in system directories
/// except the cgroup and the pins, which teardown removes.
struct Paths {
    root: PathBuf,
    agent: PathBuf,
    ctl: PathBuf,
    demo_svc: PathBuf,
    work: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

impl Paths {
    fn new() -> Self {
        let root = workspace::root();
        let bin = workspace::target_dir().join("debug");
        let work = workspace::target_dir().join("hms-demo");
        // A Unix socket path must fit in sun_path (108 bytes); deep checkouts fall back to /run.
        let mut socket = work.join("agent.sock");
        if socket.as_os_str().len() >= 100 {
            socket = PathBuf::from("/run/hms-demo/agent.sock");
        }
        Self {
            agent: bin.join("hms-node-agent"),
            ctl: bin.join("hms-ctl"),
            demo_svc: bin.join("demo-svc"),
            state: work.join("state"),
            socket,
            work,
            root,
        }
    }

    fn spec(&self, svc: &DemoService) -> PathBuf {
        self.root
            .join("examples/services")
            .join(format!("{}.yaml", svc.name))
    }
}

pub fn run(once: bool) -> anyhow::Result<()> {
    interrupt::install();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo loads eBPF programs and creates a cgroup, which needs root; run \
             `sudo -E env PATH=\"$PATH\" cargo xtask demo`"
        );
    }
    setup::run()?;
    let paths = Paths::new();

    step("Building hms-node-agent, hms-ctl and demo-svc");
    proc::run(workspace::cargo().args(["build", "--bins"]))?;
    interrupt::check()?;
    for svc in &SERVICES {
        check_spec(&paths.spec(svc), svc)?;
    }
    prepare_work_dir(&paths)?;

    step("Creating the demo cgroup");
    let cgroup_root = cgroup::v2_root()?;
    println!("   cgroup v2 is mounted at {}", cgroup_root.display());
    let cgroup = OwnedCgroup::create(&cgroup_root, CGROUP_NAME)?;
    println!(
        "   {} - the agent's hooks attach here; anything started inside is in the mesh",
        cgroup.path().display()
    );

    // Declared before the agent so it is dropped after the agent has stopped.
    let pins = PinnedObjects {
        agent: paths.agent.clone(),
    };
    if Path::new(PIN_DIR).exists() {
        println!("   {PIN_DIR} is left over from an earlier run; cleaning it first");
        pins.cleanup();
    }

    step("Starting hms-node-agent (outside the demo cgroup, so its own traffic is not redirected)");
    let mut agent = start_agent(&paths, cgroup.path())?;
    wait_for_agent(&mut agent, &paths)?;

    step("Starting the four services inside the demo cgroup, each in a child cgroup of its own");
    let mut services = Vec::new();
    for svc in &SERVICES {
        // One cgroup per service: the agent tells callers apart by cgroup, which is what
        // lets eligibility-svc accept payments-svc and nobody else.
        let service_cgroup = cgroup.child(svc.name)?;
        services.push(start_service(&paths, svc, &service_cgroup)?);
    }
    for (svc, child) in SERVICES.iter().zip(services.iter_mut()) {
        wait_for_port(child, svc.port)?;
        println!(
            "   {} is listening on 127.0.0.1:{} (log: {})",
            svc.name,
            svc.port,
            child.log().display()
        );
    }

    step("Deploying the service specs with hms-ctl");
    for svc in &SERVICES {
        let spec = paths.spec(svc);
        let out = ctl(&paths, &["deploy".as_ref(), spec.as_os_str()])
            .with_context(|| format!("deploying {}", spec.display()))?;
        print_indented(&out);
    }

    step("What the mesh knows now: hms-ctl list");
    print_indented(&ctl(&paths, &["list".as_ref()])?);

    step("An unmodified program inside the cgroup resolves a service name");
    show_name_resolution(cgroup.path());

    let mut all_ok = true;
    for (n, (url, body)) in CALLS.iter().enumerate() {
        interrupt::check()?;
        step(&format!(
            "Call {} of 2: plain curl inside the demo cgroup, POST {url}",
            n + 1
        ));
        let ok = call(cgroup.path(), url, body)?;
        all_ok &= ok;
    }

    interrupt::check()?;
    step(&format!(
        "The survivor's form from outside: HTTPS to the gateway on 127.0.0.1:{}, with an API key",
        crate::demo_gateway::PORT
    ));
    let gateway_ok = crate::demo_gateway::run(&paths.work, &|args| ctl(&paths, args))?;
    all_ok &= gateway_ok;

    step("The mesh's access policy: eligibility-svc only takes calls from payments-svc");
    show_denied_call(cgroup.path())?;

    step("What the mesh saw: hms-ctl tap payments-svc --last 5");
    print_indented(&ctl(
        &paths,
        &[
            "tap".as_ref(),
            "payments-svc".as_ref(),
            "--last".as_ref(),
            "5".as_ref(),
        ],
    )?);

    step("Summary");
    if all_ok {
        println!(
            "   Both calls succeeded. curl knew only the names payments-svc.svc and notify-svc.svc;\n   \
             the kernel hooks sent DNS to the agent and the connections to its proxy, which\n   \
             found the services and forwarded the requests - no code change, no sidecar."
        );
    } else {
        println!(
            "   At least one call failed. The agent's log is {}; the services' logs are next to it.",
            agent.log().display()
        );
    }

    if !once {
        wait_for_ctrl_c(cgroup.path(), &mut agent, &mut services);
    }

    step("Tearing down");
    // Explicit drops in teardown order (the same order an early return would use).
    drop(services);
    drop(agent);
    drop(pins);
    drop(cgroup);
    if !all_ok {
        bail!(
            "the demo's calls did not both return 2xx; read the story above and {}",
            paths.work.join("agent.log").display()
        );
    }
    println!("demo: done");
    Ok(())
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

/// The demo starts each service on a fixed port in a fixed child cgroup; a spec that says
/// otherwise would register an endpoint nobody listens on (or an identity nobody has), so
/// catch it before starting anything.
fn check_spec(spec: &Path, svc: &DemoService) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(spec)
        .with_context(|| format!("reading {}; the demo needs it", spec.display()))?;
    let value_of = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split('#').next())
            .map(str::trim)
    };
    let want_port = svc.port.to_string();
    let want_cgroup = format!("{CGROUP_NAME}/{}", svc.name);
    for (key, want) in [
        ("port", want_port.as_str()),
        ("cgroup", want_cgroup.as_str()),
    ] {
        if value_of(key) != Some(want) {
            bail!(
                "{} must say `{key}: {want}` (where the demo starts {})",
                spec.display(),
                svc.name
            );
        }
    }
    Ok(())
}

/// Fresh state each run, so the story always starts from an empty registry; the previous run's
/// logs are overwritten.
fn prepare_work_dir(paths: &Paths) -> anyhow::Result<()> {
    if paths.state.exists() {
        std::fs::remove_dir_all(&paths.state)
            .with_context(|| format!("removing old demo state {}", paths.state.display()))?;
    }
    std::fs::create_dir_all(&paths.state)
        .with_context(|| format!("creating {}", paths.state.display()))?;
    let socket_dir = paths.socket.parent().context("socket path has a parent")?;
    std::fs::create_dir_all(socket_dir)
        .with_context(|| format!("creating {}", socket_dir.display()))?;
    // A stale socket would make the readiness check pass against nothing.
    if paths.socket.exists() {
        std::fs::remove_file(&paths.socket)
            .with_context(|| format!("removing stale socket {}", paths.socket.display()))?;
    }
    Ok(())
}

fn start_agent(paths: &Paths, cgroup: &Path) -> anyhow::Result<Supervised> {
    let mut cmd = tools::workspace_binary(&paths.agent);
    cmd.arg("run")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--state-dir")
        .arg(&paths.state)
        .arg("--admin-socket")
        .arg(&paths.socket)
        .arg("--pin-dir")
        .arg(PIN_DIR)
        // This host is also the mesh's door (demo_gateway.rs).
        .args(["--gateway", "all"])
        .current_dir(&paths.root);
    println!("   $ {}", proc::describe(&cmd));
    let log = paths.work.join("agent.log");
    let agent = Supervised::spawn("hms-node-agent", cmd, &log, Echo::LogOnly)?;
    println!("   log: {}", log.display());
    Ok(agent)
}

/// Ready = the admin socket exists and `hms-ctl status` exits 0.
fn wait_for_agent(agent: &mut Supervised, paths: &Paths) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        interrupt::check()?;
        if let Some(status) = agent.exited() {
            bail!(
                "hms-node-agent exited during startup ({status}); last lines of {}:\n{}",
                agent.log().display(),
                proc::tail(agent.log(), 20)
            );
        }
        if paths.socket.exists()
            && let Ok(status) = ctl(paths, &["status".as_ref()])
        {
            println!(
                "   ready after {:.1}s; hms-ctl status:",
                started.elapsed().as_secs_f64()
            );
            print_indented(&status);
            return Ok(());
        }
        if started.elapsed() > AGENT_READY_TIMEOUT {
            bail!(
                "hms-node-agent was not ready after {AGENT_READY_TIMEOUT:?} (no answer from \
                 `hms-ctl --socket {} status`); last lines of {}:\n{}",
                paths.socket.display(),
                agent.log().display(),
                proc::tail(agent.log(), 20)
            );
        }
        interrupt::sleep(Duration::from_millis(200));
    }
}

fn start_service(paths: &Paths, svc: &DemoService, cgroup: &Path) -> anyhow::Result<Supervised> {
    let mut cmd = tools::workspace_binary(&paths.demo_svc);
    cmd.args(["--role", svc.role, "--listen"])
        .arg(format!("127.0.0.1:{}", svc.port));
    proc::join_cgroup_at_exec(&mut cmd, cgroup)?;
    println!("   $ {}", proc::describe(&cmd));
    let log = paths.work.join(format!("{}.log", svc.name));
    Supervised::spawn(svc.name, cmd, &log, Echo::Prefixed)
}

fn wait_for_port(child: &mut Supervised, port: u16) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    loop {
        interrupt::check()?;
        if let Some(status) = child.exited() {
            bail!(
                "{} exited during startup ({status}); is port {port} already in use? Its log {}:\n{}",
                child.name(),
                child.log().display(),
                proc::tail(child.log(), 20)
            );
        }
        // xtask runs outside the demo cgroup, so this connect is not redirected.
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > SERVICE_READY_TIMEOUT {
            bail!(
                "{} did not listen on {addr} within {SERVICE_READY_TIMEOUT:?}; see {}",
                child.name(),
                child.log().display()
            );
        }
        interrupt::sleep(Duration::from_millis(100));
    }
}

/// Runs `hms-ctl --socket S ARGS...`, returning its stdout, or an error carrying its stderr.
fn ctl(paths: &Paths, args: &[&std::ffi::OsStr]) -> anyhow::Result<String> {
    let mut cmd = tools::workspace_binary(&paths.ctl);
    cmd.arg("--socket").arg(&paths.socket).args(args);
    let line = proc::describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Informative only: `getent hosts` uses the system resolver exactly as any program would, so
/// its answer shows the VIP the agent's DNS responder handed out.
fn show_name_resolution(cgroup: &Path) {
    let mut cmd = tools::command("getent");
    cmd.args(["hosts", "payments-svc.svc"]);
    if proc::join_cgroup_at_exec(&mut cmd, cgroup).is_err() {
        return;
    }
    println!("   $ {}", proc::describe(&cmd));
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => print_indented(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => println!(
            "   no answer ({}); the calls below will show why",
            out.status
        ),
        Err(err) => println!("   could not run getent: {err}"),
    }
}

/// One story call: curl inside the demo cgroup. Returns whether it got a 2xx.
fn call(cgroup: &Path, url: &str, body: &str) -> anyhow::Result<bool> {
    let mut cmd = tools::command("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]);
    println!("   $ {} {url}", proc::describe(&cmd));
    // Status on its own last line so the body is printed untouched; a bounded wait so a
    // black-holed connection fails the demo instead of hanging it.
    cmd.args(["-w", "\n%{http_code}", "--max-time", "15", url]);
    proc::join_cgroup_at_exec(&mut cmd, cgroup)?;
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("could not run curl; `cargo xtask setup` installs it")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_ref()));
    let code: u16 = code.trim().parse().unwrap_or(0);
    if !out.status.success() || code == 0 {
        println!(
            "   curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(false);
    }
    println!("   HTTP {code}");
    print_indented(body);
    Ok((200..300).contains(&code))
}

/// curl from the demo cgroup itself (the host, not payments-svc) to eligibility-svc: the
/// mesh answers 403 with `x-hms-error: denied` and the service never sees the call.
fn show_denied_call(cgroup: &Path) -> anyhow::Result<()> {
    let mut cmd = tools::command("curl");
    cmd.args(["-sS", "-i", "--max-time", "15"]);
    let url = "http://eligibility-svc.svc/check?userId=HUD123";
    println!("   $ {} {url}", proc::describe(&cmd));
    cmd.arg(url);
    proc::join_cgroup_at_exec(&mut cmd, cgroup)?;
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("could not run curl; `cargo xtask setup` installs it")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("http/") || l.starts_with("x-hms-error") || l.starts_with("hms:")
    }) {
        println!("   {line}");
    }
    Ok(())
}

fn wait_for_ctrl_c(cgroup: &Path, agent: &mut Supervised, services: &mut [Supervised]) {
    step("The mesh is up - press Ctrl-C to tear everything down");
    println!(
        "   Try it from another shell (as root); the subshell joins the demo cgroup, then runs curl:\n   \
         sh -c 'echo $$ > {}/cgroup.procs && exec curl -sS http://payments-svc.svc/'",
        cgroup.display()
    );
    while interrupt::sleep(Duration::from_millis(500)) {
        if let Some(status) = agent.exited() {
            println!(
                "   hms-node-agent exited on its own ({status}); see {}",
                agent.log().display()
            );
            return;
        }
        for svc in services.iter_mut() {
            if let Some(status) = svc.exited() {
                println!(
                    "   {} exited on its own ({status}); see {}",
                    svc.name(),
                    svc.log().display()
                );
                return;
            }
        }
    }
    println!();
}

/// The agent's pinned links and maps under PIN_DIR: they outlive the agent by design (so a
/// restarted agent keeps redirecting), which is exactly why the demo must remove them.
struct PinnedObjects {
    agent: PathBuf,
}

impl PinnedObjects {
    fn cleanup(&self) {
        let mut cmd = tools::workspace_binary(&self.agent);
        cmd.args(["cleanup", "--pin-dir", PIN_DIR]);
        let line = proc::describe(&cmd);
        println!("   $ {line}");
        match cmd.stdin(Stdio::null()).status() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!(
                "warning: `{line}` failed ({status}); run it again by hand, or remove {PIN_DIR}"
            ),
            Err(err) => eprintln!("warning: could not run `{line}`: {err}"),
        }
    }
}

impl Drop for PinnedObjects {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_specs_match_what_the_demo_starts() {
        let paths = Paths::new();
        for svc in &SERVICES {
            let file = paths.spec(svc);
            check_spec(&file, svc).unwrap();
            let text = std::fs::read_to_string(&file).unwrap();
            let spec = hms_ctl::spec::parse(&text, &file.display().to_string())
                .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
            assert_eq!(spec.name, svc.name);
            assert_eq!(spec.port, svc.port);
            assert_eq!(
                spec.cgroup.as_deref(),
                Some(format!("{CGROUP_NAME}/{}", svc.name).as_str())
            );
        }
    }
}
