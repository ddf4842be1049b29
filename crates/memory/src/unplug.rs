//! How much one step may take from a running guest through virtio-mem.
//!
//! Unplugging virtio-mem memory (`requested-size` below the plugged size) makes the guest
//! migrate the pages out of the blocks it gives back (they are in `ZONE_MOVABLE`) into its
//! other free memory. The guest cannot refuse: if its free memory goes while it migrates, its
//! own allocations fail and, with nothing reclaimable (tmpfs and anonymous memory without
//! swap), its OOM killer runs; with nothing left to kill the kernel panics. The balloon has a
//! safety valve for this (`deflate-on-oom`); virtio-mem has none. So the worker asks virtio-mem
//! for at most what the guest reports available now, minus [`UNPLUG_FLOOR`], in each step
//! ([`unplug_step`]), and the balancer asks again in the next round from the guest's new
//! report: a guest whose load gives memory back under pressure (a cache) follows the target
//! step by step; a guest that cannot give more keeps it (and the VM is counted as holding it,
//! so nobody else is given that memory).

use crate::MIB;

/// Memory left available in the guest by one virtio-mem unplug step, bytes.
pub const UNPLUG_FLOOR: u64 = 12 * MIB;

/// The virtio-mem `requested-size` to set for a step towards `target_requested` (bytes).
///
/// - `plugged`: the device's plugged size now;
/// - `available`: the guest's `MemAvailable` from the same moment (`None`: unknown, no limit);
/// - `block`: the device's block size.
///
/// Growing (`target_requested >= plugged`) is never limited here. Shrinking takes at most
/// `available - UNPLUG_FLOOR`, rounded down to whole blocks; with less available than the
/// floor nothing more is taken (an unplug still in flight is held at what is plugged now).
/// Because `plugged` and `available` describe the same moment, a step asked again before the
/// last one has completed asks for the same size, never twice the memory.
pub fn unplug_step(plugged: u64, target_requested: u64, available: Option<u64>, block: u64) -> u64 {
    if target_requested >= plugged {
        return target_requested;
    }
    let Some(available) = available else {
        return target_requested;
    };
    let block = block.max(1);
    let take = available.saturating_sub(UNPLUG_FLOOR);
    let take = take - take % block;
    let keep = plugged.saturating_sub(take);
    // `plugged` is a whole number of blocks; round up in case it is not.
    let keep = keep.div_ceil(block) * block;
    keep.max(target_requested).min(plugged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 2 * MIB;

    /// Growth and plenty available: the target as asked.
    #[test]
    fn not_limited() {
        assert_eq!(unplug_step(64 * MIB, 128 * MIB, Some(0), B), 128 * MIB);
        assert_eq!(unplug_step(256 * MIB, 0, Some(300 * MIB), B), 0);
        assert_eq!(unplug_step(256 * MIB, 224 * MIB, None, B), 224 * MIB);
    }

    /// Shrinking under pressure takes at most what is available above the floor, in blocks.
    #[test]
    fn limited_to_available() {
        // 25 MiB available: 13 MiB above the floor, 12 MiB in whole blocks.
        assert_eq!(
            unplug_step(256 * MIB, 224 * MIB, Some(25 * MIB), B),
            244 * MIB
        );
        // At or below the floor: nothing more (an in-flight unplug is held).
        assert_eq!(
            unplug_step(256 * MIB, 224 * MIB, Some(12 * MIB), B),
            256 * MIB
        );
        assert_eq!(unplug_step(256 * MIB, 0, Some(3 * MIB), B), 256 * MIB);
        // Never below the target.
        assert_eq!(
            unplug_step(256 * MIB, 240 * MIB, Some(100 * MIB), B),
            240 * MIB
        );
    }

    /// The result is always between the target and what is plugged, in whole blocks.
    #[test]
    fn bounds() {
        for plugged in (0..64).map(|b| b * B) {
            for target in (0..64).map(|b| b * B) {
                for avail in [
                    None,
                    Some(0),
                    Some(17 * MIB),
                    Some(33 * MIB + 5),
                    Some(1 << 40),
                ] {
                    let r = unplug_step(plugged, target, avail, B);
                    assert_eq!(r % B, 0);
                    if target < plugged {
                        assert!(
                            r >= target && r <= plugged,
                            "{plugged} {target} {avail:?} {r}"
                        );
                    } else {
                        assert_eq!(r, target);
                    }
                }
            }
        }
    }
}
