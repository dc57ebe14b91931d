//! `redirector::repair`: a busy TCP connection's server end moves to a new socket (dumped,
//! the old one closed in repair mode, restored from the serialized state in the server's
//! namespace) with data waiting in both directions: bytes the server has not read yet, bytes
//! it wrote that the client has not read, and a tail never sent (the client's window is
//! full). The client notices nothing: every byte arrives once and in order, then the
//! connection goes on both ways and ends with a normal FIN. IPv4 and IPv6.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use redirector::repair::{self, TcpState};
use redirector_tests::{
    Topology,
    app::{connect_tcp, pattern},
    net::{client4, client6, in_netns},
    require_root, wait_until,
};

const REQUEST: &[u8] = b"GET /big\n";
/// Sent by the client right after its request, not read by the server before the move.
const PENDING: usize = 32 << 10;
/// Offered by the server before the move: far more than the client's window takes.
const RESPONSE: usize = 16 << 20;

fn ioctl(fd: &impl std::os::fd::AsRawFd, req: libc::Ioctl) -> usize {
    usize::try_from(redirector::sockopt::ioctl_int(fd, req).expect("ioctl")).expect("a length")
}

/// A connection from client 1 to A's first IPv4 address at `port`: the client's end and the
/// server's.
fn connected(t: &Topology, port: u16) -> (std::net::TcpStream, std::net::TcpStream) {
    let addr = SocketAddr::new(IpAddr::V4(t.a.v4[0]), port);
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(addr).expect("listen"));
    let c = connect_tcp(&t.client.ns, IpAddr::V4(client4(1)), addr).expect("connect");
    let (s, _) = listener.accept().expect("accept");
    (c, s)
}

fn moves_with_both_queues_and_an_unsent_tail(v6: bool) {
    let t = Topology::new(1);
    let (server, client) = if v6 { (IpAddr::V6(t.a.v6[0]), IpAddr::V6(client6(1))) } else { (IpAddr::V4(t.a.v4[0]), IpAddr::V4(client4(1))) };
    let addr = SocketAddr::new(server, 8080);
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(addr).expect("listen"));
    let mut c = connect_tcp(&t.client.ns, client, addr).expect("connect");
    let (mut s, _) = listener.accept().expect("accept");

    // The client asks, and sends more the server leaves in its receive queue.
    let pending = pattern(1, PENDING);
    c.write_all(&[REQUEST, &pending].concat()).expect("request");
    let mut req = vec![0; REQUEST.len()];
    s.read_exact(&mut req).expect("read the request");
    wait_until("the pending bytes to arrive", Duration::from_secs(5), || ioctl(&s, libc::FIONREAD) == PENDING);

    // The server answers far more than the client (not reading) has room for: part of it
    // waits in the client's receive queue, the rest in the server's send queue, unsent.
    let response = pattern(2, RESPONSE);
    s.set_nonblocking(true).expect("nonblocking");
    let mut offered = 0;
    while offered < RESPONSE {
        match s.write(&response[offered..]) {
            Ok(n) => offered += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("writing the response: {e}"),
        }
    }
    assert!(offered < RESPONSE, "the client's window filled up");
    // Everything sent is acknowledged (the client's window is closed): nothing is in flight
    // while the socket is dumped, so nothing arriving then is acknowledged and lost (the
    // agent freezes a busy flow for that).
    wait_until("the sent part to be acknowledged", Duration::from_secs(5), || ioctl(&s, libc::TIOCOUTQ) == ioctl(&s, 0x894B));

    let state = repair::dump(&s).expect("dump");
    repair::discard(OwnedFd::from(s));
    assert_eq!((state.local, state.peer), (addr, c.local_addr().expect("local")));
    assert_eq!(state.recv_queue, pending, "the bytes the server had not read");
    assert!(state.unsent > 0 && state.send_queue.len() >= state.unsent as usize, "a tail never sent: {} of {}", state.unsent, state.send_queue.len());
    assert!(state.timestamps && state.sack && state.wscale.is_some(), "the options Linux negotiates: {state:?}");
    // Across the wire (the agents send it serialized).
    let state: TcpState = serde_json::from_str(&serde_json::to_string(&state).expect("encode")).expect("decode");
    let dumped_clock = state.timestamp;
    let restored = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore"));
    let fd = restored.go_live().expect("live");
    // Its clock runs ahead of the old socket's, which may still send until it is closed.
    let clock: u32 = redirector::sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP).expect("TCP_TIMESTAMP");
    assert!(clock.wrapping_sub(dumped_clock) >= repair::CLOCK_STEP_MS, "the restored clock {clock} is not a step ahead of {dumped_clock}");
    let mut s = std::net::TcpStream::from(fd);
    assert!(s.as_raw_fd() >= 0);

    // The client reads the whole response (every byte once, in order), asks again, and reads
    // the answer and the end of the connection.
    let client = std::thread::spawn(move || {
        let mut got = vec![0; offered];
        c.read_exact(&mut got).expect("the response, across the move");
        assert!(got == response[..offered], "the response arrived intact");
        c.write_all(b"again\n").expect("second request");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("the second answer and a FIN, no reset");
        rest
    });
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut got = vec![0; PENDING + 6];
    s.read_exact(&mut got).expect("the pending bytes and the second request, on the new socket");
    assert!(got[..PENDING] == pattern(1, PENDING)[..], "the pending bytes, restored");
    assert_eq!(&got[PENDING..], b"again\n");
    s.write_all(b"bye\n").expect("answer");
    drop(s);
    assert_eq!(client.join().expect("client"), b"bye\n");
}

