//! `h2-load URL SECONDS RPS WORKERS`: an HTTP/2 (h2c, prior knowledge) caller built the way
//! Rust services call each other: hyper-util's pooled client, one connection multiplexed by
//! `WORKERS` tasks, each sending `RPS` paced sequential GETs for `SECONDS`. Like browsers and
//! gRPC clients (and unlike h2load), it opens a new connection after a GOAWAY. Prints one
//! JSON line: `{"ok": N, "fails": [...]}`. Tests run it inside the test cgroup with URL
//! `http://NAME.svc/...`, so every request goes through the mesh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, secs, rps, workers] = args.as_slice() else {
        eprintln!("usage: h2-load URL SECONDS RPS WORKERS");
        std::process::exit(2);
    };
    let parse = |s: &str| s.parse::<f64>().unwrap_or_else(|_| std::process::exit(2));
    let (secs, rps, workers) = (parse(secs), parse(rps), parse(workers) as usize);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let oks = Arc::new(Mutex::new(0u64));
    let fails = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, oks, fails, url) = (client.clone(), oks.clone(), fails.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                n += 1;
                let target = start + Duration::from_secs_f64(n as f64 / rps);
                tokio::time::sleep_until(target.into()).await;
                let uri: hyper::Uri = match format!("{url}/{w}/{n}").parse() {
                    Ok(u) => u,
                    Err(e) => {
                        fails.lock().unwrap().push(format!("bad url: {e}"));
                        return;
                    }
                };
                let call = async {
                    let resp = client.get(uri).await.map_err(|e| format!("{e:?}"))?;
                    let status = resp.status();
                    let version = resp.version();
                    resp.into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("body: {e}"))?;
                    if status == 200 && version == hyper::Version::HTTP_2 {
                        Ok(())
                    } else {
                        Err(format!("{status} {version:?}"))
                    }
                };
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(())) => *oks.lock().unwrap() += 1,
                    Ok(Err(e)) => fails.lock().unwrap().push(e),
                    Err(_) => fails.lock().unwrap().push("timeout after 5 s".into()),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let ok = *oks.lock().unwrap();
    let fails = fails.lock().unwrap().clone();
    println!("{}", serde_json::json!({"ok": ok, "fails": fails}));
}
