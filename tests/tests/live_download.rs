//! A download moves in the middle, with data in flight both ways: one client of the Rust demo
//! (servers A and B with agents, `live_moves = true`) downloads 10 MiB, reading slowly, and
//! sends its next request while the download is still coming (that request waits in the
//! server's receive queue, the download's bytes in its send queue). An operator moves the
//! client to B in the middle; the download carries on from B and the waiting request is
//! answered by B, on the same connection. Then the same again, the client taken home in the
//! middle of a second download. Every byte arrives once, in order (the pattern is checked
//! byte for byte), and the session count goes on.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redirector_tests::{
    agents::{Cluster, DemoApp, Options, service6},
    app::connect_tcp,
    io::read_some,
    net::{SERVICE4, client4, client6},
    require_root,
};
use serde_json::Value;

const SIZE: u64 = 10 << 20;

/// Bytes read per step, and the pause after each: about 4 MiB/s, so a download lasts long
/// enough for a hand-over in its middle.
const STEP: usize = 64 << 10;
const PAUSE: Duration = Duration::from_millis(15);

/// Byte `i` of every download of the demo (`examples/demo-app/src/download.rs`).
fn byte(i: u64) -> u8 {
    ((i % 251) as u8) ^ ((i >> 12) as u8)
}

#[test]
fn a_download_moves_out_and_home_in_the_middle() {
    if require_root() {
        moves(false);
    }
}

#[test]
fn a_download_moves_out_and_home_in_the_middle_over_ipv6() {
    if require_root() {
        moves(true);
    }
}

/// Reads one response head from `s`: its status line and headers.
fn head(s: &mut TcpStream) -> (String, Vec<(String, String)>) {
    let mut raw = Vec::new();
    let mut b = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert!(read_some(s, &mut b).expect("reading a response head") == 1, "the connection ended in a response head: {:?}", String::from_utf8_lossy(&raw));
        raw.push(b[0]);
        assert!(raw.len() < 16 << 10, "a response head that does not end");
    }
    let text = String::from_utf8(raw).expect("an ASCII head");
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    (status, headers)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter().find(|(k, _)| k == name).map_or("", |(_, v)| v.as_str())
}

/// A JSON answer of the demo's.
fn answer(s: &mut TcpStream) -> Value {
    let (status, h) = head(s);
    assert!(status.contains(" 200 "), "{status}");
    let mut body = vec![0; header(&h, "content-length").parse().expect("a length")];
    s.read_exact(&mut body).expect("the body");
    serde_json::from_slice(&body).expect("JSON")
}

/// Downloads `SIZE` bytes on `s`, slowly, sending `next` (a whole request) once 1 MiB came and
/// counting what came in `progress`; checks every byte. Returns the session the download's
/// head carried.
fn download(s: &mut TcpStream, next: &[u8], progress: &AtomicU64) -> Value {
    s.write_all(format!("GET /download/{SIZE} HTTP/1.1\r\nHost: demo\r\n\r\n").as_bytes()).expect("asking");
    let (status, h) = head(s);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(header(&h, "content-length"), SIZE.to_string());
    let session: Value = serde_json::from_str(header(&h, "x-session")).expect("the session header");
    let (mut at, mut buf, mut sent_next) = (0u64, vec![0u8; STEP], false);
    while at < SIZE {
        let want = usize::try_from(SIZE - at).unwrap_or(STEP).min(STEP);
        let n = read_some(s, &mut buf[..want]).unwrap_or_else(|e| panic!("the download broke at byte {at}: {e}"));
        assert!(n > 0, "the connection ended at byte {at} of {SIZE}");
        if let Some(bad) = (0..n).find(|i| buf[*i] != byte(at + *i as u64)) {
            panic!("byte {} of the download is wrong: {} (expected {})", at + bad as u64, buf[bad], byte(at + bad as u64));
        }
        at += n as u64;
        progress.store(at, Ordering::SeqCst);
        if at >= 1 << 20 && !sent_next {
            // In flight the other way while the download still comes.
            s.write_all(next).expect("the next request");
            sent_next = true;
        }
        std::thread::sleep(PAUSE);
    }
    session
}

/// Waits until `progress` passes `at` bytes (at most 30 s).
fn past(progress: &AtomicU64, at: u64) {
    let start = Instant::now();
    while progress.load(Ordering::SeqCst) < at {
        assert!(start.elapsed() < Duration::from_secs(30), "the download stalled at {} bytes", progress.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn moves(v6: bool) {
    let opts = Options { demo: Some(DemoApp::Rust), live_moves: true, dual: v6, ..Options::default() };
    let c = Cluster::with_options(4, &[("a", 20, 10), ("b", 100, 80)], &opts);
    let (src, dst) = if v6 { (IpAddr::V6(client6(1)), service6("a")) } else { (IpAddr::V4(client4(1)), SocketAddr::new(IpAddr::V4(SERVICE4), 80)) };
    let mut s = connect_tcp(&c.t.client.ns, src, dst).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // Bytes of the first download that came, then of the second.
    let (progress, second_progress) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (p, q) = (progress.clone(), second_progress.clone());
    let client = std::thread::spawn(move || {
        let next = b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n";
        let first = download(&mut s, next, &p);
        let after_first = answer(&mut s);
        let second = download(&mut s, next, &q);
        let after_second = answer(&mut s);
        [first, after_first, second, after_second]
    });
    // Out to B in the middle of the first download.
    past(&progress, 2 << 20);
    let moved = c.ask_agent("a", &["move".into(), src.to_string(), "--to".into(), "b".into()]).expect("move");
    assert_eq!(moved["moved"], 1, "{moved}");
    assert!(progress.load(Ordering::SeqCst) < SIZE, "the download was still coming when the move ended");
    // Home again in the middle of the second (the give-back waits out the dwell after a move).
    past(&second_progress, 2 << 20);
    let home = c.give_back("a", &[src]).expect("give-back");
    assert_eq!(home["given_back"], 1, "{home}");
    assert!(second_progress.load(Ordering::SeqCst) < SIZE, "the second download was still coming when the client came home");
    let [first, after_first, second, after_second] = client.join().expect("the client");
    let who = |v: &Value| (v["server"].as_str().unwrap_or_default().to_string(), v["count"].as_u64().unwrap_or_default());
    assert_eq!(who(&first), ("A".into(), 1), "the first download began on A: {first}");
    assert_eq!(who(&after_first), ("B".into(), 2), "the request sent during it was answered by B: {after_first}");
    assert_eq!(who(&second), ("B".into(), 3), "the second download began on B: {second}");
    assert_eq!(who(&after_second), ("A".into(), 4), "the request sent during it was answered by A: {after_second}");
    assert!(c.log("a").contains("connections frozen and dumped") && c.log("b").contains("connections going home dumped"), "the connection moved both ways");
}
