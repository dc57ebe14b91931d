//! The application hook: a local Unix socket (mode 0660, owner configurable) the application
//! connects to. It registers its service, then answers the agent's requests: export (freeze and
//! return session blobs), import, commit, abort. Newline-delimited JSON, base64 blobs; the
//! protocol is specified in docs/app-protocol.md.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::peer::SessionBlob;

/// An application's answer, kept as raw text: big exports are parsed once, into typed
/// structures, by the caller that needs them.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<String>>>>;

#[derive(serde::Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Just the id of an answer, to route it.
#[derive(serde::Deserialize)]
struct Id {
    id: Option<u64>,
}

#[derive(serde::Deserialize)]
struct ExportAnswer {
    #[serde(default)]
    sessions: Option<Vec<WireSession>>,
}

#[derive(serde::Deserialize, serde::Serialize)]
struct WireSession {
    client: String,
    blob: String,
}

#[derive(serde::Serialize)]
struct ImportRequest<'a> {
    id: u64,
    op: &'static str,
    handoff: &'a str,
    sessions: Vec<WireSession>,
}

struct AppConn {
    tx: mpsc::Sender<String>,
    pending: Pending,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// Registered applications, by the service they serve.
#[derive(Default)]
pub struct Apps {
    by_service: Mutex<HashMap<SocketAddr, Arc<AppConn>>>,
}

/// Limits for requests to applications.
#[derive(Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub max_session_bytes: usize,
}

impl Apps {
    /// Whether an application registered for `service`.
    #[must_use]
    pub fn has(&self, service: SocketAddr) -> bool {
        self.by_service.lock().expect("lock").contains_key(&service)
    }

    async fn request(&self, service: SocketAddr, mut req: Value, timeout: Duration) -> anyhow::Result<String> {
        let app = self.by_service.lock().expect("lock").get(&service).cloned().ok_or_else(|| anyhow!("no application registered for {service}"))?;
        let id = app.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        req["id"] = json!(id);
        self.send(&app, service, id, req.to_string(), timeout).await
    }

    async fn send(&self, app: &AppConn, service: SocketAddr, id: u64, line: String, timeout: Duration) -> anyhow::Result<String> {
        let (tx, rx) = oneshot::channel();
        app.pending.lock().expect("lock").insert(id, tx);
        // Queueing the request counts against the timeout too: an application that stops
        // reading never holds the agent up.
        let r = tokio::time::timeout(timeout, async {
            app.tx.send(line).await.map_err(|_| anyhow!("the application for {service} disconnected"))?;
            Ok::<_, anyhow::Error>(rx.await)
        })
        .await;
        app.pending.lock().expect("lock").remove(&id);
        let text = r
            .map_err(|_| anyhow!("the application for {service} did not answer within {} ms", timeout.as_millis()))??
            .map_err(|_| anyhow!("the application for {service} disconnected"))?;
        let a: Answer = serde_json::from_str(&text).map_err(|e| anyhow!("the application for {service} answered with malformed JSON: {e}"))?;
        if !a.ok {
            bail!("the application for {service} refused: {}", a.error.as_deref().unwrap_or("no reason given"));
        }
        Ok(text)
    }

    /// Exports (and freezes) the sessions of `clients`.
    pub async fn export(&self, service: SocketAddr, handoff: &str, clients: &[IpAddr], lim: Limits) -> anyhow::Result<Vec<SessionBlob>> {
        let clients: Vec<String> = clients.iter().map(ToString::to_string).collect();
        let text = self.request(service, json!({"op": "export", "handoff": handoff, "clients": clients}), lim.timeout).await?;
        let v: ExportAnswer = serde_json::from_str(&text).map_err(|e| anyhow!("the application's export is malformed: {e}"))?;
        let list = v.sessions.ok_or_else(|| anyhow!("the application's export has no sessions list"))?;
        let mut out = Vec::with_capacity(list.len());
        for s in list {
            let client: IpAddr = s.client.parse().map_err(|_| anyhow!("the application exported a session for {:?}, not an address", s.client))?;
            let blob = STANDARD.decode(&s.blob).map_err(|e| anyhow!("session of {client}: blob is not base64: {e}"))?;
            if blob.len() > lim.max_session_bytes {
                bail!("session of {client} is {} bytes, over the limit of {} (max_session_bytes)", blob.len(), lim.max_session_bytes);
            }
            out.push(SessionBlob { client, blob });
        }
        Ok(out)
    }

