//! The eBPF redirect against the real kernel: each test attaches the HMS programs to its own
//! child cgroup with its own pin dir and loopback ports, so the tests run in parallel and
//! never affect processes outside their cgroup.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use std::io::{Read as _, Write as _};

use hms_ebpf::{IPPROTO_TCP, IPPROTO_UDP, OrigDst};
use hms_node_agent::redirect::{
    self, EndedBy, FlowKind, FlowReader, FlowRecord, RedirectOptions, Redirector,
};
use vm_tests::cgroup::{PinDir, TestCgroup};

const VIP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 5);
const VIP_PORT: u16 = 80;
const SKIP_MARK: u32 = 0x4853;
const WAIT: Duration = Duration::from_secs(5);

/// Root is needed to load eBPF and create cgroups; anything else missing is a setup bug.
fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: needs root (loads eBPF programs and creates cgroups)");
        return false;
    }
    true
}

fn require_tool(name: &str) {
    if which(name).is_none() {
        panic!("`{name}` is not installed: run `cargo xtask setup`");
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file())
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

fn comm(orig: &OrigDst) -> String {
    let end = orig
        .comm
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(orig.comm.len());
    String::from_utf8_lossy(&orig.comm[..end]).into_owned()
}

fn options(
    cg: &TestCgroup,
    pin: &PinDir,
    outbound: SocketAddrV4,
    dns: SocketAddrV4,
) -> RedirectOptions {
    RedirectOptions {
        cgroup: cg.path().to_path_buf(),
        pin_dir: pin.path().to_path_buf(),
        vip_net: Ipv4Addr::new(127, 77, 0, 0),
        vip_prefix_len: 16,
        outbound,
        dns,
        skip_mark: SKIP_MARK,
        sk_msg_bypass: false,
        v6: None,
        refuse_undeclared_egress: false,
    }
}

fn unused_udp_addr() -> SocketAddrV4 {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind udp");
    v4(s.local_addr().expect("local_addr"))
}

fn accept_within(listener: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).expect("blocking");
                return Some((stream, peer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Opens a TCP connection to VIP:80 from a bash inside `cg`; returns bash's pid and output.
fn bash_connects_to_vip(cg: &TestCgroup) -> (u32, Output) {
    let child = cg
        .command("bash")
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/{VIP}/{VIP_PORT} && echo connected"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let pid = child.id();
    (pid, child.wait_with_output().expect("wait bash"))
}

/// The core user story, reused by the restart test: a connect to a VIP from inside the cgroup
/// reaches `listener`, and the proxy can learn where it was meant to go and who asked.
fn assert_vip_connect_is_redirected(cg: &TestCgroup, r: &Redirector, listener: &TcpListener) {
    let (pid, output) = bash_connects_to_vip(cg);
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("connected"),
        "connect to {VIP}:{VIP_PORT} from inside the cgroup failed:\n{}",
        describe(&output)
    );
    let (stream, peer) =
        accept_within(listener, WAIT).expect("the outbound listener got no connection");
    let listener_addr = v4(stream.local_addr().expect("local_addr"));
    let orig = r
        .take_tcp_orig_dst(peer, listener_addr.into())
        .expect("no original destination recorded for the accepted connection")
        .orig;
    assert_eq!(Ipv4Addr::from(orig.ip), VIP);
    assert_eq!(orig.port, VIP_PORT);
    assert_eq!(orig.protocol, IPPROTO_TCP);
    assert_eq!(orig.pid, pid, "caller pid");
    assert_eq!(comm(&orig), "bash");
    assert_eq!(orig.cgroup_id, cg.id().expect("cgroup id"));
    assert_eq!(
        r.take_tcp_orig_dst(peer, listener_addr.into()),
        None,
        "taking the original destination removes it"
    );
}

/// `bpftool cgroup show` as (program name, attach type) pairs.
fn attached_programs(cg: &TestCgroup) -> Vec<(String, String)> {
    let output = vm_tests::tools::command("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg.path())
        .output()
        .expect("run bpftool");
    assert!(
        output.status.success(),
        "bpftool cgroup show: {}",
        describe(&output)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("bpftool JSON");
    json.as_array()
        .map(|progs| {
            progs
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap_or_default().to_string(),
                        p["attach_type"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

const HMS_PROGRAMS: [&str; 10] = [
    "hms_sock_release",
    "hms_getpeername4",
    "hms_getpeername6",
    "hms_connect4",
    "hms_sendmsg4",
    "hms_recvmsg4",
    "hms_connect6",
    "hms_sendmsg6",
    "hms_recvmsg6",
    "hms_sock_ops",
];

#[test]
fn a_tcp_connect_to_a_vip_from_inside_the_cgroup_lands_on_the_outbound_listener_and_the_original_destination_is_recorded()
 {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("tcp-vip").expect("test cgroup");
    let pin = PinDir::new("tcp-vip");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let r = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");
    let status = r.describe();
    assert!(!status.adopted, "a fresh pin dir has nothing to adopt");
    assert!(
        status.ebpf_logs,
        "kernel log forwarding did not start: {status:?}"
    );
    assert_vip_connect_is_redirected(&cg, &r, &listener);
}

#[test]
fn the_same_connect_from_outside_the_cgroup_is_not_redirected() {
    if !privileged() {
        return;
    }
    let cg = TestCgroup::new("outside").expect("test cgroup");
    let pin = PinDir::new("outside");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let _r = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");

    let err = TcpStream::connect_timeout(&SocketAddrV4::new(VIP, VIP_PORT).into(), WAIT)
        .expect_err("a VIP is loopback space with no listener: connecting must fail");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(accept_within(&listener, Duration::from_millis(200)).is_none());
}

#[test]
fn a_socket_carrying_the_agents_skip_mark_is_never_redirected() {
    if !privileged() {
        return;
    }
    require_tool("python3");
    let cg = TestCgroup::new("mark").expect("test cgroup");
    let pin = PinDir::new("mark");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let _r = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");

    let script = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {SKIP_MARK})\n\
         try:\n    s.connect(('{VIP}', {VIP_PORT}))\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused')\n"
    );
    let output = cg
        .command("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "refused",
        "{}",
        describe(&output)
    );
    assert!(accept_within(&listener, Duration::from_millis(200)).is_none());
}

/// A minimal answer: the query's id and question, one A record pointing into the VIP range.
fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Vec<u8> {
    const HEADER: usize = 12;
    let mut end = HEADER;
    while end < query.len() && query[end] != 0 {
        end += 1 + usize::from(query[end]);
    }
    let question_end = end + 1 + 4; // root label, QTYPE, QCLASS
    assert!(question_end <= query.len(), "malformed query from dig");
    let mut reply = Vec::new();
    reply.extend_from_slice(&query[0..2]); // id
    reply.extend_from_slice(&[0x81, 0x80]); // response, recursion desired + available, NOERROR
    reply.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]); // 1 question, 1 answer
    reply.extend_from_slice(&query[HEADER..question_end]);
    reply.extend_from_slice(&[0xc0, 0x0c]); // name: pointer to the question
    reply.extend_from_slice(&[0, 1, 0, 1]); // A, IN
    reply.extend_from_slice(&60u32.to_be_bytes());
    reply.extend_from_slice(&4u16.to_be_bytes());
    reply.extend_from_slice(&answer.octets());
    reply
}

#[test]
fn udp_port_53_queries_are_redirected_and_the_replys_source_is_restored() {
    if !privileged() {
        return;
    }
    require_tool("dig");
    let cg = TestCgroup::new("dns").expect("test cgroup");
    let pin = PinDir::new("dns");
    let responder = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind responder");
    let responder_addr = v4(responder.local_addr().expect("addr"));
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let r =
        Redirector::start(&options(&cg, &pin, outbound, responder_addr)).expect("start redirector");

    // The resolver dig is told to ask; nothing listens there, so only the redirect answers.
    let resolver = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);
    let dig = cg
        .command("dig")
        .args([
            &format!("@{}", resolver.ip()),
            "-p",
            "53",
            "example.test",
            "A",
            "+short",
            "+tries=1",
            "+time=5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dig");
    let dig_pid = dig.id();

    responder.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut query = [0u8; 512];
    let (len, client) = responder
        .recv_from(&mut query)
        .expect("the responder got no query: port 53 was not redirected");
    let client = v4(client);
    let orig = r
        .udp_orig_dst(client.into(), responder_addr.into())
        .expect("no original destination for the DNS query")
        .orig;
    assert_eq!(SocketAddrV4::new(orig.ip.into(), orig.port), resolver);
    assert_eq!(orig.protocol, IPPROTO_UDP);
    assert_eq!(orig.pid, dig_pid, "caller pid");
    assert_eq!(orig.cgroup_id, cg.id().expect("cgroup id"));
    assert!(!comm(&orig).is_empty(), "caller comm recorded");
    assert_eq!(
        r.udp_orig_dst(client.into(), responder_addr.into())
            .map(|o| o.orig),
        Some(orig),
        "asking does not consume the record: recvmsg4 still needs it for the reply"
    );

    let answer = Ipv4Addr::new(127, 77, 0, 9);
    responder
        .send_to(&dns_answer(&query[..len], answer), client)
        .expect("send reply");
    let output = dig.wait_with_output().expect("wait dig");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        answer.to_string(),
        "dig did not accept the reply (recvmsg4 must restore its source to {resolver}):\n{}",
        describe(&output)
    );
}

#[test]
fn a_restarted_redirector_adopts_the_pinned_programs_instead_of_attaching_twice() {
    if !privileged() {
        return;
    }
    require_tool("bpftool");
    let cg = TestCgroup::new("restart").expect("test cgroup");
    let pin = PinDir::new("restart");
    let first_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let first = Redirector::start(&options(
        &cg,
        &pin,
        v4(first_listener.local_addr().expect("addr")),
        unused_udp_addr(),
    ))
    .expect("first start");
    let first_ids: Vec<u32> = first
        .describe()
        .hooks
        .iter()
        .map(|h| h.program_id)
        .collect();
    drop(first); // the agent goes away without cleanup, as in a crash or an upgrade

    // The restarted agent listens on a new port: adopting must still update the config.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let second = Redirector::start(&options(
        &cg,
        &pin,
        v4(listener.local_addr().expect("addr")),
        unused_udp_addr(),
    ))
    .expect("second start");
    let status = second.describe();
    assert!(status.adopted, "{status:?}");
    assert!(
        status.ebpf_logs,
        "adopted programs' logs are found by program id: {status:?}"
    );
    let second_ids: Vec<u32> = status.hooks.iter().map(|h| h.program_id).collect();
    assert_eq!(
        first_ids, second_ids,
        "the same kernel programs keep running"
    );

    let attached = attached_programs(&cg);
    for name in HMS_PROGRAMS {
        let count = attached.iter().filter(|(n, _)| n == name).count();
        assert_eq!(count, 1, "{name} attached {count} times: {attached:?}");
    }
    let mut reader = second.flow_reader().expect("flow reader");
    assert_vip_connect_is_redirected(&cg, &second, &listener);
    // The adopted sock_ops program writes to the pinned ring buffer the new agent reads.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let open = next_flow(&rt, &mut reader);
    assert_eq!(open.kind, FlowKind::Open, "{open:?}");
    assert_eq!(open.original_dst, SocketAddrV4::new(VIP, VIP_PORT));
}

#[test]
fn cleanup_leaves_no_hms_program_attached_and_nothing_pinned() {
    if !privileged() {
        return;
    }
    require_tool("bpftool");
    let cg = TestCgroup::new("cleanup").expect("test cgroup");
    let pin = PinDir::new("cleanup");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    // Kept alive on purpose: cleanup must detach even while an agent still holds the links.
    let _running = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");
    assert_eq!(attached_programs(&cg).len(), HMS_PROGRAMS.len());

    let report = redirect::cleanup(pin.path()).expect("cleanup");
    assert_eq!(
        report.detached_links.len(),
        HMS_PROGRAMS.len(),
        "{report:?}"
    );
    assert_eq!(report.unpinned_maps.len(), 19, "{report:?}");
    assert!(report.removed_dir, "{report:?}");
    assert!(!pin.path().exists(), "pin dir still exists");

    assert_eq!(attached_programs(&cg), Vec::<(String, String)>::new());
    let tree = vm_tests::tools::command("bpftool")
        .args(["cgroup", "tree"])
        .output()
        .expect("bpftool");
    let tree = String::from_utf8_lossy(&tree.stdout);
    let cg_name = cg.path().display().to_string();
    assert!(
        !tree.contains(&cg_name),
        "{cg_name} still in `bpftool cgroup tree`:\n{tree}"
    );

    let (_, output) = bash_connects_to_vip(&cg);
    assert!(
        !output.status.success(),
        "still redirected after cleanup:\n{}",
        describe(&output)
    );

    let again = redirect::cleanup(pin.path()).expect("second cleanup is a no-op");
    assert!(
        again.detached_links.is_empty() && !again.removed_dir,
        "{again:?}"
    );
}

#[test]
fn starting_on_a_missing_cgroup_says_so_and_pins_nothing() {
    let root = hms_node_agent::cgroup::v2_root().expect("cgroup v2 root");
    let pin = PinDir::new("missing");
    let missing = root.join(format!("hms-test-missing-{}", std::process::id()));
    let opts = RedirectOptions {
        cgroup: missing,
        pin_dir: pin.path().to_path_buf(),
        vip_net: Ipv4Addr::new(127, 77, 0, 0),
        vip_prefix_len: 16,
        outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
        dns: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15053),
        skip_mark: SKIP_MARK,
        sk_msg_bypass: false,
        v6: None,
        refuse_undeclared_egress: false,
    };
    let err = Redirector::start(&opts).err().expect("start must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("does not exist"), "{msg}");
    assert!(!pin.path().exists());
}

/// The next flow record, through the async reader the agent uses.
fn next_flow(rt: &tokio::runtime::Runtime, reader: &mut FlowReader) -> FlowRecord {
    rt.block_on(async { tokio::time::timeout(WAIT, reader.next()).await })
        .expect("no flow record within the wait")
        .expect("the flow reader stopped")
}

#[test]
fn a_redirected_connection_emits_an_open_and_a_close_record_with_the_caller_the_original_destination_and_byte_counts()
 {
    if !privileged() {
        return;
    }
    require_tool("python3");
    const SENT: usize = 1000;
    const ANSWER: usize = 300;
    let cg = TestCgroup::new("flows").expect("test cgroup");
    let pin = PinDir::new("flows");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let r = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");
    let mut reader = r.flow_reader().expect("flow reader");
    assert!(
        r.flow_reader().is_err(),
        "a ring buffer has one consumer: the reader is handed out once"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::SystemTime::now();

    // The peer (standing in for the proxy) reads the whole request, answers and closes first,
    // as an HTTP/1.0 server would; the client reads to EOF, then closes.
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{VIP}', {VIP_PORT}))\n\
         s.sendall(b'q' * {SENT})\n\
         got = 0\n\
         while True:\n    b = s.recv(65536)\n    if not b: break\n    got += len(b)\n\
         s.close()\n\
         print(got)\n"
    );
    let client = cg
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let client_pid = client.id();
    let (mut stream, peer) =
        accept_within(&listener, WAIT).expect("the outbound listener got no connection");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut request = vec![0u8; SENT];
    stream.read_exact(&mut request).expect("read the request");
    stream.write_all(&[b'a'; ANSWER]).expect("answer");
    drop(stream);
    let output = client.wait_with_output().expect("wait python3");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        ANSWER.to_string(),
        "{}",
        describe(&output)
    );

    let open = next_flow(&rt, &mut reader);
    assert_eq!(open.kind, FlowKind::Open, "{open:?}");
    assert_eq!(
        open.original_dst,
        SocketAddrV4::new(VIP, VIP_PORT),
        "{open:?}"
    );
    assert_eq!(open.client, peer, "the client's own address");
    assert_eq!(open.listener, std::net::SocketAddr::from(outbound));
    assert_eq!(open.pid, client_pid, "caller pid");
    assert_eq!(open.comm, "python3");
    assert_eq!(open.cgroup_id, cg.id().expect("cgroup id"));
    assert!(!open.dns);
    assert!(open.connect_latency < WAIT, "{open:?}");
    let since_start = open
        .connected_at
        .duration_since(started - Duration::from_secs(1))
        .expect("connected after the test started");
    assert!(since_start < Duration::from_secs(60), "{open:?}");
    assert_eq!(open.bytes_acked, 1, "only the SYN is acknowledged at open");
    assert_eq!(open.bytes_received, 0);

    let close = next_flow(&rt, &mut reader);
    let FlowKind::Close {
        duration, ended_by, ..
    } = close.kind
    else {
        panic!("expected a close record, got {close:?}");
    };
    assert_eq!(close.cookie, open.cookie, "the close pairs with the open");
    assert_eq!(
        (close.client, close.original_dst, close.pid, &close.comm),
        (open.client, open.original_dst, open.pid, &open.comm)
    );
    assert_eq!(ended_by, EndedBy::Peer, "{close:?}");
    assert!(duration > Duration::ZERO && duration < WAIT, "{close:?}");
    // Sequence space, as the kernel counts it: the client's SYN and FIN are acknowledged on
    // top of its payload, and the peer's FIN arrived before the client closed.
    assert_eq!(close.bytes_acked, SENT as u64 + 2, "{close:?}");
    assert_eq!(close.bytes_received, ANSWER as u64 + 1, "{close:?}");
    assert!(close.srtt < WAIT, "{close:?}");
    assert_eq!(close.total_retrans, 0, "loopback does not lose segments");

    assert_eq!(
        reader.try_next(),
        None,
        "one open and one close, nothing else"
    );
    assert_eq!(reader.malformed(), 0);
    assert_eq!(r.ringbuf_drops(), 0, "nothing dropped in normal operation");
}

