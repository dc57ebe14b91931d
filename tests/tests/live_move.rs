//! The building blocks of live connection migration, across hosts, driven by the test the
//! way the agents will drive them: a client's busy keep-alive connection to A's service moves
//! to B in the middle of its requests. A steers the client to B (the flow stays on A while A
//! has its socket), freezes the flow (its classifier drops the client's packets, a packet
//! socket keeps copies), dumps the socket, B restores it (in repair mode), A closes its socket
//! without a word, B's socket goes live, the kept packets go to it, A thaws the flow. From
//! then A's classifier finds no socket for the flow and forwards its packets to B, which
//! answers the client directly. The client sees one TCP connection throughout: every request
//! answered once, in order, first by A, then by B; no reset, no reconnect.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use redirector::{
    datapath::{Datapath, Location, Prefix},
    repair,
};
use redirector_tests::{
    Topology,
    app::connect_tcp,
    net::{SERVICE4, SERVICE6, client4, client6, in_netns},
    require_root,
};

const PORT: u16 = 80;
/// Requests the client makes at most, and how long it may take.
const MAX_REQUESTS: u64 = 5_000;
const LIMIT: Duration = Duration::from_secs(30);
/// The client's pause between requests: it stays busy for seconds, not milliseconds.
const PACE: Duration = Duration::from_millis(1);

/// Reads one line (up to `\n`) a byte at a time: nothing past the line leaves the kernel's
/// queue, so a socket handed over between requests carries the next one with it.
fn read_line(s: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) if b[0] == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            Ok(_) => line.push(b[0]),
            Err(e) if line.is_empty() && matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Err(e),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Serves `s` as server `name` (each `ping N` answered `pong N NAME`) until the peer closes,
/// or until `hand_over` is set between two requests: then the socket goes back on `give`.
fn serve(mut s: TcpStream, name: &'static str, hand_over: Arc<AtomicBool>, give: mpsc::Sender<TcpStream>) {
    s.set_read_timeout(Some(Duration::from_millis(5))).expect("timeout");
    loop {
        if hand_over.load(Ordering::SeqCst) {
            let _ = give.send(s);
            return;
        }
        match read_line(&mut s) {
            Ok(Some(line)) => {
                let n = line.strip_prefix("ping ").unwrap_or_else(|| panic!("{name} got {line:?}"));
                s.write_all(format!("pong {n} {name}\n").as_bytes()).expect("answer");
            }
            Ok(None) => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("{name} reading: {e}"),
        }
    }
}

