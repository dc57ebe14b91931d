//! Load from the kernel: the `sock_ops` program counts the application's established
//! connections, per client and in total, and reports the crossing of a watermark at once.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use redirector::datapath::{Datapath, Location};
use redirector_tests::{
    Client, Topology,
    agents::{Cgroups, Proc, start_app},
    in_netns,
    net::{SERVICE4, client4},
    require_root,
};

fn svc() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(SERVICE4), 80)
}

/// `redirector load --json` on A: (total, per-client counts).
fn load(t: &Topology) -> (u64, Vec<(String, u64)>) {
    let out = t.redirector_ok(&t.a, &["load", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("load JSON");
    let clients = v["clients"].as_array().expect("clients").iter().map(|c| (c[0].as_str().expect("address").to_string(), c[1].as_u64().expect("count"))).collect();
    (v["total"].as_u64().expect("total"), clients)
}

/// The folder of the application's log, removed when the test ends, failed or not.
struct Logs(PathBuf);

impl Drop for Logs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A topology whose host A runs the test application in a cgroup of its own.
fn app_on_a() -> (Topology, Cgroups, Proc, Logs) {
    let t = Topology::new(4);
    let cgroups = Cgroups::new(&t.prefix);
    let group = cgroups.group(&format!("{}-app", t.prefix));
    let logs = Logs(std::env::temp_dir().join(format!("{}-logs", t.prefix)));
    std::fs::create_dir_all(&logs.0).expect("logs");
    let app = start_app(&t.a, &group, "A", svc(), &logs.0);
    (t, cgroups, app, logs)
}

fn wait_load(t: &Topology, what: &str, want: impl Fn(u64, &[(String, u64)]) -> bool) {
    let start = Instant::now();
    loop {
        let (total, clients) = load(t);
        if want(total, &clients) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: total {total}, clients {clients:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_are_counted_per_client_and_in_total() {
    if !require_root() {
        return;
    }
    let (t, cgroups, _app, _logs) = app_on_a();
    let group = cgroups.group(&format!("{}-app", t.prefix));
    // A connection opened before counting starts is never counted (nor subtracted later).
    let early = Client::connect(&t.client.ns, IpAddr::V4(client4(4)), svc());
    t.redirector_ok(&t.a, &["load", "--cgroup", &group.to_string_lossy()]);
    // Starting again does not count twice.
    t.redirector_ok(&t.a, &["load", "--cgroup", &group.to_string_lossy()]);
    let mut c1: Vec<Client> = (0..3).map(|_| Client::connect(&t.client.ns, IpAddr::V4(client4(1)), svc())).collect();
    let _c2: Vec<Client> = (0..2).map(|_| Client::connect(&t.client.ns, IpAddr::V4(client4(2)), svc())).collect();
    wait_load(&t, "3 + 2 connections", |total, clients| {
        total == 5 && clients.first() == Some(&("198.18.1.1".to_string(), 3)) && clients.get(1) == Some(&("198.18.1.2".to_string(), 2)) && clients.len() == 2
    });
    // A new version's programs take over (the connections' state callbacks go to it).
    t.redirector_ok(&t.a, &["attach", "--dev", "eth0", "--replace"]);
    c1.truncate(1);
    drop(early);
    wait_load(&t, "two of client 1 closed, the uncounted one too", |total, clients| total == 3 && clients.iter().any(|c| c.0 == "198.18.1.1" && c.1 == 1));
    drop(c1);
    drop(_c2);
    wait_load(&t, "all closed", |total, clients| total == 0 && clients.is_empty());
}

#[test]
fn crossing_the_watermark_is_reported_by_the_kernel_at_once() {
    if !require_root() {
        return;
    }
    let (t, cgroups, _app, _logs) = app_on_a();
    let group = cgroups.group(&format!("{}-app", t.prefix));
    t.redirector_ok(&t.a, &["load", "--cgroup", &group.to_string_lossy()]);
    let loc = Location { bpffs: t.bpffs.clone(), instance: t.a.ns.clone() };
    let client_ns = t.client.ns.clone();
    in_netns(&t.a.ns, move || {
        let mut dp = Datapath::open(&loc).expect("open A's instance");
        let mut events = dp.take_load_events().expect("events");
        let wait = |events: &mut redirector::datapath::LoadEvents, ms: i32| {
            let mut pfd = libc::pollfd { fd: events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&raw mut pfd, 1, ms) };
            events.next_event()
        };
        dp.arm_load_event(4).expect("arm at 4");
        let mut conns: Vec<Client> = (0..4).map(|_| Client::connect(&client_ns, IpAddr::V4(client4(1)), svc())).collect();
        assert!(wait(&mut events, 300).is_none(), "4 connections do not pass a watermark of 4");
        let before = redirector::datapath::monotonic_ns();
        conns.push(Client::connect(&client_ns, IpAddr::V4(client4(2)), svc()));
        let ev = wait(&mut events, 2000).expect("the 5th connection passes the watermark: one event");
        assert!(ev.total >= 5, "the event carries the total: {ev:?}");
        assert!(ev.at_ns >= before && ev.at_ns <= redirector::datapath::monotonic_ns(), "and the crossing's time: {ev:?}");
        // One event per arming.
        conns.push(Client::connect(&client_ns, IpAddr::V4(client4(2)), svc()));
        assert!(wait(&mut events, 300).is_none(), "no second event until armed again");
        dp.arm_load_event(6).expect("arm at 6");
        conns.push(Client::connect(&client_ns, IpAddr::V4(client4(3)), svc()));
        assert!(wait(&mut events, 2000).is_some_and(|e| e.total >= 7), "armed again, the next crossing is reported");
    });
}