    /// Imports sessions moved here.
    pub async fn import(&self, service: SocketAddr, handoff: &str, sessions: &[SessionBlob], lim: Limits) -> anyhow::Result<()> {
        let app = self.by_service.lock().expect("lock").get(&service).cloned().ok_or_else(|| anyhow!("no application registered for {service}"))?;
        let id = app.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = ImportRequest {
            id,
            op: "import",
            handoff,
            sessions: sessions.iter().map(|s| WireSession { client: s.client.to_string(), blob: STANDARD.encode(&s.blob) }).collect(),
        };
        let line = serde_json::to_string(&req)?;
        self.send(&app, service, id, line, lim.timeout).await.map(|_| ())
    }

    /// Commits (`true`) or aborts a hand-over; failures are logged, not returned.
    pub async fn finish(&self, service: SocketAddr, handoff: &str, commit: bool, lim: Limits) {
        let op = if commit { "commit" } else { "abort" };
        if let Err(e) = self.request(service, json!({"op": op, "handoff": handoff}), lim.timeout).await {
            warn!(%service, handoff, "{op} to the application failed: {e:#}");
        }
    }
}

/// Serves the hook socket at `path` until the process ends.
pub async fn serve(apps: Arc<Apps>, path: PathBuf, owner: Option<(u32, u32)>) {
    if let Err(e) = serve_inner(apps, &path, owner).await {
        warn!("application hook {}: {e:#}", path.display());
    }
}

async fn serve_inner(apps: Arc<Apps>, path: &std::path::Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g)).with_context(|| format!("chown {u}:{g} {}", path.display()))?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let apps = apps.clone();
        tokio::spawn(async move {
            if let Err(e) = app_conn(apps, stream).await {
                warn!("application connection closed: {e:#}");
            }
        });
    }
}

async fn app_conn(apps: Arc<Apps>, stream: UnixStream) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let first = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await.map_err(|_| anyhow!("no register line within 5 s"))??.ok_or_else(|| anyhow!("closed before registering"))?;
    let reg: Value = serde_json::from_str(&first).map_err(|e| anyhow!("bad register line: {e}"))?;
    let service: SocketAddr = if let (Some("register"), Some(s)) = (reg["op"].as_str(), reg["service"].as_str().and_then(|s| s.parse().ok())) { s } else {
        let _ = w.write_all(format!("{}\n", json!({"op": "error", "error": "expected {\"op\":\"register\",\"service\":\"ADDR:PORT\"}"})).as_bytes()).await;
        bail!("bad register line {first:?}");
    };
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let pending: Pending = Arc::default();
    let conn = Arc::new(AppConn { tx, pending: pending.clone(), next: Arc::default() });
    apps.by_service.lock().expect("lock").insert(service, conn.clone());
    w.write_all(format!("{}\n", json!({"op": "registered", "service": service.to_string()})).as_bytes()).await?;
    info!(%service, "application registered");
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(line) = out else { return Ok(()) };
                    w.write_all(line.as_bytes()).await?;
                    w.write_all(b"\n").await?;
                }
                line = lines.next_line() => {
                    let Some(line) = line? else { bail!("the application closed the hook") };
                    // Only the id is read here; the caller parses the rest.
                    let Ok(Id { id: Some(id) }) = serde_json::from_str::<Id>(&line) else {
                        warn!(%service, "ignoring a malformed line from the application");
                        continue;
                    };
                    if let Some(tx) = pending.lock().expect("lock").remove(&id) {
                        let _ = tx.send(line);
                    }
                }
            }
        }
    }
    .await;
    let mut map = apps.by_service.lock().expect("lock");
    if map.get(&service).is_some_and(|c| Arc::ptr_eq(c, &conn)) {
        map.remove(&service);
    }
    result
}
