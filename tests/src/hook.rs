//! A man in the middle of an application's hook connection: the real application connects to
//! the proxy's socket, the proxy to the agent's, and every line passes through a filter that
//! may forward, change, drop, hold it or cut the connection. So tests exercise the real
//! applications' sessions (frozen, imported, unfrozen, dropped) while the hook misbehaves.
//! A line of a version 2 connection travels with the raw bytes it announces: forwarded,
//! held or dropped with it (a replacement line goes without them).

use std::{
    io::{BufRead, BufReader, ErrorKind, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// Which way a line goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the application to the agent (registrations, answers).
    ToAgent,
    /// From the agent to the application (requests).
    ToApp,
}

/// What the proxy does with a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Forward,
    /// Sends this line instead, and these raw bytes after it (version 2; empty: none).
    Replace(String, Vec<u8>),
    Drop,
    /// Forwards it, then closes the connection on both sides (the application reconnects).
    ForwardThenCut,
    /// Drops it and closes the connection on both sides.
    Cut,
    /// Holds it this long, then forwards it (lines after it wait too).
    Delay(Duration),
}

/// Decides what happens to each line.
pub type Filter = dyn Fn(Dir, &str) -> Action + Send + Sync;

/// A running proxy; stops (closing its connections) when dropped.
pub struct HookProxy {
    pub path: PathBuf,
    /// Every line seen (the first 4096 characters), with its direction, in order.
    pub seen: Arc<Mutex<Vec<(Dir, String)>>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl HookProxy {
    /// Listens at `path` and relays every connection to the agent's hook at `agent` through
    /// `filter`.
    #[must_use]
    pub fn start(path: &Path, agent: &Path, filter: Arc<Filter>) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("proxy socket {}: {e}", path.display()));
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, conns, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let (s, c, sn, agent) = (stop.clone(), conns.clone(), seen.clone(), agent.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((app, _)) => {
                        let _ = app.set_nonblocking(false);
                        let Ok(to_agent) = UnixStream::connect(&agent) else { continue };
                        for x in [&app, &to_agent] {
                            if let Ok(x) = x.try_clone() {
                                c.lock().expect("lock").push(x);
                            }
                        }
                        let pair = [app, to_agent];
                        for (from, to, dir) in [(0, 1, Dir::ToAgent), (1, 0, Dir::ToApp)] {
                            let (r, w) = (pair[from].try_clone().expect("clone"), pair[to].try_clone().expect("clone"));
                            let both = [pair[0].try_clone().expect("clone"), pair[1].try_clone().expect("clone")];
                            let (filter, seen, stop) = (filter.clone(), sn.clone(), s.clone());
                            std::thread::spawn(move || pump(r, w, &both, dir, &*filter, &seen, &stop));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { path: path.to_path_buf(), seen, stop, conns, thread: Some(thread) }
    }

    /// The lines seen so far going `dir` that contain `needle`.
    #[must_use]
    pub fn lines(&self, dir: Dir, needle: &str) -> Vec<String> {
        self.seen.lock().expect("lock").iter().filter(|(d, l)| *d == dir && l.contains(needle)).map(|(_, l)| l.clone()).collect()
    }
}

fn pump(r: UnixStream, mut w: UnixStream, both: &[UnixStream; 2], dir: Dir, filter: &Filter, seen: &Mutex<Vec<(Dir, String)>>, stop: &AtomicBool) {
    let _ = r.set_read_timeout(Some(Duration::from_millis(200)));
    let mut r = BufReader::new(r);
    let (mut line, mut raw) = (Vec::new(), Vec::new());
    // Learnt from the register line (to the agent) or its answer (to the application).
    let mut v2 = false;
    let cut = || {
        for s in both {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match r.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) if line.last() == Some(&b'\n') => {}
            Ok(_) => break,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        }
        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let head = redirector_hook::frame::Head::parse(&line[..line.len() - 1]);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && (v["op"] == "register" || v["op"] == "registered")
        {
            // Version 2 and later send raw bytes after a line (descriptors of version 3 are
            // not passed on: no connection moves through this proxy).
            v2 = v["version"].as_u64().is_some_and(|n| n >= 2);
        }
        raw.clear();
        if v2
            && let Ok(h) = head
            && h.bytes > 0
        {
            raw.resize(usize::try_from(h.bytes).expect("a size"), 0);
            if read_patiently(&mut r, &mut raw, stop).is_err() {
                break;
            }
        }
        line.extend_from_slice(&raw);
        seen.lock().expect("lock").push((dir, text.chars().take(4096).collect()));
        let ok = match filter(dir, &text) {
            Action::Forward => w.write_all(&line).is_ok(),
            Action::Replace(s, raw) => w.write_all(format!("{s}\n").as_bytes()).and_then(|()| w.write_all(&raw)).is_ok(),
            Action::Drop => true,
            Action::ForwardThenCut => {
                // What was written reaches the other side before it sees the end.
                let _ = w.write_all(&line);
                cut();
                return;
            }
            Action::Cut => {
                cut();
                return;
            }
            Action::Delay(d) => {
                std::thread::sleep(d);
                w.write_all(&line).is_ok()
            }
        };
        if !ok {
            break;
        }
        line.clear();
    }
    cut();
}

/// Fills `buf` from `r` across read timeouts (its polling interval) and stops.
fn read_patiently(r: &mut impl BufRead, buf: &mut [u8], stop: &AtomicBool) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let n = match r.fill_buf() {
            Ok([]) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(b) => {
                let n = b.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&b[..n]);
                n
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) && !stop.load(Ordering::Relaxed) => 0,
            Err(e) => return Err(e),
        };
        r.consume(n);
        at += n;
    }
    Ok(())
}

impl Drop for HookProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.conns.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
