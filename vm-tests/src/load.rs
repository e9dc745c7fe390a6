//! The steady load of the upgrade tests: real Python `http.client` callers inside a meshed
//! cgroup calling `http://NAME.svc/`, counting every failure with its start time.

use crate::cgroup::TestCgroup;

/// A steady client inside the cgroup: four threads, a new connection (and DNS lookup) per
/// request, like unmodified programs calling `http://NAME.svc/` in a loop, and a fifth that
/// reuses ONE kept-alive `http.client` connection for sequential requests (reconnecting only
/// when the server said `Connection: close`, as http.client does). Prints a JSON summary
/// with the start time of every request.
pub const LOAD: &str = r#"
import http.client, json, sys, threading, time
svc, dur, rps = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
WORKERS = 4
lock = threading.Lock()
fails = []
oks = []
start = time.monotonic()

def worker(w):
    n = 0
    while True:
        now = time.monotonic()
        if now - start >= dur:
            return
        target = start + (n + w / WORKERS) * WORKERS / rps
        if target > now:
            time.sleep(target - now)
        n += 1
        # Wall-clock seconds, so the test can line requests up with its own events.
        t = time.time()
        try:
            c = http.client.HTTPConnection(svc + '.svc', 80, timeout=5)
            c.request('GET', '/load/%d/%d' % (w, n))
            r = c.getresponse()
            r.read()
            c.close()
            with lock:
                if r.status == 200:
                    oks.append(t)
                else:
                    fails.append([t, r.status])
        except Exception as e:
            with lock:
                fails.append([t, type(e).__name__])

keepalive = [0]

def kept_alive():
    c = http.client.HTTPConnection(svc + '.svc', 80, timeout=5)
    n = 0
    while time.monotonic() - start < dur:
        n += 1
        t = time.time()
        try:
            c.request('GET', '/kept/%d' % n)
            r = c.getresponse()
            r.read()
            with lock:
                if r.status == 200:
                    oks.append(t)
                    keepalive[0] += 1
                else:
                    fails.append([t, r.status, 'kept-alive'])
        except Exception as e:
            with lock:
                fails.append([t, type(e).__name__, 'kept-alive'])
            c.close()
        time.sleep(0.01)

threads = [threading.Thread(target=worker, args=(w,)) for w in range(WORKERS)]
threads.append(threading.Thread(target=kept_alive))
for th in threads:
    th.start()
for th in threads:
    th.join()
oks.sort()
print(json.dumps({"ok": len(oks), "kept_alive_ok": keepalive[0], "fails": fails, "oks": oks}))
"#;

/// Starts [`LOAD`] in `cg` against `http://SERVICE.svc/` for `secs` at `rps`.
pub fn start_load(cg: &TestCgroup, service: &str, secs: u32, rps: u32) -> std::process::Child {
    cg.command("python3")
        .args(["-c", LOAD, service, &secs.to_string(), &rps.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (run `cargo xtask setup`)")
}

/// Waits for the load to end and parses its summary.
pub fn finish_load(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "load client output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
