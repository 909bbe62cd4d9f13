//! The listening side: binds the socket root-only and hands each request to the daemon.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
    sync::Arc,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::{Request, Response};

/// Longest request accepted (a policy file is sent inline).
const MAX_REQUEST: usize = 1 << 20;

/// Handles one decoded request.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> Response;
}

/// Binds the control socket with mode 0600 in a 0700 directory, replacing a stale socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Create the socket with no access for others from the start.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, handler).await {
                        tracing::debug!(error = %e, "Control connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Accepting on the control socket failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, handler: Arc<dyn Handler>) -> std::io::Result<()> {
    // Only root may drive the daemon, whatever the socket's mode says.
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let response = if cred.uid() != 0 {
        Response::error("permission denied: only root may use the egressd control socket")
    } else {
        let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let handler = handler.clone();
                tokio::task::spawn_blocking(move || handler.handle(req))
                    .await
                    .unwrap_or_else(|e| Response::error(format!("internal error: {e}")))
            }
            Err(e) => Response::error(format!("malformed request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}
