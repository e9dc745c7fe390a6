//! Talking to a running agent over its admin socket. Owns socket discovery and the
//! request/response exchange; knows nothing about how results are printed.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{DEFAULT_SOCKET, Request, Response};

/// `--socket`, else `HMS_SOCKET`, else the default path.
pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("HMS_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// Connects to the agent, or says what to do when it is not there.
async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the HMS agent at {} ({e}). Is it running? Start it with \
             `sudo hms-node-agent run`, or point hms-ctl at it with --socket PATH or HMS_SOCKET.",
            socket.display()
        )
    })
}

/// Sends one request and returns the `data` of an `ok` answer; an `error` answer becomes an
/// error carrying the agent's message.
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let stream = connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .context("sending the request to the agent")?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    let n = reader
        .read_line(&mut answer)
        .await
        .context("reading the agent's answer")?;
    if n == 0 {
        bail!("the agent closed the connection without answering; see its log");
    }
    match serde_json::from_str::<Response>(&answer).context("decoding the agent's answer")? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => bail!("{message}"),
    }
}

/// Sends a streaming request (a tap) and hands each answer line to `on_message` until the
/// agent ends the stream or `on_message` returns false.
pub async fn stream(
    socket: &Path,
    request: &Request,
    mut on_message: impl FnMut(crate::api::TapMessage) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let stream = connect(socket).await?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    write
        .write_all(&line)
        .await
        .context("sending the request to the agent")?;
    let mut reader = BufReader::new(read);
    let mut answer = String::new();
    loop {
        answer.clear();
        if reader
            .read_line(&mut answer)
            .await
            .context("reading from the agent")?
            == 0
        {
            bail!("the agent closed the tap (did it stop?)");
        }
        let message: crate::api::TapMessage =
            serde_json::from_str(&answer).context("decoding the agent's tap line")?;
        if !on_message(message)? {
            return Ok(());
        }
    }
}
