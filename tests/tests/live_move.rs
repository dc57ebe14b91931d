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
    io::Write as _,
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
    io::read_some,
    net::{SERVICE4, SERVICE6, client4, client6, in_netns},
    require_root, wait_until,
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
        match read_some(s, &mut b) {
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
/// Returns how many requests it answered.
fn serve(mut s: TcpStream, name: &'static str, hand_over: Arc<AtomicBool>, give: mpsc::Sender<TcpStream>) -> u64 {
    s.set_read_timeout(Some(Duration::from_millis(5))).expect("timeout");
    let mut answered = 0;
    loop {
        if hand_over.load(Ordering::SeqCst) {
            let _ = give.send(s);
            return answered;
        }
        match read_line(&mut s) {
            Ok(Some(line)) => {
                let n = line.strip_prefix("ping ").unwrap_or_else(|| panic!("{name} got {line:?}"));
                s.write_all(format!("pong {n} {name}\n").as_bytes()).expect("answer");
                answered += 1;
            }
            Ok(None) => return answered,
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

/// A client's connection to A's service, and everything a move of it needs: B adopted the
/// service (with listeners of its own, for new connections), A's datapath is open.
struct Moving {
    t: Topology,
    v6: bool,
    service: SocketAddr,
    b_addr: IpAddr,
    dp: Datapath,
    _b_listeners: (TcpListener, TcpListener),
}

/// What a move took.
struct Moved {
    restored_ms: f64,
    live_ms: f64,
    replayed: usize,
    /// The dumped socket's send and receive queues, in bytes.
    queued: (usize, usize),
}

impl Moving {
    /// The topology, and a connection from the client to A: (client's end, A's end).
    fn connect(v6: bool) -> (Self, TcpStream, TcpStream) {
        let t = Topology::new(1);
        let b4 = SocketAddr::new(IpAddr::V4(t.b.v4[0]), 8080);
        let b6 = SocketAddr::new(IpAddr::V6(t.b.v6[0]), 8080);
        let b_listeners = in_netns(&t.b.ns, move || (TcpListener::bind(b4).expect("listen on B"), TcpListener::bind(b6).expect("listen on B (IPv6)")));
        t.steer_a_to_b(PORT, 8080);
        let service = SocketAddr::new(if v6 { IpAddr::V6(SERVICE6) } else { IpAddr::V4(SERVICE4) }, PORT);
        let client_ip = if v6 { IpAddr::V6(client6(1)) } else { IpAddr::V4(client4(1)) };
        let b_addr = if v6 { IpAddr::V6(t.b.v6[0]) } else { IpAddr::V4(t.b.v4[0]) };
        let loc = Location { bpffs: t.bpffs.clone(), instance: t.a.ns.clone() };
        // The service's connections may move live: its SYN-ACKs announce an MSS that fits
        // the tunnel (a full-size segment of the client would not fit once it goes through).
        let dp = in_netns(&t.a.ns, move || {
            let mut dp = Datapath::open(&loc).expect("A's datapath");
            dp.attach_egress("eth0", false).expect("egress");
            dp.set_live_moves((service.ip(), service.port()), true).expect("live moves");
            dp
        });
        let listener = in_netns(&t.a.ns, move || TcpListener::bind(service).expect("listen on A"));
        let c = connect_tcp(&t.client.ns, client_ip, service).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        (Self { t, v6, service, b_addr, dp, _b_listeners: b_listeners }, c, s)
    }

    /// Before A's application hands the socket over: A steers the client to B (B is ready:
    /// it adopted the service; the agent probes it), the flow staying on A while A has its
    /// socket; copies of the flow's packets are kept from now on.
    fn prepare(&mut self, client_end: SocketAddr) -> repair::Hold {
        let host = Prefix { addr: client_end.ip(), len: if self.v6 { 128 } else { 32 } };
        self.dp.migrate(host, self.b_addr, None).expect("the rule");
        let flow = [(client_end, self.service)];
        in_netns(&self.t.a.ns, move || repair::Hold::start("eth0", &flow).expect("hold"))
    }

    /// The move of A's socket `s` to B: freeze, dump, restore on B (repair mode), close A's
    /// without a word (from here the flow's packets go to B), B's goes live, the kept packets
    /// go to it, thaw. B's socket.
    fn finish(&mut self, s: TcpStream, hold: &repair::Hold) -> (TcpStream, Moved) {
        self.finish_with(s, hold, |_, _, _| {})
    }

    /// [`Moving::finish`], running `frozen` once A's socket is dumped (the flow frozen), with
    /// the socket and its dump.
    fn finish_with(&mut self, s: TcpStream, hold: &repair::Hold, frozen: impl FnOnce(&mut Datapath, &TcpStream, &repair::TcpState)) -> (TcpStream, Moved) {
        let flow = [(s.peer_addr().expect("peer"), self.service)];
        let t0 = Instant::now();
        self.dp.freeze(&flow, Duration::from_secs(2)).expect("freeze");
        let state = repair::dump(&s).expect("dump on A");
        frozen(&mut self.dp, &s, &state);
        let queued = (state.send_queue.len(), state.recv_queue.len());
        let restored = in_netns(&self.t.b.ns, move || repair::restore(&state).expect("restore on B"));
        let restored_ms = t0.elapsed().as_secs_f64() * 1000.0;
        repair::discard(OwnedFd::from(s));
        let fd = restored.go_live().expect("live on B");
        let (tunnel_src, target) = (if self.v6 { IpAddr::V6(self.t.a.v6[0]) } else { IpAddr::V4(self.t.a.v4[0]) }, self.b_addr);
        let replay = |held: Vec<Vec<u8>>| in_netns(&self.t.a.ns, move || repair::replay(&held, tunnel_src, target).expect("replay"));
        let mut replayed = replay(hold.take().expect("held"));
        self.dp.thaw(&flow).expect("thaw");
        replayed += replay(hold.take().expect("held"));
        (TcpStream::from(fd), Moved { restored_ms, live_ms: t0.elapsed().as_secs_f64() * 1000.0, replayed, queued })
    }
}

fn a_busy_connection_moves(v6: bool) {
    let (mut m, c, s) = Moving::connect(v6);
    let client_end = c.local_addr().expect("client address");
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
    wait_until("100 requests answered by A", Duration::from_secs(10), || done.load(Ordering::SeqCst) >= 100);

    let hold = m.prepare(client_end);
    // A's application hands the socket over between two requests.
    hand_over.store(true, Ordering::SeqCst);
    let s = given.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("A hands the socket over: {e} (at {})", done.load(Ordering::SeqCst)));
    // Counted by A, not by the client, which may not have read A's last answer yet.
    let by_a = on_a.join().expect("A's server");
    let (s, moved) = m.finish(s, &hold);
    let on_b = std::thread::spawn({
        let hand_over = Arc::new(AtomicBool::new(false));
        move || serve(s, "B", hand_over, give)
    });
    wait_until("100 more requests answered", Duration::from_secs(10), || done.load(Ordering::SeqCst) >= by_a + 100);
    stop.store(true, Ordering::SeqCst);
    let (by, worst) = asking.join().expect("client");
    on_b.join().expect("B's server");
    let first_b = by.iter().position(|s| s == "B").expect("B answered");
    assert!(by[..first_b].iter().all(|s| s == "A") && by[first_b..].iter().all(|s| s == "B"), "A answered, then only B: {by:?}");
    assert!(first_b >= 100 && by.len() >= first_b + 100, "{} by A, {} by B", first_b, by.len() - first_b);
    eprintln!(
        "moved after {first_b} requests: restored in {:.2} ms, live in {:.2} ms (frozen until then, {} packets held and replayed); the client's longest wait {:.2} ms",
        moved.restored_ms,
        moved.live_ms,
        moved.replayed,
        worst.as_secs_f64() * 1000.0
    );
    // Not its retransmission timeout (200 ms and more): what arrived while frozen was replayed.
    assert!(worst < Duration::from_millis(100), "the client waited {worst:?} for an answer");
    assert!(m.t.counter(&m.t.a, "forwarded-existing") > 0, "A forwarded the flow's packets to B");
}

/// A request the client sends while its flow is frozen (its packets dropped on A) is kept
/// and replayed: B answers it at once, not after the client's retransmission timeout.
fn a_request_sent_while_frozen_is_answered_at_once(v6: bool) {
    let (mut m, mut c, mut s) = Moving::connect(v6);
    let client_end = c.local_addr().expect("client address");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.write_all(b"ping 1\n").expect("request");
    assert_eq!(read_line(&mut s).expect("A reads").as_deref(), Some("ping 1"));
    s.write_all(b"pong 1 A\n").expect("answer");
    assert_eq!(read_line(&mut c).expect("the client reads").as_deref(), Some("pong 1 A"));
    let hold = m.prepare(client_end);
    let mut asked = Instant::now();
    let (mut s, moved) = m.finish_with(s, &hold, |dp, _, _| {
        let before = dp.stats().expect("stats").get("dropped-frozen");
        asked = Instant::now();
        c.write_all(b"ping 2\n").expect("request while frozen");
        wait_until("A to drop the request", Duration::from_secs(10), || dp.stats().expect("stats").get("dropped-frozen") > before);
    });
    assert_eq!(read_line(&mut s).expect("B reads").as_deref(), Some("ping 2"), "the request reached B");
    s.write_all(b"pong 2 B\n").expect("answer");
    assert_eq!(read_line(&mut c).expect("the client reads").as_deref(), Some("pong 2 B"));
    let waited = asked.elapsed();
    eprintln!("a request sent while frozen: {} packets replayed, answered after {:.2} ms", moved.replayed, waited.as_secs_f64() * 1000.0);
    assert!(moved.replayed > 0, "the request was kept");
    // Not the client's retransmission timeout (200 ms and more).
    assert!(waited < Duration::from_millis(100), "the client waited {waited:?}");
}

/// A connection restored long after its state left the old host (a big hand-over queues it
/// behind others): meanwhile the old socket, frozen, got no acknowledgement and resent with
/// its own clock, straight to the client. The new socket's clock must still be ahead of
/// anything the old one sent, or the client drops the new socket's segments as old (PAWS)
/// and the connection waits for retransmission timeouts of a second and more.
#[test]
fn a_connection_restored_long_after_its_dump_is_not_behind_its_old_socket() {
    if !require_root() {
        return;
    }
    let (mut m, mut c, mut s) = Moving::connect(false);
    let client_end = c.local_addr().expect("client address");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.write_all(b"ping 1\n").expect("request");
    assert_eq!(read_line(&mut s).expect("A reads").as_deref(), Some("ping 1"));
    let hold = m.prepare(client_end);
    let flow = [(client_end, m.service)];
    m.dp.freeze(&flow, Duration::from_secs(5)).expect("freeze");
    // An answer the client's acknowledgement of which is frozen: the old socket resends it.
    s.write_all(b"pong 1 A\n").expect("answer");
    let state = repair::dump(&s).expect("dump on A");
    // Waiting for its restore a while (as behind a big hand-over's other connections), the
    // old socket resending meanwhile (its loss probe, then its retransmission timeout).
    std::thread::sleep(Duration::from_millis(600));
    let restored = in_netns(&m.t.b.ns, move || repair::restore(&state).expect("restore on B"));
    repair::discard(OwnedFd::from(s));
    let mut s = TcpStream::from(restored.go_live().expect("live on B"));
    let (tunnel_src, target) = (IpAddr::V4(m.t.a.v4[0]), m.b_addr);
    in_netns(&m.t.a.ns, move || repair::replay(&hold.take().expect("held"), tunnel_src, target).expect("replay"));
    m.dp.thaw(&flow).expect("thaw");
    assert_eq!(read_line(&mut c).expect("the client reads").as_deref(), Some("pong 1 A"));
    let asked = Instant::now();
    c.write_all(b"ping 2\n").expect("request");
    assert_eq!(read_line(&mut s).expect("B reads").as_deref(), Some("ping 2"));
    s.write_all(b"pong 2 B\n").expect("answer");
    assert_eq!(read_line(&mut c).expect("the client reads").as_deref(), Some("pong 2 B"));
    let waited = asked.elapsed();
    assert!(waited < Duration::from_millis(100), "the client waited {waited:?} for B's answer");
    assert!(m.t.counter(&m.t.a, "dropped-muted") > 0, "what the old socket resent never left A");
}

#[test]
fn a_request_sent_while_frozen_is_answered_at_once_ipv4() {
    if require_root() {
        a_request_sent_while_frozen_is_answered_at_once(false);
    }
}

#[test]
fn a_request_sent_while_frozen_is_answered_at_once_ipv6() {
    if require_root() {
        a_request_sent_while_frozen_is_answered_at_once(true);
    }
}

/// Bytes each way in the transfer test.
const DOWN: usize = 16 << 20;
const UP: usize = 8 << 20;
/// The tail of its upload the client keeps back until the move is done: A cannot have the
/// whole upload before the move, however slow the machine (the test then moves nothing).
const KEPT_BACK: usize = 64 << 10;

/// One end of the transfer test: its bytes to send, the bytes it expects, how far it got, and
/// whether it may send its last `KEPT_BACK` bytes (an end that need not wait has it set).
struct Ends<'a> {
    out: &'a [u8],
    sent: usize,
    want: &'a [u8],
    got: usize,
    whole: &'a AtomicBool,
}

/// Moves bytes both ways on `s` (nonblocking) until both are done or `stop` is set: writes
/// `out[sent..]`, checks what arrives against `want[got..]` (and reports `got` in
/// `progress`), pausing `pace` after each step that moved bytes. Returns whether both are
/// done.
fn pump(s: &mut TcpStream, e: &mut Ends<'_>, stop: &AtomicBool, progress: &AtomicU64, deadline: Instant, pace: Duration) -> bool {
    let Ends { out, sent, want, got, whole } = e;
    let (out, want) = (*out, *want);
    let mut buf = vec![0u8; 1 << 16];
    while !(*sent == out.len() && *got == want.len()) {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        assert!(Instant::now() < deadline, "the transfer stalled: sent {sent} of {}, got {got} of {}", out.len(), want.len());
        let mut progress_made = false;
        let may_send = if whole.load(Ordering::SeqCst) { out.len() } else { out.len() - KEPT_BACK };
        if *sent < may_send {
            match s.write(&out[*sent..(*sent + (1 << 16)).min(may_send)]) {
                Ok(n) => {
                    *sent += n;
                    progress_made = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("writing at {sent}: {e}"),
            }
        }
        match read_some(s, &mut buf) {
            Ok(0) => panic!("the connection closed at {got} of {}", want.len()),
            Ok(n) => {
                assert!(*got + n <= want.len() && buf[..n] == want[*got..*got + n], "the bytes at {got}..{} are not what was sent", *got + n);
                *got += n;
                progress_made = true;
                progress.store(*got as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading at {got}: {e}"),
        }
        std::thread::sleep(if progress_made { pace } else { Duration::from_micros(200) });
    }
    true
}

fn a_transfer_both_ways_moves(v6: bool) {
    let (mut m, mut c, s) = Moving::connect(v6);
    let client_end = c.local_addr().expect("client address");
    let (down, up) = (Arc::new(redirector_tests::app::pattern(3, DOWN)), Arc::new(redirector_tests::app::pattern(4, UP)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let (hand_over, got_down, got_up) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let moved_yet = Arc::new(AtomicBool::new(false));
    // A sends `down` and checks `up` until asked to hand over; then B goes on from there.
    let on_a = std::thread::spawn({
        let (down, up, hand_over, got_up) = (down.clone(), up.clone(), hand_over.clone(), got_up.clone());
        move || {
            let mut s = s;
            s.set_nonblocking(true).expect("nonblocking");
            let mut e = Ends { out: &down, sent: 0, want: &up, got: 0, whole: &AtomicBool::new(true) };
            assert!(!pump(&mut s, &mut e, &hand_over, &got_up, deadline, Duration::ZERO), "A finished before the move");
            (s, e.sent, e.got)
        }
    });
    let client = std::thread::spawn({
        let (down, up, got_down, moved_yet) = (down.clone(), up.clone(), got_down.clone(), moved_yet.clone());
        move || {
            c.set_nonblocking(true).expect("nonblocking");
            let mut e = Ends { out: &up, sent: 0, want: &down, got: 0, whole: &moved_yet };
            // Paced (at most 64 KiB each way per 5 ms, about 13 MB/s): the download lasts
            // more than a second, so A's send queue is full at the move.
            assert!(pump(&mut c, &mut e, &AtomicBool::new(false), &got_down, deadline, Duration::from_millis(5)));
        }
    });
    wait_until("2 MiB downloaded from A and 1 MiB uploaded", Duration::from_secs(10), || got_down.load(Ordering::SeqCst) >= 2 << 20 && got_up.load(Ordering::SeqCst) >= 1 << 20);
    let hold = m.prepare(client_end);
    hand_over.store(true, Ordering::SeqCst);
    let (s, sent, got) = on_a.join().expect("A's server");
    let (mut s, moved) = m.finish(s, &hold);
    moved_yet.store(true, Ordering::SeqCst);
    s.set_nonblocking(true).expect("nonblocking");
    let mut e = Ends { out: &down, sent, want: &up, got, whole: &AtomicBool::new(true) };
    assert!(pump(&mut s, &mut e, &AtomicBool::new(false), &AtomicU64::new(0), deadline, Duration::ZERO), "B finished the transfer");
    client.join().expect("the client got every byte once, in order, and sent all of its own");
    eprintln!(
        "moved with {sent} of {DOWN} bytes written and {got} of {UP} read by A, {} bytes in its send queue: restored in {:.2} ms, live in {:.2} ms, {} packets held and replayed",
        moved.queued.0, moved.restored_ms, moved.live_ms, moved.replayed
    );
    assert!(moved.queued.0 > 0 && got < UP, "data was still on its way both ways at the move");
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

#[test]
fn a_transfer_in_flight_both_ways_moves_intact_ipv4() {
    if require_root() {
        a_transfer_both_ways_moves(false);
    }
}

#[test]
fn a_transfer_in_flight_both_ways_moves_intact_ipv6() {
    if require_root() {
        a_transfer_both_ways_moves(true);
    }
}

/// A connection dumped while its socket is still sending: A's socket is paced (its timer sends
/// the next segments whether or not an acknowledgement came) and the client reads all it
/// gets. Once dumped it holds still: it sends nothing the dump calls unsent, nor takes any of
/// it for sent, and the client has nothing it calls unsent (B sends that). Repair mode alone
/// stops neither: the socket sent on between the dump's reads, the client acknowledged bytes
/// that B's socket took for never sent, B dropped those acknowledgements (of data it had not
/// sent) and, its congestion window full of what A had in flight, never sent again
/// (`live_download`: a download stalled for good, 1 run in 20 under load); and after the dump
/// the socket, left with its send queue chosen, took the rest for sent at its next tick.
fn a_connection_dumped_while_its_socket_still_sends_goes_on_from_b(v6: bool) {
    const SIZE: usize = 8 << 20;
    let (mut m, mut c, s) = Moving::connect(v6);
    let client_end = c.local_addr().expect("client address");
    // Paced, with a congestion window that lets it send whatever the client's window allows:
    // cubic's grows on a path without loss (bbr's stays near one round trip at its rate).
    redirector::sockopt::set_slice(&s, libc::IPPROTO_TCP, libc::TCP_CONGESTION, b"cubic").expect("cubic");
    redirector::sockopt::set(&s, libc::SOL_SOCKET, libc::SO_MAX_PACING_RATE, &(8u64 << 20)).expect("a pacing rate");
    let down = Arc::new(redirector_tests::app::pattern(5, SIZE));
    let (hand_over, got) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    // A writes the download in 64 KiB steps until asked to hand over (between two steps).
    let on_a = std::thread::spawn({
        let (down, hand_over) = (down.clone(), hand_over.clone());
        move || {
            let mut s = s;
            let mut sent = 0;
            while sent < SIZE && !hand_over.load(Ordering::SeqCst) {
                let n = (SIZE - sent).min(64 << 10);
                s.write_all(&down[sent..sent + n]).expect("A writes");
                sent += n;
            }
            (s, sent)
        }
    });
    let client = std::thread::spawn({
        let (down, got) = (down.clone(), got.clone());
        move || {
            c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let (mut at, mut buf) = (0, vec![0u8; 1 << 16]);
            while at < SIZE {
                let n = read_some(&mut c, &mut buf).unwrap_or_else(|e| panic!("the download stalled at byte {at} of {SIZE}: {e}"));
                assert!(n > 0, "the connection ended at byte {at}");
                assert!(buf[..n] == down[at..at + n], "the bytes at {at}..{} are not what was sent", at + n);
                at += n;
                got.store(at as u64, Ordering::SeqCst);
            }
        }
    });
    wait_until("2 MiB downloaded from A", Duration::from_secs(10), || got.load(Ordering::SeqCst) >= 2 << 20);
    let hold = m.prepare(client_end);
    hand_over.store(true, Ordering::SeqCst);
    let (s, sent) = on_a.join().expect("A's server");
    let (mut s, moved) = m.finish_with(s, &hold, |_, s, state| {
        assert!(state.unsent > 0, "A had bytes not sent yet at the move");
        // Its pacing timer ticks many times meanwhile.
        std::thread::sleep(Duration::from_millis(200));
        let unsent = redirector::sockopt::ioctl_int(s, 0x894B).expect("SIOCOUTQNSD");
        assert_eq!(unsent, i32::try_from(state.unsent).expect("fits"), "the dumped socket's unsent bytes stay unsent");
        let at_dump = sent - state.unsent as usize;
        // The client has read all that came by now (it reads on, and nothing comes).
        let received = got.load(Ordering::SeqCst) as usize;
        assert!(received <= at_dump, "the client got {received} bytes, the dump says {at_dump} were sent");
    });
    s.write_all(&down[sent..]).expect("B writes the rest");
    client.join().expect("the client got every byte once, in order");
    eprintln!(
        "moved with {sent} of {SIZE} bytes written by A, {} in its send queue: restored in {:.2} ms, live in {:.2} ms, {} packets replayed",
        moved.queued.0, moved.restored_ms, moved.live_ms, moved.replayed
    );
}

#[test]
fn an_ipv4_connection_dumped_while_its_socket_still_sends_goes_on_from_b() {
    if require_root() {
        a_connection_dumped_while_its_socket_still_sends_goes_on_from_b(false);
    }
}

#[test]
fn an_ipv6_connection_dumped_while_its_socket_still_sends_goes_on_from_b() {
    if require_root() {
        a_connection_dumped_while_its_socket_still_sends_goes_on_from_b(true);
    }
}