/// The client: `ping N` / `pong N` on one connection; the server of each answer, and the
/// longest wait for one.
fn client(mut c: TcpStream, done: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> (Vec<String>, Duration) {
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let (mut by, mut worst) = (Vec::new(), Duration::ZERO);
    let t0 = Instant::now();
    for n in 1..=MAX_REQUESTS {
        if stop.load(Ordering::SeqCst) || t0.elapsed() > LIMIT {
            break;
        }
        let asked = Instant::now();
        c.write_all(format!("ping {n}\n").as_bytes()).expect("request");
        let line = read_line(&mut c).unwrap_or_else(|e| panic!("answer {n}: {e}")).unwrap_or_else(|| panic!("the connection closed before answer {n}"));
        worst = worst.max(asked.elapsed());
        let mut f = line.split(' ');
        assert_eq!((f.next(), f.next()), (Some("pong"), Some(n.to_string().as_str())), "answer {n}: {line:?}");
        by.push(f.next().unwrap_or_default().to_string());
        done.store(n, Ordering::SeqCst);
        std::thread::sleep(PACE);
    }
    (by, worst)
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what} within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn a_busy_connection_moves(v6: bool) {
    let t = Topology::new(1);
    // B adopts A's service with listeners of its own (for new connections; the moved one
    // needs none).
    let b4 = SocketAddr::new(IpAddr::V4(t.b.v4[0]), 8080);
    let b6 = SocketAddr::new(IpAddr::V6(t.b.v6[0]), 8080);
    let _b_listeners = in_netns(&t.b.ns, move || (TcpListener::bind(b4).expect("listen on B"), TcpListener::bind(b6).expect("listen on B (IPv6)")));
    t.steer_a_to_b(PORT, 8080);
    let service = SocketAddr::new(if v6 { IpAddr::V6(SERVICE6) } else { IpAddr::V4(SERVICE4) }, PORT);
    let client_ip = if v6 { IpAddr::V6(client6(1)) } else { IpAddr::V4(client4(1)) };
    let b_addr = if v6 { IpAddr::V6(t.b.v6[0]) } else { IpAddr::V4(t.b.v4[0]) };
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(service).expect("listen on A"));
    let c = connect_tcp(&t.client.ns, client_ip, service).expect("connect");
    let client_end = c.local_addr().expect("client address");
    let (s, _) = listener.accept().expect("accept");

    let loc = Location { bpffs: t.bpffs.clone(), instance: t.a.ns.clone() };
    let mut dp = in_netns(&t.a.ns, move || Datapath::open(&loc).expect("A's datapath"));
    let (done, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let (hand_over, (give, given)) = (Arc::new(AtomicBool::new(false)), mpsc::channel());
    let on_a = std::thread::spawn({
        let (hand_over, give) = (hand_over.clone(), give.clone());
        move || serve(s, "A", hand_over, give)
    });
    let asking = std::thread::spawn({
        let (done, stop) = (done.clone(), stop.clone());
        move || client(c, done, stop)
    });
    wait_until("100 requests answered by A", || done.load(Ordering::SeqCst) >= 100);

    // The move. A steers the client to B first (B is ready: it adopted the service above;
    // the agent probes it): the flow stays on A while A has its socket.
    let host = Prefix { addr: client_ip, len: if v6 { 128 } else { 32 } };
    dp.migrate(host, b_addr, None).expect("the rule");
    let flow = [(client_end, service)];
    // Copies of the flow's packets from before the freeze on: replayed to B once it is live.
    let hold = in_netns(&t.a.ns, move || repair::Hold::start("eth0", &flow).expect("hold"));
    // A's application hands the socket over between two requests.
    hand_over.store(true, Ordering::SeqCst);
    let s = given.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("A hands the socket over: {e} (at {})", done.load(Ordering::SeqCst)));
    on_a.join().expect("A's server");
    let t0 = Instant::now();
    dp.freeze(&flow, Duration::from_secs(2)).expect("freeze");
    let state = repair::dump(&s).expect("dump on A");
    let restored = in_netns(&t.b.ns, move || repair::restore(&state).expect("restore on B"));
    let restored_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // From here the flow has no socket on A: its packets go to B.
    repair::discard(OwnedFd::from(s));
    // B's socket is live before the flow's packets reach it: its window is set first.
    let fd = restored.go_live().expect("live on B");
    let tunnel_src = if v6 { IpAddr::V6(t.a.v6[0]) } else { IpAddr::V4(t.a.v4[0]) };
    let a_ns = t.a.ns.clone();
    let replay = |held: Vec<Vec<u8>>| in_netns(&a_ns, move || repair::replay(&held, tunnel_src, b_addr).expect("replay"));
    let mut replayed = replay(hold.take().expect("held"));
    dp.thaw(&flow).expect("thaw");
    replayed += replay(hold.take().expect("held"));
    let moved_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let at_move = done.load(Ordering::SeqCst);
    let on_b = std::thread::spawn({
        let hand_over = Arc::new(AtomicBool::new(false));
        move || serve(TcpStream::from(fd), "B", hand_over, give)
    });
    wait_until("100 more requests answered", || done.load(Ordering::SeqCst) >= at_move + 100);
    stop.store(true, Ordering::SeqCst);
    let (by, worst) = asking.join().expect("client");
    on_b.join().expect("B's server");
    let first_b = by.iter().position(|s| s == "B").expect("B answered");
    assert!(by[..first_b].iter().all(|s| s == "A") && by[first_b..].iter().all(|s| s == "B"), "A answered, then only B: {by:?}");
    assert!(first_b >= 100 && by.len() >= first_b + 100, "{} by A, {} by B", first_b, by.len() - first_b);
    eprintln!(
        "moved after {first_b} requests: restored in {restored_ms:.2} ms, live in {moved_ms:.2} ms (frozen until then, {replayed} packets held and replayed); the client's longest wait {:.2} ms",
        worst.as_secs_f64() * 1000.0
    );
    // Not its retransmission timeout (200 ms and more): what arrived while frozen was replayed.
    assert!(worst < Duration::from_millis(100), "the client waited {worst:?} for an answer");
    assert!(t.counter(&t.a, "forwarded-existing") > 0, "A forwarded the flow's packets to B");
}

#[test]
fn a_busy_ipv4_connection_moves_to_another_host_without_the_client_noticing() {
    if require_root() {
        a_busy_connection_moves(false);
    }
}

#[test]
fn a_busy_ipv6_connection_moves_to_another_host_without_the_client_noticing() {
    if require_root() {
        a_busy_connection_moves(true);
    }
}
