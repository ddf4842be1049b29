//! Port ACLs: allow/deny by remote MAC or IP prefix and direction, with hit counters.
//!
//! Evaluation: among the rules matching the frame's direction and remote address, the most
//! specific wins (a MAC rule beats any IP rule; a longer prefix beats a shorter one); at
//! equal specificity Deny wins. No match: allow.

use std::net::IpAddr;

use serde::Serialize;

use crate::config::{AclAction, AclDirection, AclRule, Mac};

/// A port's rules with their hit counters.
#[derive(Debug, Clone, Default)]
pub struct AclTable {
    rules: Vec<AclRule>,
    hits: Vec<u64>,
}

/// A rule and how often it decided a frame.
#[derive(Debug, Clone, Serialize)]
pub struct AclRuleStats {
    /// The rule.
    #[serde(flatten)]
    pub rule: AclRule,
    /// Frames it decided.
    pub hits: u64,
}

impl AclTable {
    /// A table over `rules` with zeroed counters.
    pub fn new(rules: Vec<AclRule>) -> Self {
        let hits = vec![0; rules.len()];
        AclTable { rules, hits }
    }

    /// The rules this table holds.
    pub fn rules(&self) -> &[AclRule] {
        &self.rules
    }

    /// Decides a frame going `dir` (relative to the port owner) whose remote side has
    /// `remote_mac` and `remote_ip`. Returns the deciding rule's action, or `None` when no
    /// rule matches.
    pub fn evaluate(
        &mut self,
        dir: AclDirection,
        remote_mac: Mac,
        remote_ip: Option<IpAddr>,
    ) -> Option<AclAction> {
        let mut best: Option<(u16, AclAction, usize)> = None;
        for (i, r) in self.rules.iter().enumerate() {
            if r.direction != AclDirection::Both && r.direction != dir {
                continue;
            }
            let spec = if let Some(m) = r.remote_mac {
                if m != remote_mac {
                    continue;
                }
                1000
            } else if let Some(p) = r.remote_ip {
                match remote_ip {
                    Some(ip) if p.contains(ip) => u16::from(p.len),
                    _ => continue,
                }
            } else {
                continue;
            };
            let better = match best {
                None => true,
                Some((s, a, _)) => {
                    spec > s || (spec == s && a == AclAction::Allow && r.action == AclAction::Deny)
                }
            };
            if better {
                best = Some((spec, r.action, i));
            }
        }
        let (_, action, i) = best?;
        self.hits[i] += 1;
        Some(action)
    }

    /// Rules with counters.
    pub fn stats(&self) -> Vec<AclRuleStats> {
        self.rules
            .iter()
            .zip(&self.hits)
            .map(|(r, h)| AclRuleStats {
                rule: r.clone(),
                hits: *h,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: AclAction, direction: AclDirection, ip: &str) -> AclRule {
        AclRule {
            action,
            direction,
            remote_mac: None,
            remote_ip: Some(ip.parse().unwrap()),
        }
    }

    /// Longest prefix wins, deny wins ties, direction is honoured, counters count.
    #[test]
    fn evaluation() {
        let mut t = AclTable::new(vec![
            rule(AclAction::Deny, AclDirection::Outbound, "0.0.0.0/0"),
            rule(AclAction::Allow, AclDirection::Outbound, "10.0.0.0/24"),
            rule(AclAction::Allow, AclDirection::Both, "10.0.0.9/32"),
            rule(AclAction::Deny, AclDirection::Both, "10.0.0.9/32"),
        ]);
        let m = Mac([2, 0, 0, 0, 0, 1]);
        let ip = |s: &str| Some(s.parse().unwrap());
        assert_eq!(
            t.evaluate(AclDirection::Outbound, m, ip("8.8.8.8")),
            Some(AclAction::Deny)
        );
        assert_eq!(
            t.evaluate(AclDirection::Outbound, m, ip("10.0.0.3")),
            Some(AclAction::Allow)
        );
        assert_eq!(t.evaluate(AclDirection::Inbound, m, ip("8.8.8.8")), None);
        assert_eq!(
            t.evaluate(AclDirection::Inbound, m, ip("10.0.0.9")),
            Some(AclAction::Deny)
        );
        assert_eq!(t.evaluate(AclDirection::Outbound, m, None), None);
        let s = t.stats();
        assert_eq!(
            s.iter().map(|r| r.hits).collect::<Vec<_>>(),
            vec![1, 1, 0, 1]
        );
        t.rules.push(AclRule {
            action: AclAction::Allow,
            direction: AclDirection::Both,
            remote_mac: Some(m),
            remote_ip: None,
        });
        t.hits.push(0);
        // a MAC rule is more specific than any IP rule
        assert_eq!(
            t.evaluate(AclDirection::Inbound, m, ip("10.0.0.9")),
            Some(AclAction::Allow)
        );
    }
}
