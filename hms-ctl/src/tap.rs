//! Printing a tap: one line per event as a table (`-o table`, `-o wide`) or one JSON object
//! per line (`-o json`, for jq). Request headers appear only when named with `--header`.

use std::io::Write;

use hms_ctl::api::{TapEvent, TapKind, TapMessage};

use crate::Output;

pub struct Printer {
    service: String,
    output: Output,
    headers: Vec<String>,
}

impl Printer {
    pub fn new(service: &str, output: Output, headers: Vec<String>) -> Printer {
        Printer {
            service: service.to_string(),
            output,
            headers,
        }
    }

    pub fn header(&self) {
        if self.output == Output::Json {
            return;
        }
        let mut cols = vec![
            "TIME", "DIR", "CALLER", "CALLEE", "METHOD", "PATH", "STATUS", "LATENCY", "BYTES",
            "RETRIES", "TRACE",
        ];
        if self.output == Output::Wide {
            cols.extend(["PROCESS", "UPSTREAM", "MESH", "RTT"]);
        }
        // Each column escaped on its own: the tabs between them are the layout (escaping the
        // joined line printed them as `\x09`).
        let line: Vec<_> = cols
            .into_iter()
            .chain(self.headers.iter().map(String::as_str))
            .map(hms_ctl::escape::cell)
            .collect();
        println!("{}", line.join("\t"));
    }

    /// Prints one message; false ends the stream.
    pub fn message(&self, m: TapMessage) -> anyhow::Result<bool> {
        let mut out = std::io::stdout().lock();
        match m {
            TapMessage::Event(e) => {
                match self.output {
                    Output::Json => {
                        let mut e = *e;
                        e.headers.retain(|(k, _)| self.headers.contains(k));
                        writeln!(out, "{}", serde_json::to_string(&e)?)?;
                    }
                    _ => writeln!(out, "{}", self.row(&e))?,
                }
                out.flush()?;
                Ok(true)
            }
            TapMessage::Lost { count } => {
                eprintln!("hms-ctl: this tap read too slowly and missed {count} events");
                Ok(true)
            }
            TapMessage::End => Ok(false),
            TapMessage::Error { message } => anyhow::bail!("{message}"),
        }
    }

    fn row(&self, e: &TapEvent) -> String {
        let dir = if e.callee == self.service {
            "in"
        } else {
            "out"
        };
        let time = format_time(e.time_unix_ms);
        let (method, path, status, bytes) = match e.kind {
            TapKind::Http => (
                e.method.clone().unwrap_or_default(),
                e.path.clone().unwrap_or_default(),
                e.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                format!("{}/{}", e.request_bytes, e.response_bytes),
            ),
            TapKind::Tcp => (
                "TCP".into(),
                "-".into(),
                "-".into(),
                format!("{}/{}", e.request_bytes, e.response_bytes),
            ),
        };
        let mut cols = vec![
            time,
            dir.to_string(),
            e.caller.clone(),
            e.callee.clone(),
            method,
            path,
            status,
            format!("{:.1}ms", e.latency_ms),
            bytes,
            e.retries.to_string(),
            e.trace_id.clone().unwrap_or_else(|| "-".into()),
        ];
        if self.output == Output::Wide {
            cols.push(e.caller_process.clone());
            cols.push(e.upstream.clone().unwrap_or_else(|| "-".into()));
            cols.push(e.mesh_error.clone().unwrap_or_else(|| "-".into()));
            cols.push(
                e.rtt_us
                    .map(|r| format!("{:.2}ms", f64::from(r) / 1000.0))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        for h in &self.headers {
            cols.push(
                e.headers
                    .iter()
                    .find(|(k, _)| k == h)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        // Every cell may carry a caller's bytes (comm, path, headers): escaped, so none can
        // drive the terminal or add a column.
        cols.iter()
            .map(|c| hms_ctl::escape::cell(c))
            .collect::<Vec<_>>()
            .join("\t")
    }
}

/// `HH:MM:SS.mmm` in UTC: short, sortable, no time-zone database needed.
fn format_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        unix_ms % 1000
    )
}
