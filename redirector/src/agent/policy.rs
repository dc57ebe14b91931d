//! The shedding policy and other pure decisions, unit-tested on their own.

use std::net::IpAddr;


/// The shedding policy: the clients with the most connections first, until the projected load
/// is at or below `low`. One function, easy to change.
#[must_use]
pub fn pick_clients(clients: &[(IpAddr, u64)], total: u64, low: u64) -> Vec<(IpAddr, u64)> {
    let mut sorted: Vec<(IpAddr, u64)> = clients.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut projected = total;
    let mut out = Vec::new();
    for c in sorted {
        if projected <= low {
            break;
        }
        projected = projected.saturating_sub(c.1);
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_moves_the_biggest_clients_until_under_low() {
        let c = |i: u8, n| (IpAddr::from([198, 18, 1, i]), n);
        let clients = [c(1, 5), c(2, 40), c(3, 10), c(4, 30), c(5, 15)];
        // total 100, low 50: move 40 (->60), then 30 (->30).
        assert_eq!(pick_clients(&clients, 100, 50), vec![c(2, 40), c(4, 30)]);
        assert!(pick_clients(&clients, 40, 50).is_empty(), "already under low");
        assert_eq!(pick_clients(&clients, 100, 0).len(), 5, "never more than there are");
    }
}