#[test]
fn an_ipv4_connection_moves_to_a_new_socket_with_both_queues_and_an_unsent_tail() {
    if require_root() {
        moves_with_both_queues_and_an_unsent_tail(false);
    }
}

#[test]
fn an_ipv6_connection_moves_to_a_new_socket_with_both_queues_and_an_unsent_tail() {
    if require_root() {
        moves_with_both_queues_and_an_unsent_tail(true);
    }
}

/// A dump whose move does not happen: the socket leaves repair mode and the connection goes
/// on from it, both ways.
#[test]
fn a_dumped_connection_that_does_not_move_goes_on_where_it_was() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    let (mut c, mut s) = connected(&t, 8081);
    c.write_all(b"one\n").expect("write");
    // The application's own mark, muted while dumped, is its own again once it resumes.
    redirector::sockopt::set(&s, libc::SOL_SOCKET, libc::SO_MARK, &7u32).expect("mark");
    let state = repair::dump(&s).expect("dump");
    assert_eq!(state.recv_queue, b"one\n");
    let mark = |s: &std::net::TcpStream| redirector::sockopt::get::<u32>(s, libc::SOL_SOCKET, libc::SO_MARK).expect("mark");
    assert_eq!(mark(&s), redirector_common::MUTED_MARK, "dumped: muted");
    repair::resume(&s, &state).expect("resume");
    assert_eq!(mark(&s), 7, "resumed: its own mark");
    let mut got = [0; 4];
    s.read_exact(&mut got).expect("read after resuming");
    assert_eq!(&got, b"one\n");
    s.write_all(b"two\n").expect("write after resuming");
    c.read_exact(&mut got).expect("the client reads");
    assert_eq!(&got, b"two\n");
}

/// Data that reaches a restored socket before it goes live (a flow thawed early: an origin
/// restarted mid-move, or tired of waiting) is queued and acknowledged in repair mode; the
/// acknowledgement must carry the connection's clock, or the client takes the new socket's
/// own clock for the latest and drops everything it sends after it (PAWS) for good. The old
/// sockets' clocks are random, ahead of or behind the host's, so several connections move:
/// about half of them stalled when the restored clock was only set as it went live.
#[test]
fn data_that_reaches_a_restored_connection_before_it_goes_live_is_answered() {
    if !require_root() {
        return;
    }
    const CONNECTIONS: u16 = 12;
    let t = Topology::new(1);
    let addr = SocketAddr::new(IpAddr::V4(t.a.v4[0]), 8082);
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(addr).expect("listen"));
    let mut pairs = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = connect_tcp(&t.client.ns, IpAddr::V4(client4(1)), addr).expect("connect");
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = [0; 4];
        c.write_all(b"one\n").expect("write");
        s.read_exact(&mut got).expect("read");
        s.write_all(b"two\n").expect("answer");
        c.read_exact(&mut got).expect("the client reads");
        pairs.push((c, s));
    }
    let mut restored = Vec::new();
    for (c, s) in pairs {
        let state = repair::dump(&s).expect("dump");
        repair::discard(OwnedFd::from(s));
        let r = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore"));
        restored.push((c, r));
    }
    // Each client asks while its server end is restored but not live: the socket in repair
    // mode acknowledges it (half of them were dropped by their clients as old).
    for (c, _) in &mut restored {
        c.write_all(b"early\n").expect("early request");
    }
    for (c, _) in &restored {
        wait_until("the early request to be acknowledged", Duration::from_secs(5), || ioctl(c, libc::TIOCOUTQ) == 0);
    }
    let mut stalled = Vec::new();
    for (i, (mut c, r)) in restored.into_iter().enumerate() {
        let mut s = std::net::TcpStream::from(r.go_live().expect("live"));
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = [0; 6];
        s.read_exact(&mut got).expect("the early request, on the live socket");
        assert_eq!(&got, b"early\n");
        s.write_all(b"answer\n").expect("answer");
        c.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut got = [0; 7];
        match c.read_exact(&mut got) {
            Ok(()) => assert_eq!(&got, b"answer\n"),
            Err(e) => stalled.push(format!("connection {i}: {e}")),
        }
    }
    assert!(stalled.is_empty(), "answers never reached their clients: {stalled:?}");
}

