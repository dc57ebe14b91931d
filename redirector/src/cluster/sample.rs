//! Whom an overloaded member asks for help: a few live members drawn at random among those
//! with room (the power of d choices), the roomiest first. Asking all would make every request
//! cost the whole cluster; asking only the globally least loaded would send every overloaded
//! member to the same few at once.

use std::{collections::HashSet, hash::BuildHasher, net::SocketAddr};

use rand::{Rng, seq::SliceRandom as _};

/// Members to ask, from `(member, room)` of the live members with a known load: the
/// `preferred` ones (the agent's linked ones: a link opened inside a negotiation costs it a
/// TLS handshake) if the `d` roomiest of them have room for `need` together (the clients are
/// split among them); otherwise `d` drawn at random among those with room for `need` alone
/// (none of them preferred, then). Ordered roomiest first.
#[must_use]
pub fn sample<S: BuildHasher>(candidates: &[(SocketAddr, u64)], need: u64, d: usize, preferred: &HashSet<SocketAddr, S>, rng: &mut impl Rng) -> Vec<(SocketAddr, u64)> {
    let mut linked: Vec<(SocketAddr, u64)> = candidates.iter().copied().filter(|c| c.1 > 0 && preferred.contains(&c.0)).collect();
    // The roomiest, drawn at random among those with as much room.
    linked.shuffle(rng);
    linked.sort_by_key(|c| std::cmp::Reverse(c.1));
    linked.truncate(d);
    let mut picked = if !linked.is_empty() && linked.iter().map(|c| c.1).sum::<u64>() >= need {
        linked
    } else {
        // Only as many are shuffled as are drawn (a node of a thousand members samples often).
        let mut fit: Vec<(SocketAddr, u64)> = candidates.iter().copied().filter(|c| c.1 >= need.max(1)).collect();
        fit.partial_shuffle(rng, d).0.to_vec()
    };
    picked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    picked
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{SeedableRng as _, rngs::StdRng};

    use super::*;

    fn m(i: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 1], i))
    }

    #[test]
    fn only_members_with_room_are_asked_roomiest_first() {
        let c = [(m(1), 0), (m(2), 5), (m(3), 50), (m(4), 2)];
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(sample(&c, 3, 3, &HashSet::new(), &mut rng), vec![(m(3), 50), (m(2), 5)]);
        assert_eq!(sample(&c, 0, 9, &HashSet::new(), &mut rng).len(), 3, "no need still needs some room");
        assert!(sample(&c, 100, 3, &HashSet::new(), &mut rng).is_empty());
    }

    #[test]
    fn requests_spread_over_the_members_with_room() {
        // 1,000 members with the same room, 10,000 samples of 3: each member is asked about 30
        // times; none is singled out.
        let c: Vec<_> = (0..1000).map(|i| (m(i), 10)).collect();
        let mut rng = StdRng::seed_from_u64(2);
        let mut asked: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..10_000 {
            let s = sample(&c, 1, 3, &HashSet::new(), &mut rng);
            assert_eq!(s.len(), 3);
            for (a, _) in s {
                *asked.entry(a).or_default() += 1;
            }
        }
        let max = *asked.values().max().unwrap();
        assert!(asked.len() > 990 && max < 70, "{} members asked, at most {max} times each", asked.len());
    }

    #[test]
    fn members_linked_already_are_asked_first_when_they_fit_together() {
        let c: Vec<_> = (1..=100).map(|i| (m(i), if i == 7 { 2 } else { 10 })).collect();
        let preferred: HashSet<SocketAddr> = [m(3), m(5), m(7)].into();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let s = sample(&c, 5, 3, &preferred, &mut rng);
            assert_eq!(s, vec![(m(3), 10), (m(5), 10), (m(7), 2)], "the linked ones, roomiest first");
            let s = sample(&c, 22, 3, &preferred, &mut rng);
            assert_eq!(s.len(), 3, "the linked ones' 22 together: {s:?}");
            assert!(s.iter().all(|(a, _)| preferred.contains(a)), "only linked ones while they fit together: {s:?}");
        }
        // More than the linked ones have together (50): drawn among those with room for all,
        // whether linked or not.
        let c: Vec<_> = (1..=100)
            .map(|i| {
                (
                    m(i),
                    if i == 3 {
                        30
                    } else if i <= 10 {
                        10
                    } else {
                        60
                    },
                )
            })
            .collect();
        for _ in 0..100 {
            let s = sample(&c, 55, 3, &preferred, &mut rng);
            assert!(s.len() == 3 && s.iter().all(|(a, room)| *room == 60 && !preferred.contains(a)), "{s:?}");
        }
        // More linked ones than asked: drawn among them, every one in turn.
        let many: HashSet<SocketAddr> = (1..=10).map(m).collect();
        let mut asked = HashSet::new();
        for _ in 0..200 {
            for (a, _) in sample(&c, 1, 3, &many, &mut rng) {
                assert!(many.contains(&a), "only linked ones while enough fit: {a}");
                asked.insert(a);
            }
        }
        assert_eq!(asked.len(), 10, "the ten linked ones, each drawn: {asked:?}");
    }
}