#[test]
fn when_the_client_closes_first_the_close_record_says_so_and_counts_no_peer_fin() {
    if !privileged() {
        return;
    }
    require_tool("python3");
    const SENT: usize = 5000;
    const ANSWER: usize = 70;
    let cg = TestCgroup::new("flows-client-close").expect("test cgroup");
    let pin = PinDir::new("flows-client-close");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let outbound = v4(listener.local_addr().expect("addr"));
    let r = Redirector::start(&options(&cg, &pin, outbound, unused_udp_addr()))
        .expect("start redirector");
    let mut reader = r.flow_reader().expect("flow reader");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // An HTTP/1.1-style client: it knows the answer's length, reads exactly that and closes.
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{VIP}', {VIP_PORT}))\n\
         s.sendall(b'q' * {SENT})\n\
         got = 0\n\
         while got < {ANSWER}:\n    got += len(s.recv({ANSWER} - got))\n\
         s.close()\n\
         print(got)\n"
    );
    let client = cg
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let (mut stream, _) =
        accept_within(&listener, WAIT).expect("the outbound listener got no connection");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut request = vec![0u8; SENT];
    stream.read_exact(&mut request).expect("read the request");
    stream.write_all(&[b'a'; ANSWER]).expect("answer");
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("wait for the client's FIN");
    assert!(rest.is_empty());
    let output = client.wait_with_output().expect("wait python3");
    assert!(output.status.success(), "{}", describe(&output));

    let open = next_flow(&rt, &mut reader);
    assert_eq!(open.kind, FlowKind::Open, "{open:?}");
    let close = next_flow(&rt, &mut reader);
    assert!(
        matches!(
            close.kind,
            FlowKind::Close {
                ended_by: EndedBy::Client,
                ..
            }
        ),
        "{close:?}"
    );
    // The client's SYN and FIN are acknowledged on top of its payload; once its FIN was
    // acknowledged the closed app socket was handed to a time-wait socket, so the peer's FIN
    // (sent when `stream` drops, after this) is not counted.
    assert_eq!(close.bytes_acked, SENT as u64 + 2, "{close:?}");
    assert_eq!(close.bytes_received, ANSWER as u64, "{close:?}");
    drop(stream);
    assert_eq!(r.ringbuf_drops(), 0);
}

