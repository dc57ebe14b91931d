//! A crowd of busy HTTP clients of the demo application: each client loops on its own
//! keep-alive connection, checking its session on every answer (`HttpClient`), in threads of
//! ten; bounded in time and in requests per client. Clients can be sent home early (they stop
//! and close their connection); at the end every client still running makes one more request
//! on a fresh connection, which lands wherever the kernel steers it now, so a session left
//! behind, stale or forked, shows.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::http::HttpClient;

/// Clients per thread.
const PER_THREAD: usize = 10;

/// The running crowd.
pub struct Crowd {
    stop: Arc<AtomicBool>,
    gone: Arc<Mutex<HashSet<IpAddr>>>,
    threads: Vec<std::thread::JoinHandle<Vec<(HttpClient, bool)>>>,
}

impl Crowd {
    /// Starts one client per (source address, destination) in namespace `ns`; each stops by
    /// itself after `limit` or `max_requests` requests.
    #[must_use]
    pub fn start(ns: &str, clients: &[(IpAddr, SocketAddr)], limit: Duration, max_requests: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let gone: Arc<Mutex<HashSet<IpAddr>>> = Arc::default();
        let deadline = Instant::now() + limit;
        let threads = clients
            .chunks(PER_THREAD)
            .map(|chunk| {
                let (ns, chunk, stop, gone) = (ns.to_string(), chunk.to_vec(), stop.clone(), gone.clone());
                std::thread::spawn(move || {
                    let mut cl: Vec<(HttpClient, bool)> = chunk.iter().map(|(src, dst)| (HttpClient::new(&ns, *src, *dst), true)).collect();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let mut any = false;
                        for (c, running) in &mut cl {
                            if !*running {
                                continue;
                            }
                            if c.requests >= max_requests || gone.lock().expect("lock").contains(&c.src) {
                                // Sent home: its connection closes now.
                                c.reconnect();
                                *running = false;
                                continue;
                            }
                            c.request();
                            any = true;
                        }
                        if !any {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    cl
                })
            })
            .collect();
        Self { stop, gone, threads }
    }

    /// Stops these clients (they close their connections).
    pub fn send_home(&self, clients: &[IpAddr]) {
        self.gone.lock().expect("lock").extend(clients.iter().copied());
    }

    /// Stops every client, as they are (each keeps the connections it had).
    #[must_use]
    pub fn stop(mut self) -> Vec<HttpClient> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.threads).into_iter().flat_map(|t| t.join().expect("client thread")).map(|(c, _)| c).collect()
    }

    /// Stops every client; those still running make one more request on a fresh connection.
    #[must_use]
    pub fn finish(mut self) -> Vec<HttpClient> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in std::mem::take(&mut self.threads) {
            for (mut c, running) in t.join().expect("client thread") {
                if running {
                    c.reconnect();
                    c.request();
                }
                out.push(c);
            }
        }
        out
    }
}

impl Crowd {
    /// [`Crowd::finish`], then checks that every client's last answer (on its fresh
    /// connection) came from where `steering` says it is steered (client -> server name; a
    /// client it does not list: `home`). Clients whose steering changed while the crowd
    /// stopped (a round moved them meanwhile) are not checked.
    #[must_use]
    pub fn finish_where_steered(self, home: &str, steering: impl Fn() -> BTreeMap<IpAddr, String>) -> Vec<HttpClient> {
        let before = steering();
        let clients = self.finish();
        let after = steering();
        for cl in &clients {
            if before.get(&cl.src) != after.get(&cl.src) {
                continue;
            }
            let want = after.get(&cl.src).map_or_else(|| home.to_string(), |to| to.to_uppercase());
            assert_eq!(cl.last_server.as_deref(), Some(want.as_str()), "{} ends where the rules send it ({want}): {}", cl.src, cl.history());
        }
        clients
    }
}

/// The clients that lost a request or broke their session, described.
#[must_use]
pub fn broken(clients: &[HttpClient]) -> Vec<String> {
    clients.iter().filter(|c| !c.intact()).map(HttpClient::problems).collect()
}

/// How long a crowd dropped unfinished (its test failed) waits for its clients to stop.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl Drop for Crowd {
    /// A test that fails before it finishes its crowd: the clients stop (after the request
    /// each has under way, for up to [`STOP_WAIT`]) before the namespaces they use go, instead
    /// of failing on there, each with a panic of its own after the test's.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + STOP_WAIT;
        while Instant::now() < deadline && self.threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
