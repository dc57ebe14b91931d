//! Client addresses as the protocol writes them.

use std::net::IpAddr;

/// A client address as an application or an agent wrote it, in the agent's form: IPv4-mapped
/// IPv6 addresses (what a dual-stack listener reports for IPv4 clients) are IPv4; any textual
/// form of an address is accepted (upper-case IPv6 too). `None` if it is not an address.
#[must_use]
pub fn parse_client(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_upper_case_forms_are_the_same_client() {
        assert_eq!(parse_client("::ffff:198.18.1.5"), Some(IpAddr::from([198, 18, 1, 5])));
        assert_eq!(parse_client("2001:DB8::5").map(|a| a.to_string()).as_deref(), Some("2001:db8::5"));
        assert_eq!(parse_client("nobody"), None);
    }
}