/// A connection whose client's window is wide open goes live without a packet: no window
/// probe, whose answer would come back while the flow is still frozen on the origin, to be kept
/// and replayed there. It sends at once when it has something to say (its window open, not
/// closed until a probe is answered), and reads what the client sends; an answer the client
/// had not acknowledged yet (its acknowledgement held, as a frozen flow's are) is acknowledged
/// by what the client sends next, and not seen twice.
fn goes_live_quietly(port: u16, unacknowledged: bool) {
    let t = Topology::new(1);
    let (mut c, mut s) = connected(&t, port);
    c.write_all(b"hello\n").expect("request");
    let mut got = [0; 6];
    s.read_exact(&mut got).expect("read the request");
    let table = format!("rdtest_quiet{port}");
    if unacknowledged {
        drop_sent(&t.client.ns, &table, &format!("tcp dport {port}"));
    }
    s.write_all(b"hi\n").expect("answer");
    let mut got = [0; 3];
    c.read_exact(&mut got).expect("read the answer");
    if !unacknowledged {
        wait_until("the answer to be acknowledged", Duration::from_secs(5), || ioctl(&s, libc::TIOCOUTQ) == 0);
    }
    let state = repair::dump(&s).expect("dump");
    repair::discard(OwnedFd::from(s));
    assert_eq!(state.send_queue, if unacknowledged { &b"hi\n"[..] } else { &b""[..] }, "{state:?}");
    let fd = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore")).go_live().expect("live");
    let segs_out = |fd: &OwnedFd| redirector::sockopt::get::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO).expect("TCP_INFO").tcpi_segs_out;
    assert_eq!(segs_out(&fd), 0, "going live sent nothing");
    let mut s = std::net::TcpStream::from(fd);
    if unacknowledged {
        nft(&t.client.ns, &format!("delete table inet {table}"));
        c.write_all(b"again\n").expect("second request");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut got = [0; 6];
        s.read_exact(&mut got).expect("the restored socket reads");
        assert_eq!(&got, b"again\n");
        wait_until("the answer to be acknowledged", Duration::from_secs(5), || ioctl(&s, libc::TIOCOUTQ) == 0);
    }
    // The server speaks first: the segment leaves within the write (the window is open).
    let before = segs_out(&OwnedFd::from(s.try_clone().expect("a copy")));
    s.write_all(b"push\n").expect("push");
    let info: libc::tcp_info = redirector::sockopt::get(&s, libc::IPPROTO_TCP, libc::TCP_INFO).expect("TCP_INFO");
    assert_eq!((info.tcpi_segs_out - before, info.tcpi_notsent_bytes), (1, 0), "the push went at once");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = [0; 5];
    c.read_exact(&mut got).expect("the client reads the push");
    assert_eq!(&got, b"push\n", "the push, and nothing the client had already");
    c.write_all(b"bye\n").expect("last request");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = [0; 4];
    s.read_exact(&mut got).expect("the restored socket reads");
    assert_eq!(&got, b"bye\n");
}

#[test]
fn an_idle_connection_goes_live_without_a_packet_and_sends_at_once() {
    if require_root() {
        goes_live_quietly(8087, false);
    }
}

#[test]
fn a_connection_with_an_unacknowledged_answer_goes_live_without_a_packet_too() {
    if require_root() {
        goes_live_quietly(8088, true);
    }
}