/// A map of another layout pinned in this build's own pin set (by hand: another build's maps
/// land in a set of their own, see upgrade_layout.rs) must be refused with the cleanup hint,
/// not reused (the programs would read and write garbage, the ring buffer reader would map
/// the wrong size).
#[test]
fn a_pinned_flow_map_of_another_size_is_refused_with_the_cleanup_hint() {
    if !privileged() {
        return;
    }
    require_tool("bpftool");
    let cases = [
        ("HMS_FLOW_EVENTS", "ringbuf", "0", "0", "131072"),
        ("HMS_FLOWS", "lru_hash", "8", "72", "1024"),
        ("HMS_RINGBUF_DROPS", "percpu_array", "4", "4", "1"),
        ("HMS_ORIG_BY_COOKIE", "lru_hash", "8", "40", "1024"),
        ("HMS_SOCKS", "sockhash", "8", "4", "1024"),
    ];
    for (name, map_type, key, value, entries) in cases {
        let cg = TestCgroup::new("old-abi").expect("test cgroup");
        let pin = PinDir::new("old-abi");
        let set = hms_node_agent::redirect::pin_set_dir(pin.path()).expect("layout version");
        std::fs::create_dir_all(&set).expect("create pin set dir");
        let output = vm_tests::tools::command("bpftool")
            .args(["map", "create"])
            .arg(set.join(name))
            .args([
                "type", map_type, "key", key, "value", value, "entries", entries, "name", name,
            ])
            .output()
            .expect("run bpftool");
        assert!(
            output.status.success(),
            "bpftool map create: {}",
            describe(&output)
        );
        let err = Redirector::start(&options(
            &cg,
            &pin,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            unused_udp_addr(),
        ))
        .err()
        .unwrap_or_else(|| panic!("a pinned {name} of another layout was accepted"));
        let msg = format!("{err:#}");
        assert!(
            msg.contains(name) && msg.contains("hms-node-agent cleanup"),
            "{msg}"
        );
        assert!(attached_programs(&cg).is_empty(), "nothing attached");
    }
}

#[test]
fn dns_over_tcp_to_port_53_is_tracked_and_marked_as_dns() {
    if !privileged() {
        return;
    }
    require_tool("python3");
    let cg = TestCgroup::new("flows-dns").expect("test cgroup");
    let pin = PinDir::new("flows-dns");
    let outbound = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind outbound");
    let responder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind DNS responder");
    let responder_addr = v4(responder.local_addr().expect("addr"));
    let r = Redirector::start(&options(
        &cg,
        &pin,
        v4(outbound.local_addr().expect("addr")),
        responder_addr,
    ))
    .expect("start redirector");
    let mut reader = r.flow_reader().expect("flow reader");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let resolver = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 53), 53);
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{}', {}))\n\
         s.close()\n",
        resolver.ip(),
        resolver.port()
    );
    let output = cg
        .command("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(output.status.success(), "{}", describe(&output));
    let (_stream, _) = accept_within(&responder, WAIT).expect("the responder got no connection");

    let open = next_flow(&rt, &mut reader);
    assert_eq!(open.kind, FlowKind::Open, "{open:?}");
    assert!(open.dns, "{open:?}");
    assert_eq!(open.original_dst, resolver);
    assert_eq!(open.listener, std::net::SocketAddr::from(responder_addr));
}
