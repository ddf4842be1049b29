//! Private VLANs: isolated, community and promiscuous ports inside one VLAN.

use crate::config::PvlanMode;

/// True if a frame may go from a port in mode `from` to a port in mode `to` (same VLAN).
///
/// Promiscuous ports talk to everyone; community ports to their community and promiscuous
/// ports; isolated ports only to promiscuous ports.
pub fn may_forward(from: PvlanMode, to: PvlanMode) -> bool {
    use PvlanMode::*;
    match (from, to) {
        (Promiscuous, _) | (_, Promiscuous) => true,
        (Community { id: a }, Community { id: b }) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PvlanMode::*;

    /// The PVLAN matrix, both directions.
    #[test]
    fn matrix() {
        let c1 = Community { id: 1 };
        let c2 = Community { id: 2 };
        assert!(may_forward(Isolated, Promiscuous));
        assert!(may_forward(Promiscuous, Isolated));
        assert!(!may_forward(Isolated, Isolated));
        assert!(!may_forward(Isolated, c1));
        assert!(!may_forward(c1, Isolated));
        assert!(may_forward(c1, c1));
        assert!(!may_forward(c1, c2));
        assert!(may_forward(c2, Promiscuous));
    }
}