/// A discarded socket's connection is gone at once, even while a copy of the socket lives on
/// (the application's, or a child process's forked meanwhile, until it execs): it can be
/// restored on the same host straight away (a connection that comes back where it was), and
/// the copy holds no connection any more. Closing alone left the addresses taken until the
/// last copy closed: the restore failed with EADDRNOTAVAIL.
#[test]
fn a_discarded_connection_is_free_to_come_back_though_a_copy_of_its_socket_lives_on() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    let (mut c, s) = connected(&t, 8083);
    let state = repair::dump(&s).expect("dump");
    let mut copy = s.try_clone().expect("a copy of the socket");
    repair::discard(OwnedFd::from(s));
    let restored = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore where the discarded socket was"));
    let mut s = std::net::TcpStream::from(restored.go_live().expect("live"));
    c.write_all(b"ping\n").expect("write");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut got = [0; 5];
    s.read_exact(&mut got).expect("the restored socket reads");
    assert_eq!(&got, b"ping\n");
    s.write_all(b"pong\n").expect("answer");
    c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    c.read_exact(&mut got).expect("the client reads the answer");
    assert_eq!(&got, b"pong\n");
    let info: libc::tcp_info = redirector::sockopt::get(&copy, libc::IPPROTO_TCP, libc::TCP_INFO).expect("TCP_INFO");
    assert_eq!(info.tcpi_state, 7, "the copy's socket is closed (TCP_CLOSE)");
    assert!(copy.write(b"x").is_err(), "the copy sends nothing");
}

/// A restored socket's timestamp clock counts in the old one's units (milliseconds here), one
/// connection after another: the kernel takes the lowest bit of a clock it is given for the
/// unit, and a clock moved on by an odd number of milliseconds made half the restored sockets
/// count microseconds, a thousand times faster than their peers had seen them count.
#[test]
fn a_restored_timestamp_clock_counts_in_the_old_ones_units() {
    if !require_root() {
        return;
    }
    const CONNECTIONS: u16 = 8;
    let t = Topology::new(1);
    let addr = SocketAddr::new(IpAddr::V4(t.a.v4[0]), 8084);
    let listener = in_netns(&t.a.ns, move || TcpListener::bind(addr).expect("listen"));
    let mut wrong = Vec::new();
    let mut live = Vec::new();
    for i in 0..CONNECTIONS {
        let c = connect_tcp(&t.client.ns, IpAddr::V4(client4(1)), addr).expect("connect");
        let (s, _) = listener.accept().expect("accept");
        let state = repair::dump(&s).expect("dump");
        assert_eq!(state.timestamp & 1, 0, "a new socket's clock counts milliseconds");
        repair::discard(OwnedFd::from(s));
        // A restore some milliseconds after the dump, odd or even.
        std::thread::sleep(Duration::from_millis(u64::from(i % 2) + 1));
        let fd = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore")).go_live().expect("live");
        let clock = |fd: &OwnedFd| redirector::sockopt::get::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP).expect("TCP_TIMESTAMP");
        let before = clock(&fd);
        std::thread::sleep(Duration::from_millis(20));
        let ran = clock(&fd).wrapping_sub(before);
        if before & 1 != 0 || ran > 1_000 {
            wrong.push(format!("connection {i}: clock {before}, ran {ran} in 20 ms"));
        }
        live.push((c, fd));
    }
    assert!(wrong.is_empty(), "restored clocks that count microseconds: {wrong:?}");
}

/// Runs `nft` in namespace `ns` with `args`.
fn nft(ns: &str, args: &str) {
    let ok = std::process::Command::new("ip").args(["netns", "exec", ns, "nft"]).args(args.split(' ')).status().expect("nft");
    assert!(ok.success(), "nft {args}");
}

/// Drops what namespace `ns` sends that matches `what` (nft's words), in a table `table` of
/// its own, until it is deleted.
fn drop_sent(ns: &str, table: &str, what: &str) {
    nft(ns, &format!("add table inet {table}"));
    nft(ns, &format!("add chain inet {table} out {{ type filter hook output priority 0 ; policy accept ; }}"));
    nft(ns, &format!("add rule inet {table} out {what} drop"));
}

