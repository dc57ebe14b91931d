//! Members gossiping over loopback in one process: joining through one seed, loads learned,
//! strangers refused, a killed member known dead by all.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::mpsc};

use super::{Event, Gossip, Member, SUSPICION, Settings, seal::Key};

async fn start(name: &str, key: &[u8], seeds: Vec<SocketAddr>) -> (Gossip, mpsc::UnboundedReceiver<Event>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let gossip = socket.local_addr().unwrap();
    let me = Member { name: name.into(), gossip, control: SocketAddr::new(gossip.ip(), 1), dual_stack: None, services: Vec::new(), boot: 1 };
    Gossip::start(socket, Settings { me, key: Key::new(key), seeds, size: 8 })
}

/// Waits until `done` holds, or fails saying `what`.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_through_one_seed_learn_loads_refuse_strangers_and_find_the_dead() {
    let key = [5u8; 32];
    let (first, first_events) = start("m0", &key, vec![]).await;
    let seed = first.me().gossip;
    let mut members = vec![(first, first_events)];
    for i in 1..5 {
        let (g, ev) = start(&format!("m{i}"), &key, vec![seed]).await;
        members.push((g, ev));
    }
    until("every member sees the 4 others", Duration::from_secs(10), || members.iter().all(|(g, _)| g.live().len() == 4)).await;
    assert!(members.iter().all(|(g, _)| g.known() == (4, 0)), "4 live, no room known yet");

    for (i, (g, _)) in members.iter().enumerate() {
        assert!(g.set_load(10 * i as u64, 100), "a first load is always published");
    }
    until("every member knows the others' room", Duration::from_secs(5), || {
        members.iter().all(|(g, _)| {
            let c = g.candidates();
            c.len() == 4 && c.iter().all(|(a, room)| members.iter().position(|(o, _)| o.me().gossip == *a).is_some_and(|j| *room == 100 - 10 * j as u64))
        })
    })
    .await;
    assert!(members.iter().all(|(g, _)| g.known() == (4, 4)), "counted as candidates lists them");
    let picked = members[0].0.sample(65, 3, |_| false);
    // Room 90, 80, 70 and 60 around m0: only three have 65, roomiest first.
    assert_eq!(picked.iter().map(|(m, room)| (m.name.as_str(), *room)).collect::<Vec<_>>(), [("m1", 90), ("m2", 80), ("m3", 70)]);

    // A late member hears the loads that are not gossiped any more (they did not change).
    let (late, _) = start("late", &key, vec![members[2].0.me().gossip]).await;
    until("the late member knows the others' room", Duration::from_secs(10), || late.candidates().len() == 5).await;

    // A node without the cluster's key is never taken in, and its datagrams are refused.
    let (stranger, _) = start("stranger", &[6u8; 32], vec![seed]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stranger.live().is_empty(), "the stranger sees {:?}", stranger.live());
    assert!(members.iter().all(|(g, _)| g.live().iter().all(|m| m.name != "stranger")));
    assert!(members[0].0.traffic().refused.load(Ordering::Relaxed) > 0, "the seed refused the stranger's announcements");

    // A member killed (no goodbye) is known dead by every other within the suspicion, after
    // up to two probe periods (a probe, its indirect probes) and its spreading; the bench
    // measures how long it takes, this only that everyone learns it.
    let (victim, _) = members.remove(4);
    let victim_addr = victim.me().gossip;
    let killed = Instant::now();
    victim.kill();
    let limit = SUSPICION + Duration::from_secs(8);
    for (g, ev) in &mut members {
        loop {
            let left = limit.saturating_sub(killed.elapsed());
            match tokio::time::timeout(left, ev.recv()).await {
                Ok(Some(Event::Down(m))) if m.gossip == victim_addr => break,
                Ok(Some(_)) => {}
                other => panic!("{} did not hear of the death within {limit:?}: {other:?}", g.me().name),
            }
        }
        assert!(g.member(&victim_addr).is_none());
        assert!(g.candidates().iter().all(|(a, _)| *a != victim_addr), "a dead member is not asked for help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_that_meet_before_their_seed_is_up_still_join_it() {
    // A joins through F, which is not up yet; B joins through A. A and B know each other
    // first; they must not stay a cluster of two when F comes up.
    let key = [9u8; 32];
    let f_addr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let (a, _) = start("a", &key, vec![f_addr]).await;
    let (b, _) = start("b", &key, vec![a.me().gossip]).await;
    until("A and B know each other", Duration::from_secs(5), || a.live().len() == 1 && b.live().len() == 1).await;
    let socket = UdpSocket::bind(f_addr).await.unwrap();
    let me = Member { name: "f".into(), gossip: f_addr, control: SocketAddr::new(f_addr.ip(), 1), dual_stack: None, services: Vec::new(), boot: 1 };
    let (f, _) = Gossip::start(socket, Settings { me, key: Key::new(&key), seeds: vec![], size: 3 });
    until("all three know each other", Duration::from_secs(10), || [&a, &b, &f].iter().all(|g| g.live().len() == 2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_declared_dead_while_alive_comes_back_with_its_load() {
    let key = [3u8; 32];
    let (a, _) = start("a", &key, vec![]).await;
    let (b, _) = start("b", &key, vec![a.me().gossip]).await;
    let (c, mut c_events) = start("c", &key, vec![a.me().gossip]).await;
    until("all three know each other", Duration::from_secs(5), || [&a, &b, &c].iter().all(|g| g.live().len() == 2)).await;
    let _ = c.set_load(20, 100);
    until("A and B know C's room", Duration::from_secs(5), || [&a, &b].iter().all(|g| g.candidates().contains(&(c.me().gossip, 80)))).await;

    // C stops answering well past its suspicion (a probe of it by each of the others within
    // two periods, then the suspicion): the others declare it dead and forget its load.
    c.stall(SUSPICION + Duration::from_secs(6));
    until("C declared dead", Duration::from_secs(10), || a.member(&c.me().gossip).is_none()).await;
    assert!(a.candidates().iter().all(|(m, _)| *m != c.me().gossip));
    // It comes back as a newer identity, and its load with it.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c_events.recv()).await {
            Ok(Some(Event::Rejoined(me))) => {
                assert!(me.boot > c.me().boot);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("C did not rejoin: {other:?}"),
        }
    }
    until("A and B know C's room again", Duration::from_secs(5), || [&a, &b].iter().all(|g| g.candidates().contains(&(c.me().gossip, 80)))).await;
    // And a load it publishes now wins over what it published before.
    let _ = c.set_load(60, 100);
    until("A and B know C's new room", Duration::from_secs(5), || [&a, &b].iter().all(|g| g.candidates().contains(&(c.me().gossip, 40)))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_is_known_gone_without_waiting_for_suspicion() {
    let key = [4u8; 32];
    let (a, mut a_events) = start("a", &key, vec![]).await;
    let (b, _) = start("b", &key, vec![a.me().gossip]).await;
    until("A and B know each other", Duration::from_secs(5), || a.live().len() == 1 && b.live().len() == 1).await;
    let b_addr = b.me().gossip;
    let left = Instant::now();
    b.leave().await;
    // Well under a probe period and a suspicion.
    let limit = SUSPICION / 2;
    loop {
        match tokio::time::timeout(limit.saturating_sub(left.elapsed()), a_events.recv()).await {
            Ok(Some(Event::Down(m))) if m.gossip == b_addr => break,
            Ok(Some(_)) => {}
            other => panic!("A did not learn that B left within {limit:?}: {other:?}"),
        }
    }
    assert!(a.live().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_learns_the_loads_that_did_not_change() {
    // A member restarts at the same address as a newer identity (its agent restarted, within
    // the others' suspicion): the others take it for their old member renamed, and must still
    // tell it their loads, which are gossiped only when they change.
    let key = [2u8; 32];
    let (a, _) = start("a", &key, vec![]).await;
    let a_addr = a.me().gossip;
    let (b, _) = start("b", &key, vec![a_addr]).await;
    let (c, _) = start("c", &key, vec![a_addr]).await;
    until("all three know each other", Duration::from_secs(5), || [&a, &b, &c].iter().all(|g| g.live().len() == 2)).await;
    let (_, _) = (b.set_load(10, 100), c.set_load(30, 100));
    until("A knows B's and C's room", Duration::from_secs(5), || a.candidates().len() == 2).await;
    // Long enough for B's and C's records to have been passed on as many times as they are.
    tokio::time::sleep(Duration::from_secs(8)).await;
    a.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let socket = UdpSocket::bind(a_addr).await.unwrap();
    let me = Member { name: "a".into(), gossip: a_addr, control: SocketAddr::new(a_addr.ip(), 1), dual_stack: None, services: Vec::new(), boot: 2 };
    let (a, _) = Gossip::start(socket, Settings { me, key: Key::new(&key), seeds: vec![b.me().gossip], size: 8 });
    until("the new A knows the others", Duration::from_secs(5), || a.live().len() == 2).await;
    until("the new A knows B's and C's room", Duration::from_secs(5), || {
        let mut known = a.candidates();
        known.sort_unstable();
        let mut want = vec![(b.me().gossip, 90), (c.me().gossip, 70)];
        want.sort_unstable();
        known == want
    })
    .await;
}
