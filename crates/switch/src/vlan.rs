//! 802.1Q policy: classify a frame arriving on a port into a VLAN, and decide whether and
//! how (tagged or untagged) a frame of a VLAN leaves a port.
//!
//! Isolation rule: a frame is only ever classified into a VLAN its ingress port is a member
//! of, and only ever leaves ports that are members of that VLAN. Access ports drop tagged
//! frames (except priority tags, VID 0), so a guest cannot hop VLANs by tagging.

use crate::config::VlanMode;

/// How a frame leaves a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressTag {
    /// Without a tag.
    Untagged,
    /// With a tag carrying the VLAN.
    Tagged,
}

/// The VLAN a frame arriving on a port in `mode` belongs to, given its tag's VID (`None`
/// when untagged). `None` means drop.
pub fn classify(mode: &VlanMode, tag_vid: Option<u16>) -> Option<u16> {
    match mode {
        VlanMode::Access { vlan } => match tag_vid {
            None | Some(0) => Some(*vlan),
            Some(_) => None,
        },
        VlanMode::Trunk { allowed, native } => match tag_vid {
            None | Some(0) => *native,
            Some(v) if allowed.contains(&v) => Some(v),
            Some(_) => None,
        },
    }
}

/// Whether and how a frame of `vlan` leaves a port in `mode`; `None` when the port is not a
/// member.
pub fn egress(mode: &VlanMode, vlan: u16) -> Option<EgressTag> {
    match mode {
        VlanMode::Access { vlan: v } => (*v == vlan).then_some(EgressTag::Untagged),
        VlanMode::Trunk { allowed, native } => {
            if !allowed.contains(&vlan) {
                None
            } else if *native == Some(vlan) {
                Some(EgressTag::Untagged)
            } else {
                Some(EgressTag::Tagged)
            }
        }
    }
}

/// True if the port carries `vlan`.
pub fn is_member(mode: &VlanMode, vlan: u16) -> bool {
    egress(mode, vlan).is_some()
}

/// The VLANs a port carries (for static MAC entries).
pub fn members(mode: &VlanMode) -> Vec<u16> {
    match mode {
        VlanMode::Access { vlan } => vec![*vlan],
        VlanMode::Trunk { allowed, .. } => allowed.iter().copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Access ports take untagged and priority-tagged frames only.
    #[test]
    fn access() {
        let m = VlanMode::Access { vlan: 10 };
        assert_eq!(classify(&m, None), Some(10));
        assert_eq!(classify(&m, Some(0)), Some(10));
        assert_eq!(
            classify(&m, Some(10)),
            None,
            "no tagged frames on access ports"
        );
        assert_eq!(classify(&m, Some(20)), None);
        assert_eq!(egress(&m, 10), Some(EgressTag::Untagged));
        assert_eq!(egress(&m, 20), None);
    }

    /// Trunks carry their allowed list tagged and the native VLAN untagged.
    #[test]
    fn trunk() {
        let m = VlanMode::Trunk {
            allowed: [1, 10, 20].into(),
            native: Some(1),
        };
        assert_eq!(classify(&m, None), Some(1));
        assert_eq!(classify(&m, Some(10)), Some(10));
        assert_eq!(classify(&m, Some(30)), None);
        assert_eq!(egress(&m, 1), Some(EgressTag::Untagged));
        assert_eq!(egress(&m, 20), Some(EgressTag::Tagged));
        assert_eq!(egress(&m, 30), None);
        let nonative = VlanMode::Trunk {
            allowed: [10].into(),
            native: None,
        };
        assert_eq!(
            classify(&nonative, None),
            None,
            "untagged dropped without native VLAN"
        );
    }
}
