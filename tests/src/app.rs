//! A small line-protocol TCP service for the test servers, and clients bound to a chosen
//! source address. Every socket has timeouts, so nothing hangs.
//!
//! Protocol (keep-alive, several requests per connection):
//! - `WHO` -> `<name> <client address seen> <local address>`
//! - `UPLOAD <n>` then n bytes -> `<name> <sha256 hex of the bytes>`
//! - `DOWNLOAD <n> <seed>` -> n bytes of the stream [`pattern`]`(seed)`
//! - `BYE` -> the server closes the connection (first, as HTTP/1.0 or `Connection: close`
//!   servers do, so the server's side ends in `TIME_WAIT`)

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use sha2::{Digest as _, Sha256};

use crate::{io::Patient, net::in_netns};

const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// The deterministic byte stream of DOWNLOAD, `len` bytes.
#[must_use]
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A running test server; stops when dropped.
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts server `name` listening on `addr` inside namespace `ns`.
    #[must_use]
    pub fn start(ns: &str, name: &str, addr: SocketAddr) -> Self {
        let listener = in_netns(ns, move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        Self::serve_on(listener, name, addr)
    }

    /// Starts server `name` on `addr` in this process's own namespace.
    #[must_use]
    pub fn start_here(name: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::serve_on(listener, name, addr)
    }

    fn serve_on(listener: TcpListener, name: &str, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a, n) = (stop.clone(), accepted.clone(), name.to_string());
        let thread = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
            while !s.load(Ordering::Relaxed) {
                // Wait up to 50 ms for a connection, so a stop request is noticed.
                let mut pfd = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }];
                // SAFETY: pfd is a valid array of one pollfd.
                if unsafe { libc::poll(pfd.as_mut_ptr(), 1, 50) } <= 0 {
                    continue;
                }
                match listener.accept() {
                    Ok((conn, peer)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let (n, s) = (n.clone(), s.clone());
                        std::thread::spawn(move || serve(&n, conn, peer, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { name: name.into(), addr, accepted, stop, thread: Some(thread) }
    }

    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(name: &str, conn: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let local = conn.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut w = conn.try_clone().expect("clone stream");
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    let mut idle = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) && idle < IO_TIMEOUT {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => idle = Duration::ZERO,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                idle += Duration::from_millis(200);
                continue;
            }
            Err(_) => return,
        }
        let _ = r.get_ref().set_read_timeout(Some(IO_TIMEOUT));
        let f: Vec<&str> = line.split_whitespace().collect();
        let ok = match f.as_slice() {
            ["WHO"] => w.write_all(format!("{name} {} {local}\n", peer.ip()).as_bytes()).is_ok(),
            ["UPLOAD", n] => {
                let Ok(n) = n.parse::<usize>() else { return };
                let mut buf = vec![0u8; n];
                r.read_exact(&mut buf).is_ok() && w.write_all(format!("{name} {}\n", sha256_hex(&buf)).as_bytes()).is_ok()
            }
            ["DOWNLOAD", n, seed] => {
                let (Ok(n), Ok(seed)) = (n.parse::<usize>(), seed.parse::<u64>()) else { return };
                w.write_all(&pattern(seed, n)).is_ok()
            }
            ["BYE"] => {
                // This side closes first.
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            _ => false,
        };
        let _ = r.get_ref().set_read_timeout(Some(Duration::from_millis(200)));
        if !ok {
            let _ = w.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// A client connection from a chosen source address.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<Patient<TcpStream>>,
}

/// Connects from `src` to `dst` inside namespace `ns`.
pub fn try_connect(ns: &str, src: IpAddr, dst: SocketAddr) -> std::io::Result<Client> {
    try_connect_from(ns, SocketAddr::new(src, 0), dst)
}

/// Connects from `src`, its port included (0: any), to `dst` inside namespace `ns`.
pub fn try_connect_from(ns: &str, src: SocketAddr, dst: SocketAddr) -> std::io::Result<Client> {
    let stream = in_netns(ns, move || connect_here_from(src, dst))?;
    let reader = BufReader::new(Patient(stream.try_clone()?));
    Ok(Client { stream, reader })
}

/// A TCP connection from `src` to `dst` made inside namespace `ns` (3 s connect timeout,
/// 15 s I/O timeouts).
pub fn connect_tcp(ns: &str, src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    in_netns(ns, move || connect_here(src, dst))
}

/// [`connect_tcp`] in the current network namespace.
pub fn connect_here(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    connect_here_from(SocketAddr::new(src, 0), dst)
}

/// [`connect_here`] from a chosen source port too (0: any).
pub fn connect_here_from(src: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: a fresh socket, owned by the TcpStream below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created.
    let stream: TcpStream = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // Pick the port at connect time (by 4-tuple), as load generators do: with many
    // connections in TIME_WAIT, bind() alone would search the port range every time.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with an int on a valid socket.
    unsafe {
        libc::setsockopt(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, (&raw const one).cast(), 4);
    }
    let bind = nix::sys::socket::SockaddrStorage::from(src);
    nix::sys::socket::bind(fd, &bind).map_err(std::io::Error::from)?;
    // Connect with a timeout: non-blocking connect, then poll.
    stream.set_nonblocking(true)?;
    let to = nix::sys::socket::SockaddrStorage::from(dst);
    match nix::sys::socket::connect(fd, &to) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut pfd = [libc::pollfd { fd, events: libc::POLLOUT, revents: 0 }];
    // SAFETY: pfd is a valid array of one pollfd.
    let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 3000) };
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect {src} -> {dst} timed out")));
    }
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

impl Client {
    /// Connects, panicking on failure.
    #[must_use]
    pub fn connect(ns: &str, src: IpAddr, dst: SocketAddr) -> Self {
        try_connect(ns, src, dst).unwrap_or_else(|e| panic!("connect {src} -> {dst}: {e}"))
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        Ok(l.trim_end().to_string())
    }

    /// Asks who serves this connection: (server name, client address the server saw).
    pub fn try_who(&mut self) -> std::io::Result<(String, String)> {
        self.stream.write_all(b"WHO\n")?;
        let l = self.line()?;
        let mut f = l.split_whitespace();
        Ok((f.next().unwrap_or_default().to_string(), f.next().unwrap_or_default().to_string()))
    }

    /// Asks the server to close the connection, and waits until it did (end of stream).
    pub fn bye(&mut self) -> std::io::Result<()> {
        self.stream.write_all(b"BYE\n")?;
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        if rest.is_empty() { Ok(()) } else { Err(std::io::Error::other(format!("{} bytes after BYE", rest.len()))) }
    }

    /// How long a read (an answer) may take before it fails.
    pub fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))
    }

    /// Name of the server serving this connection.
    pub fn who(&mut self) -> String {
        self.try_who().unwrap_or_else(|e| panic!("WHO on {:?}: {e}", self.stream.local_addr())).0
    }

    /// The address this client believes it talks to.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        self.stream.peer_addr().expect("peer address")
    }

    #[must_use]
    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    /// Uploads `data`; returns (server name, whether the server's checksum matches).
    pub fn upload(&mut self, data: &[u8]) -> (String, bool) {
        self.stream.write_all(format!("UPLOAD {}\n", data.len()).as_bytes()).expect("upload header");
        self.stream.write_all(data).expect("upload body");
        let l = self.line().expect("upload answer");
        let mut f = l.split_whitespace();
        let name = f.next().unwrap_or_default().to_string();
        (name, f.next() == Some(sha256_hex(data).as_str()))
    }

    /// Downloads `n` bytes of the pattern for `seed`; returns whether they arrived intact.
    pub fn download(&mut self, n: usize, seed: u64) -> bool {
        self.stream.write_all(format!("DOWNLOAD {n} {seed}\n").as_bytes()).expect("download request");
        let mut buf = vec![0u8; n];
        self.reader.read_exact(&mut buf).expect("download body");
        sha256_hex(&buf) == sha256_hex(&pattern(seed, n))
    }

    /// Like [`Client::download`], reading 64 KiB at a time with `pause` between reads.
    pub fn download_paced(&mut self, n: usize, seed: u64, pause: Duration) -> bool {
        self.stream.write_all(format!("DOWNLOAD {n} {seed}\n").as_bytes()).expect("download request");
        let mut buf = vec![0u8; n];
        for chunk in buf.chunks_mut(64 << 10) {
            self.reader.read_exact(chunk).expect("download body");
            std::thread::sleep(pause);
        }
        sha256_hex(&buf) == sha256_hex(&pattern(seed, n))
    }

    #[must_use]
    pub fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }
}