/// A connection restored while its client's window is closed, the client's acknowledgement
/// that closed it not seen yet (held, as a frozen flow's packets are): once live, the
/// restored socket sends nothing into the closed window. A socket predicts the header of the
/// next segment it gets, its window included, and takes a segment that matches by a fast path
/// that does not read the window; one connected in repair mode predicts a window of zero,
/// whatever window it is given afterwards. An acknowledgement of new data that closed the
/// window matched, and the restored socket sent into the client's closed window
/// (`live_download`, moving home: ten segments dropped by the client, then a stall of
/// seconds).
#[test]
fn a_connection_restored_into_a_closed_window_sends_nothing_into_it() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    // The client's timestamps without a random offset: below 2^31, so the fast path takes
    // them (it leaves a timestamp "older" than none, the restored socket's, to the slow path).
    t.client.sysctl("net.ipv4.tcp_timestamps", "2");
    let (mut c, mut s) = connected(&t, 8085);
    redirector::sockopt::set(&c, libc::SOL_SOCKET, libc::SO_RCVBUF, &(64 << 10)).expect("a small receive buffer");
    // The client's segments that close its window go nowhere for now.
    let table = "rdtest_closed";
    drop_sent(&t.client.ns, table, "tcp dport 8085 tcp window 0");
    // The client reads nothing: the server fills its window and has more to send.
    let response = pattern(7, 1 << 20);
    s.set_nonblocking(true).expect("nonblocking");
    let mut offered = 0;
    while offered < response.len() {
        match s.write(&response[offered..]) {
            Ok(n) => offered += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("writing: {e}"),
        }
    }
    let mut held = 0;
    wait_until("the client's window to close", Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(100));
        let now = ioctl(&c, libc::FIONREAD);
        std::mem::replace(&mut held, now) == now && now > 0
    });
    let state = repair::dump(&s).expect("dump");
    assert!(state.unsent > 0 && state.window.snd_wnd > 0, "bytes never sent, and a window the server thinks open: {:?}", state.window);
    let tail = state.unsent as usize;
    repair::discard(OwnedFd::from(s));
    let restored = in_netns(&t.a.ns, move || repair::restore(&state).expect("restore"));
    nft(&t.client.ns, &format!("delete table inet {table}"));
    // The client answers the restored socket's window probe: all it got, acknowledged, in a
    // closed window.
    let fd = restored.go_live().expect("live");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ioctl(&fd, 0x894B), tail, "the restored socket sent into the client's closed window");
    // Then the client reads it all, intact.
    let rest = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::from(fd);
        s.set_nonblocking(false).expect("blocking");
        s.write_all(&response[offered..]).expect("the rest");
        (s, response)
    });
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut got = vec![0; 1 << 20];
    c.read_exact(&mut got).expect("the whole response");
    let (_s, response) = rest.join().expect("the server");
    assert!(got == response, "the response arrived intact");
}

/// A dump goes stale when something reaches its socket after it (a packet that had just
/// passed the classifier as its flow froze): a byte received, or an acknowledgement of bytes
/// the socket sent. `as_dumped` sees both (the agent then keeps the connection where it is),
/// and says the dump holds while nothing arrived; the connection goes on from the old socket
/// with what arrived.
#[test]
fn a_dump_that_a_packet_reached_after_it_is_seen_to_be_stale() {
    if !require_root() {
        return;
    }
    let t = Topology::new(1);
    let (mut c, mut s) = connected(&t, 8086);
    let holds = |s: &std::net::TcpStream, state: &TcpState| repair::as_dumped(s, state).expect("reading the dumped socket");

    // Bytes that arrive after the dump.
    let state = repair::dump(&s).expect("dump");
    assert!(holds(&s, &state), "nothing arrived since the dump");
    c.write_all(b"late\n").expect("write");
    wait_until("the late bytes to reach the dumped socket", Duration::from_secs(5), || !holds(&s, &state));
    repair::resume(&s, &state).expect("resume");
    let mut got = [0; 5];
    s.read_exact(&mut got).expect("read after resuming");
    assert_eq!(&got, b"late\n");

    // An acknowledgement that arrives after the dump: the client's are dropped until then, and
    // the dumped socket resends on its own timer.
    let table = "rdtest_stale";
    drop_sent(&t.client.ns, table, "tcp dport 8086");
    s.write_all(b"unacknowledged\n").expect("write");
    let mut got = [0; 15];
    c.read_exact(&mut got).expect("the client reads");
    let state = repair::dump(&s).expect("dump");
    assert_eq!(state.send_queue, b"unacknowledged\n", "the bytes not acknowledged yet");
    assert!(holds(&s, &state), "nothing arrived since the dump");
    nft(&t.client.ns, &format!("delete table inet {table}"));
    wait_until("the acknowledgement to reach the dumped socket", Duration::from_secs(10), || !holds(&s, &state));
    repair::resume(&s, &state).expect("resume");
    s.write_all(b"bye\n").expect("write after resuming");
    let mut got = [0; 4];
    c.read_exact(&mut got).expect("the client reads");
    assert_eq!(&got, b"bye\n");
}
