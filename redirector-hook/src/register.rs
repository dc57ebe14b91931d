//! The register line, the first an application sends, and the agent's rules for it.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{Version, client::parse_client, msg::Role};

/// Most unfinished hand-overs a register line may report: an application takes part in one
/// hand-over per service at a time, so even a long outage of its agent leaves a few.
pub const MAX_PENDING: usize = 1024;

/// The register line as it travels. The agent refuses fields it does not know here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub op: String,
    pub service: String,
    pub version: Option<u64>,
    #[serde(default)]
    pub pending: Vec<WirePending>,
}

/// A hand-over the application took part in and has not seen end, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WirePending {
    pub handoff: String,
    pub role: String,
    pub clients: Vec<String>,
}

/// A hand-over an application reported as unfinished when it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingHandoff {
    pub handoff: String,
    pub role: Role,
    /// The clients it froze (export) or imported (import).
    pub clients: Vec<IpAddr>,
}

/// A register line the agent accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub service: SocketAddr,
    pub version: Version,
    pub pending: Vec<PendingHandoff>,
}

impl Register {
    /// The register line of an application serving `service` in `version`, with its
    /// unfinished hand-overs (listed in the order given; the SDKs sort them by name).
    pub fn new<'a>(service: SocketAddr, version: Version, pending: impl IntoIterator<Item = (&'a str, Role, &'a [IpAddr])>) -> Self {
        let pending = pending
            .into_iter()
            .map(|(handoff, role, clients)| WirePending {
                handoff: handoff.to_string(),
                role: match role {
                    Role::Export => "export",
                    Role::Import => "import",
                }
                .to_string(),
                clients: clients.iter().map(ToString::to_string).collect(),
            })
            .collect();
        Self { op: "register".into(), service: service.to_string(), version: Some(version.number()), pending }
    }

    /// Reads a register line by the agent's rules; the error is what the application is told.
    pub fn parse(line: &[u8]) -> Result<Registration, String> {
        let r: Self = serde_json::from_slice(line).map_err(|e| format!("malformed register line: {e}"))?;
        if r.op != "register" {
            return Err(format!("expected op \"register\", got {:?}", r.op));
        }
        let service: SocketAddr = r.service.parse().map_err(|_| format!("service {:?} is not ADDRESS:PORT", r.service))?;
        let version = match r.version {
            Some(n) => Version::from_number(n).ok_or_else(|| format!("this agent speaks hook protocol versions 1, 2 and 3, not {n}"))?,
            None => return Err("no version: register with \"version\":3 (or 2, or 1)".to_string()),
        };
        if r.pending.len() > MAX_PENDING {
            return Err(format!("{} pending hand-overs: at most {MAX_PENDING} are reported", r.pending.len()));
        }
        let mut pending = Vec::with_capacity(r.pending.len());
        for p in r.pending {
            let role = match p.role.as_str() {
                "export" => Role::Export,
                "import" => Role::Import,
                other => return Err(format!("pending hand-over {:?}: role {other:?} is neither \"export\" nor \"import\"", p.handoff)),
            };
            let clients =
                p.clients.iter().map(|c| parse_client(c).ok_or_else(|| format!("pending hand-over {:?}: {c:?} is not an address", p.handoff))).collect::<Result<Vec<_>, _>>()?;
            pending.push(PendingHandoff { handoff: p.handoff, role, clients });
        }
        Ok(Registration { service, version, pending })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn registrations_need_a_known_version_and_well_formed_pending_hand_overs() {
        let one = r#"{"handoff":"a/1/b","role":"export","clients":[]}"#;
        let too_many = format!(r#"{{"op":"register","service":"198.18.0.10:80","version":2,"pending":[{}]}}"#, vec![one; MAX_PENDING + 1].join(","));
        assert!(Register::parse(too_many.replacen(&format!("{one},"), "", 1).as_bytes()).is_ok(), "{MAX_PENDING} are fine");
        let r = Register::parse(br#"{"op":"register","service":"198.18.0.10:80","version":1}"#).unwrap();
        assert_eq!((r.service, r.version, r.pending.len()), ("198.18.0.10:80".parse().unwrap(), Version::V1, 0));
        let r = Register::parse(
            br#"{"op":"register","service":"[2001:db8::10]:80","version":2,"pending":[{"handoff":"a/1/b","role":"export","clients":["::ffff:198.18.1.5"]},{"handoff":"c/2/a","role":"import","clients":[]}]}"#,
        )
        .unwrap();
        assert_eq!(r.version, Version::V2);
        assert_eq!(r.pending[0], PendingHandoff { handoff: "a/1/b".into(), role: Role::Export, clients: vec![a("198.18.1.5")] });
        assert_eq!(r.pending[1].role, Role::Import);
        for (bad, why) in [
            (r#"{"op":"register","service":"198.18.0.10:80"}"#, "no version"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":4}"#, "versions 1, 2 and 3, not 4"),
            (r#"{"op":"register","service":"198.18.0.10","version":1}"#, "not ADDRESS:PORT"),
            (r#"{"op":"hello","service":"198.18.0.10:80","version":1}"#, "expected op"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"pending":[{"handoff":"x","role":"both","clients":[]}]}"#, "neither"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"pending":[{"handoff":"x","role":"export"}]}"#, "malformed"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"pending":[{"handoff":"x","role":"export","clients":["nobody"]}]}"#, "not an address"),
            (r#"{"op":"register","service":"198.18.0.10:80","version":1,"servce":1}"#, "unknown field"),
            (&too_many, "at most 1024"),
        ] {
            let e = Register::parse(bad.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn what_an_sdk_writes_the_agent_reads() {
        let clients = [a("198.18.1.5")];
        let line = serde_json::to_vec(&Register::new("198.18.0.10:80".parse().unwrap(), Version::V2, [("a/1/b", Role::Export, &clients[..])])).unwrap();
        let r = Register::parse(&line).unwrap();
        assert_eq!(r.pending, vec![PendingHandoff { handoff: "a/1/b".into(), role: Role::Export, clients: clients.to_vec() }]);
    }
}
