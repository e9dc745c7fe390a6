//! An HTTP/2 instance refusing streams that are already on their way: its GOAWAY names a
//! last stream id below requests the mesh has sent. RFC 9113 §6.8: the instance never
//! processed those, so the mesh sends each again on a new connection, whatever its method,
//! and none waits for an answer that cannot come.
//!
//! No real server refuses on purpose, so the instance here is written frame by frame (a
//! few dozen lines of HTTP/2 over a plain TCP socket): what it refuses and when is exact,
//! not a race. The client is real h2load inside the agent's cgroup, through the real
//! kernel redirect and a real agent process.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vm_tests::agent::TestAgent;
use vm_tests::cgroup::TestCgroup;
use vm_tests::client::tail;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// HPACK: static table entry 8, `:status: 200`.
const STATUS_200: &[u8] = &[0x88];

/// What the instance did, counted.
#[derive(Default)]
struct Counts {
    /// Requests answered 200 (each one processed exactly once).
    answered: AtomicU64,
    /// Requests that had fully arrived on the first connection but lay above its GOAWAY's
    /// last stream id: never processed.
    refused: AtomicU64,
    connections: AtomicU64,
}

/// An h2c instance. Its first connection waits until `gather` requests have fully arrived,
/// then sends GOAWAY (NO_ERROR) naming the `keep`-th stream opened as the last one,
/// answers the `keep` streams up to it (any still arriving once they have) and closes;
/// every later connection answers each request at once.
struct RefusingH2 {
    addr: SocketAddrV4,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
}

impl RefusingH2 {
    fn start(gather: usize, keep: usize) -> RefusingH2 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = match listener.local_addr().expect("local addr") {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("bound IPv4, got {other}"),
        };
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let first = c.connections.fetch_add(1, Ordering::AcqRel) == 0;
                let c = c.clone();
                std::thread::spawn(move || {
                    let refuse = first.then_some((gather, keep));
                    // The connection ends when the agent closes it (or is killed).
                    let _ = serve(stream, &c, refuse);
                });
            }
        });
        RefusingH2 { addr, counts, stop }
    }

    fn answered(&self) -> u64 {
        self.counts.answered.load(Ordering::Acquire)
    }

    fn refused(&self) -> u64 {
        self.counts.refused.load(Ordering::Acquire)
    }

    fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::Acquire)
    }
}

impl Drop for RefusingH2 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    Ok((head[3], head[4], id, payload))
}

fn write_frame(s: &mut TcpStream, kind: u8, flags: u8, id: u32, payload: &[u8]) {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(payload);
    // A write to a connection the agent already closed just ends this connection's thread.
    let _ = s.write_all(&frame);
}

fn answer(s: &mut TcpStream, id: u32, counts: &Counts) {
    // Counted first: once the client has every answer, the count is complete.
    counts.answered.fetch_add(1, Ordering::AcqRel);
    write_frame(s, HEADERS, END_HEADERS | END_STREAM, id, STATUS_200);
}

