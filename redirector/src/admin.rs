//! The admin socket: a Unix socket (mode 0600) answering `status` with one JSON document.

use std::{os::unix::fs::PermissionsExt as _, sync::Arc};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixListener,
};
use tracing::warn;

use crate::agent::Agent;

/// Serves the admin socket until the process ends.
pub async fn serve(agent: Arc<Agent>) {
    if let Err(e) = serve_inner(agent).await {
        warn!("admin socket: {e:#}");
    }
}

async fn serve_inner(agent: Arc<Agent>) -> anyhow::Result<()> {
    let path = agent.admin_socket();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let answer = match line.trim() {
                "status" => agent.status(),
                other => serde_json::json!({ "error": format!("unknown request {other:?}: try status") }),
            };
            let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}

/// `redirector status`: asks a running agent.
pub fn query(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use std::io::{BufRead as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to the agent's admin socket {} (is the agent running?)", path.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).context("reading the agent's answer")?;
    serde_json::from_str(&line).context("parsing the agent's answer")
}
