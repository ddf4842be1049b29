//! The forwarding database: MAC learning per VLAN with aging and static entries.
//!
//! Pure: time is passed in as nanoseconds from any monotonic origin.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;

use crate::config::Mac;
use crate::PortId;

/// A fast hasher for the small fixed-size FDB key (VLAN + MAC). Keys come from frames, so
/// the multiply-xorshift mix keeps flooding attacks from clustering buckets cheaply enough,
/// and the table size is capped anyway.
#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).rotate_left(5) ^ self.0.wrapping_mul(31);
        }
    }
    fn write_u16(&mut self, v: u16) {
        self.0 = self.0.rotate_left(16) ^ u64::from(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.0 = self.0.rotate_left(8) ^ v as u64;
    }
}

type Table = HashMap<(u16, Mac), Entry, BuildHasherDefault<KeyHasher>>;

/// One FDB entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    port: PortId,
    last_seen_ns: u64,
    is_static: bool,
}

/// What [`Fdb::learn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A new entry.
    New,
    /// The MAC moved from another port.
    Moved {
        /// Where it was.
        from: PortId,
    },
    /// The entry was refreshed.
    Refreshed,
    /// Not learned: the MAC is static on another port, multicast, or the table is full.
    Refused,
}

/// An FDB row for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FdbRow {
    /// VLAN.
    pub vlan: u16,
    /// MAC.
    pub mac: Mac,
    /// Port.
    pub port: PortId,
    /// Static (never ages, never moves).
    pub is_static: bool,
    /// Seconds since last seen (0 for static entries).
    pub age_secs: u64,
}

/// MAC table keyed by (VLAN, MAC).
#[derive(Debug, Clone)]
pub struct Fdb {
    table: Table,
    aging_ns: u64,
    max_entries: usize,
}

impl Fdb {
    /// An empty table whose dynamic entries expire after `aging_secs` and which holds at most
    /// `max_entries` dynamic entries (protection against MAC flooding).
    pub fn new(aging_secs: u64, max_entries: usize) -> Self {
        Fdb {
            table: Table::default(),
            aging_ns: aging_secs.saturating_mul(1_000_000_000),
            max_entries,
        }
    }

    /// Changes the aging time.
    pub fn set_aging(&mut self, aging_secs: u64) {
        self.aging_ns = aging_secs.saturating_mul(1_000_000_000);
    }

    /// Learns that `mac` on `vlan` lives behind `port`.
    pub fn learn(&mut self, vlan: u16, mac: Mac, port: PortId, now_ns: u64) -> Learned {
        if mac.is_multicast() || mac.is_zero() {
            return Learned::Refused;
        }
        let full = self.table.len() >= self.max_entries;
        let aging = self.aging_ns;
        match self.table.get_mut(&(vlan, mac)) {
            Some(e) if e.is_static => {
                if e.port == port {
                    Learned::Refreshed
                } else {
                    Learned::Refused
                }
            }
            Some(e) => {
                let expired = now_ns.saturating_sub(e.last_seen_ns) >= aging;
                let old = e.port;
                e.port = port;
                e.last_seen_ns = now_ns;
                if old == port {
                    if expired {
                        Learned::New
                    } else {
                        Learned::Refreshed
                    }
                } else {
                    Learned::Moved { from: old }
                }
            }
            None if full => {
                self.age(now_ns);
                if self.table.len() >= self.max_entries {
                    return Learned::Refused;
                }
                self.learn(vlan, mac, port, now_ns)
            }
            None => {
                self.table.insert(
                    (vlan, mac),
                    Entry {
                        port,
                        last_seen_ns: now_ns,
                        is_static: false,
                    },
                );
                Learned::New
            }
        }
    }

    /// Pins `mac` on `vlan` to `port`.
    pub fn add_static(&mut self, vlan: u16, mac: Mac, port: PortId) {
        self.table.insert(
            (vlan, mac),
            Entry {
                port,
                last_seen_ns: 0,
                is_static: true,
            },
        );
    }

    /// The port `mac` lives behind on `vlan`, if known and not expired.
    pub fn lookup(&self, vlan: u16, mac: Mac, now_ns: u64) -> Option<PortId> {
        let e = self.table.get(&(vlan, mac))?;
        if e.is_static || now_ns.saturating_sub(e.last_seen_ns) < self.aging_ns {
            Some(e.port)
        } else {
            None
        }
    }

    /// Removes expired dynamic entries.
    pub fn age(&mut self, now_ns: u64) {
        let aging = self.aging_ns;
        self.table
            .retain(|_, e| e.is_static || now_ns.saturating_sub(e.last_seen_ns) < aging);
    }

    /// Forgets everything about `port` (static entries too); used when a port goes away or
    /// its VLAN settings change.
    pub fn flush_port(&mut self, port: PortId) {
        self.table.retain(|_, e| e.port != port);
    }

    /// Number of entries (including expired ones not yet aged out).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Live entries sorted by VLAN and MAC.
    pub fn rows(&self, now_ns: u64) -> Vec<FdbRow> {
        let mut v: Vec<FdbRow> = self
            .table
            .iter()
            .filter(|(_, e)| e.is_static || now_ns.saturating_sub(e.last_seen_ns) < self.aging_ns)
            .map(|(&(vlan, mac), e)| FdbRow {
                vlan,
                mac,
                port: e.port,
                is_static: e.is_static,
                age_secs: if e.is_static {
                    0
                } else {
                    now_ns.saturating_sub(e.last_seen_ns) / 1_000_000_000
                },
            })
            .collect();
        v.sort_by_key(|r| (r.vlan, r.mac));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const M1: Mac = Mac([2, 0, 0, 0, 0, 1]);

    /// Learning, moves, VLAN separation and aging behave as a bridge's FDB.
    #[test]
    fn learn_move_age() {
        let mut f = Fdb::new(10, 100);
        assert_eq!(f.learn(1, M1, 3, 0), Learned::New);
        assert_eq!(f.lookup(1, M1, S), Some(3));
        assert_eq!(f.lookup(2, M1, S), None, "FDB is per VLAN");
        assert_eq!(f.learn(1, M1, 3, 2 * S), Learned::Refreshed);
        assert_eq!(f.learn(1, M1, 4, 3 * S), Learned::Moved { from: 3 });
        assert_eq!(f.lookup(1, M1, 12 * S), Some(4));
        assert_eq!(f.lookup(1, M1, 13 * S), None, "expired");
        f.age(13 * S);
        assert!(f.is_empty());
    }

    /// Static entries never age and never move; multicast sources are never learned.
    #[test]
    fn static_and_multicast() {
        let mut f = Fdb::new(1, 100);
        f.add_static(1, M1, 7);
        assert_eq!(f.learn(1, M1, 8, 0), Learned::Refused);
        assert_eq!(f.lookup(1, M1, 1000 * S), Some(7));
        assert_eq!(f.learn(1, Mac::BROADCAST, 8, 0), Learned::Refused);
        f.flush_port(7);
        assert_eq!(f.lookup(1, M1, 0), None);
    }

    /// The table never grows past its limit.
    #[test]
    fn capacity() {
        let mut f = Fdb::new(100, 4);
        for i in 0..10u8 {
            f.learn(1, Mac([2, 0, 0, 0, 0, i]), 1, 0);
        }
        assert_eq!(f.len(), 4);
        // after aging, room again
        assert_eq!(
            f.learn(1, Mac([2, 0, 0, 0, 1, 0]), 1, 200 * S),
            Learned::New
        );
    }
}