/// One connection: the preface, settings, then every request (HEADERS and any DATA up to
/// END_STREAM) answered with an empty 200, or, with `refuse = (gather, keep)`, the
/// refusal described at [`RefusingH2`].
fn serve(mut s: TcpStream, counts: &Counts, refuse: Option<(usize, usize)>) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface)?;
    assert_eq!(
        &preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "an h2c client"
    );
    write_frame(&mut s, SETTINGS, 0, 0, &[]);
    // Streams whose HEADERS came, whose request fully arrived, and the GOAWAY's last id.
    let mut opened: BTreeSet<u32> = BTreeSet::new();
    let mut arrived: BTreeSet<u32> = BTreeSet::new();
    let mut last: Option<u32> = None;
    let mut answered: BTreeSet<u32> = BTreeSet::new();
    loop {
        let (kind, flags, id, payload) = read_frame(&mut s)?;
        match kind {
            SETTINGS if flags & ACK == 0 => write_frame(&mut s, SETTINGS, ACK, 0, &[]),
            PING if flags & ACK == 0 => write_frame(&mut s, PING, ACK, 0, &payload),
            GOAWAY => return Ok(()),
            HEADERS => {
                opened.insert(id);
            }
            DATA if !payload.is_empty() => {
                // Gives the connection's flow-control window back (streams are small).
                let n = (payload.len() as u32).to_be_bytes();
                write_frame(&mut s, WINDOW_UPDATE, 0, 0, &n);
            }
            _ => {}
        }
        if !(matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0) {
            continue;
        }
        let Some((gather, keep)) = refuse else {
            answer(&mut s, id, counts);
            continue;
        };
        match last {
            // A request at or below the last stream id that finished arriving after the
            // GOAWAY: the GOAWAY promised to process it.
            Some(l) if id <= l => {
                answer(&mut s, id, counts);
                answered.insert(id);
            }
            // Above it: ignored, as RFC 9113 §6.8 has it (the client knows it is refused).
            Some(_) => {}
            None => {
                arrived.insert(id);
                if arrived.len() < gather {
                    continue;
                }
                // All of these are in the server's hands; the GOAWAY refuses all streams
                // above the `keep`-th one opened (requests still arriving below it are
                // answered when they have).
                let l = *opened.iter().nth(keep - 1).expect("keep <= gather");
                let mut goaway = l.to_be_bytes().to_vec();
                goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                write_frame(&mut s, GOAWAY, 0, 0, &goaway);
                for &id in arrived.range(..=l) {
                    answer(&mut s, id, counts);
                    answered.insert(id);
                }
                let refused = arrived.range(l + 1..).count() as u64;
                counts.refused.fetch_add(refused, Ordering::AcqRel);
                last = Some(l);
            }
        }
        let Some(l) = last else { continue };
        if opened.range(..=l).any(|id| !answered.contains(id)) {
            continue;
        }
        // Closes the way nginx does: our side first, then whatever the client still sends
        // is read until it closes too, so no reset destroys the answers in flight.
        s.shutdown(Shutdown::Write)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut sink = [0u8; 4096];
        while s.read(&mut sink)? > 0 {}
        return Ok(());
    }
}

fn h2load_count(stdout: &str, line: &str, what: &str) -> Option<u64> {
    let l = stdout.lines().find(|l| l.starts_with(line))?;
    l.split(',').map(str::trim).find_map(|part| {
        let part = part.rsplit(':').next().unwrap_or(part).trim();
        let (n, label) = part.split_once(' ')?;
        (label.trim() == what).then(|| n.parse().ok()).flatten()
    })
}

#[test]
fn posts_above_a_goaways_last_stream_id_are_sent_again_on_a_new_connection() {
    let cg = TestCgroup::new("goaway-below").expect("cgroup");
    let agent = TestAgent::start(cg.path()).expect("agent");
    // 16 POSTs at once on one upstream connection; the instance takes 8, keeps 2.
    let instance = RefusingH2::start(8, 2);
    agent.deploy("refusing-svc", instance.addr.port()).unwrap();
    let body = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(body.path(), "order=42&".repeat(100)).expect("write body");
    let mut cmd = cg.command("h2load");
    cmd.args(["-n", "64", "-c", "1", "-m", "16", "-T", "30", "-d"])
        .arg(body.path())
        .arg("http://refusing-svc.svc/pay")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let child = cmd.spawn().expect("h2load");
    let out = vm_tests::client::wait_output(child, vm_tests::slack(Duration::from_secs(120)))
        .expect("h2load finished");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = agent.log();
    // The log without the lines of requests that went well.
    let notable: Vec<&str> = log.lines().filter(|l| !l.contains("status=200")).collect();
    let notable = tail(&notable.join("\n"), 60);
    let status = agent.ctl_json(&["status"]).expect("status");
    let sent_again = status["http"]["unprocessed"].as_u64().unwrap_or(0);
    eprintln!(
        "MEASURED: instance refused {} of the first connection's requests, answered {} on {} connections; agent sent {sent_again} again",
        instance.refused(),
        instance.answered(),
        instance.connections()
    );
    let done = h2load_count(&stdout, "requests:", "done");
    let ok = h2load_count(&stdout, "status codes:", "2xx");
    assert_eq!(
        (done, ok),
        (Some(64), Some(64)),
        "every POST answered 200\n{stdout}\n{notable}"
    );
    assert!(
        instance.refused() >= 6,
        "the GOAWAY refused at least 6 requests it had: {}",
        instance.refused()
    );
    // The refused ones were processed once, on the new connection; none twice.
    assert_eq!(instance.answered(), 64, "each POST processed exactly once");
    assert!(
        instance.connections() >= 2,
        "a new connection took the rest"
    );
    assert!(
        sent_again >= 6,
        "the refused POSTs were sent again: {sent_again}"
    );
    assert_eq!(
        agent.orphaned_requests(),
        0,
        "no request waited on the closed connection\n{}",
        tail(&log, 40)
    );
}
