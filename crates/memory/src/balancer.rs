//! The host-wide balancer: each VM's demand and the host's free memory in, one memory target
//! per VM out.
//!
//! One round ([`balance`]), run about once a second by vireod:
//!
//! 1. **Budget.** VMs together may hold at most what they hold now plus what the host can
//!    spare now (`free_for_vms - reserve`, negative when the host itself ate into the
//!    reserve), and never more than `total - reserve`. What a VM holds is what it *has*
//!    (`assigned`, read from QEMU), never what it was told to have: a guest that has not
//!    given memory back yet (a balloon inflating slowly, or a guest that cannot give it
//!    because it needs it) still holds it, and growth already requested but not yet reached
//!    is held too ([`VmDemand::committed`]).
//! 2. **Fixed VMs.** A static VM keeps its startup RAM. A dynamic VM whose demand report is
//!    older than [`BalanceConfig::stale_after_ms`] (or that never reported) keeps its current
//!    commitment ([`Reason::StaleDemand`]): no blind shrinking of a guest we cannot see.
//! 3. **Wanted.** Every other VM wants `demand × (1 + buffer)`, clamped to `[minimum, maximum]`.
//! 4. **Sharing.** If all wanted fit in the budget, each VM gets what it wants. Otherwise every
//!    VM gets its minimum and the rest is shared by weight (weighted water-filling: a VM's
//!    share above its minimum is proportional to its weight, capped at what it wants, and what
//!    a capped VM leaves is shared again). Weight 0 VMs only get what the others leave.
//! 5. **Hysteresis.** Moves smaller than `max(2 % of assigned, 8 MiB)` are skipped, unless
//!    the guest's demand is above what it has (decreases only while the budget still holds).
//!    A VM growing to its weighted share is never held back: the proportion is the point.
//! 6. **Growth limit.** Every increase is measured from the VM's commitment, and their sum is
//!    limited to what is *actually free now*: `free_for_vms - reserve` minus growth already
//!    in flight, and never more than `total - reserve` minus every VM's commitment. Memory a
//!    shrinking VM gives back counts only from the round after the guest has really released
//!    it, so a guest that cannot give memory back never lets the others grow into it.
//!    Minimums are served first, then the rest by weight. This is also what stops a VM with a
//!    huge maximum from grabbing the host: it only grows into free memory, and as soon as
//!    another VM needs memory the sharing step takes it back.
//! 7. **Split.** The target below startup is reached with the balloon, the part above startup
//!    with virtio-mem in whole blocks ([`BalanceConfig::block_size`]).
//!
//! The function is deterministic and keeps no state: the same input gives the same output,
//! and a converged state (every target applied) gives `target == assigned` for every VM.
//!
//! **Invariant** (proptested): `Σ max(0, target - committed) <= spare_now`, so if the guests
//! only ever move towards their targets, the VMs together never hold more than they held
//! plus what was free above the reserve.

use serde::{Deserialize, Serialize};

use crate::{MemorySettings, ALIGN, MIB};

/// One VM as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDemand {
    /// The VM's id (echoed in its [`Decision`]).
    pub id: String,
    /// Its memory settings.
    pub settings: MemorySettings,
    /// Memory the guest has now, bytes: balloon `actual` (QMP `query-balloon`) plus the
    /// virtio-mem device's plugged `size`.
    pub assigned: u64,
    /// What the VM's devices are asked to give the guest now (the last target applied:
    /// balloon target plus virtio-mem `requested-size`), bytes; `None`: unknown or nothing
    /// pending (taken as `assigned`). Above `assigned`, growth is in flight: the guest may take
    /// that memory at any moment, so it counts as held ([`VmDemand::committed`]). Below
    /// `assigned`, the guest is giving memory back, which is not free until it has.
    #[serde(default)]
    pub requested: Option<u64>,
    /// Bytes the guest needs ([`crate::guest_demand`]); ignored when the report is stale.
    pub demand: u64,
    /// When `demand` was reported (milliseconds on the caller's monotonic clock); `None`: the
    /// guest never reported.
    pub reported_at: Option<u64>,
}

impl VmDemand {
    /// Memory the VM holds or may take without asking again: `max(assigned, requested)`.
    /// The balancer hands other VMs only memory outside every VM's commitment.
    pub fn committed(&self) -> u64 {
        self.assigned.max(self.requested.unwrap_or(0))
    }
}

/// The host's memory, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMemory {
    /// Physical memory of the host (`MemTotal`).
    pub total: u64,
    /// Memory free on the host right now (`MemAvailable`), not counting what VMs already hold
    /// (`assigned`); the balancer subtracts the reserve and growth in flight itself.
    pub free_for_vms: u64,
    /// Memory never handed to VMs (host kernel, vireod, workers, QEMU overhead).
    pub reserve: u64,
}

impl HostMemory {
    /// The reserve used when the operator set none: 10 % of host memory, at least 1 GiB and
    /// at most 8 GiB (never more than host memory), in 2 MiB units.
    pub fn default_reserve(total: u64) -> u64 {
        let r = (total / 10).clamp(crate::GIB, 8 * crate::GIB).min(total);
        r - r % ALIGN
    }

    /// The most all VMs together can ever hold: `total - reserve`.
    pub fn vm_limit(&self) -> u64 {
        self.total.saturating_sub(self.reserve)
    }

    /// What VMs may grow into now, before growth in flight: `free_for_vms - reserve`.
    pub fn spare(&self) -> u64 {
        self.free_for_vms.saturating_sub(self.reserve)
    }

    /// What VMs may grow into now beyond their commitments ([`VmDemand::committed`]): the
    /// host's spare minus growth already requested but not reached, and never more than
    /// `total - reserve` minus every commitment.
    pub fn spare_for(&self, vms: &[VmDemand]) -> u64 {
        let committed = vms
            .iter()
            .fold(0u64, |a, v| a.saturating_add(v.committed()));
        let in_flight = vms.iter().fold(0u64, |a, v| {
            a.saturating_add(v.committed().saturating_sub(v.assigned))
        });
        self.spare()
            .saturating_sub(in_flight)
            .min(self.vm_limit().saturating_sub(committed))
    }
}

/// Tunables of the balancer; [`Default`] is what vireod uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceConfig {
    /// virtio-mem block size, bytes (the device's `block-size`; 2 MiB on x86).
    pub block_size: u64,
    /// A demand report older than this is stale, milliseconds.
    pub stale_after_ms: u64,
    /// Skip moves smaller than this percentage of the assigned memory...
    pub hysteresis_percent: u32,
    /// ...or smaller than this many bytes.
    pub hysteresis_min: u64,
    /// Memory left available in every guest whatever its buffer (a target is at least
    /// `demand + min_free`), bytes.
    #[serde(default = "default_min_free")]
    pub min_free: u64,
}

fn default_min_free() -> u64 {
    DEFAULT_MIN_FREE
}

/// Default [`BalanceConfig::min_free`]: 32 MiB.
pub const DEFAULT_MIN_FREE: u64 = 32 * MIB;

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            block_size: 2 * MIB,
            stale_after_ms: 10_000,
            hysteresis_percent: 2,
            hysteresis_min: 8 * MIB,
            min_free: DEFAULT_MIN_FREE,
        }
    }
}

/// Why the balancer chose a target (shown by `vireo memory status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// Dynamic memory is off: the VM keeps its startup RAM.
    Static,
    /// No fresh demand report (agent or balloon driver silent): the VM keeps what it has.
    StaleDemand,
    /// The VM gets demand plus buffer.
    Demand,
    /// Demand plus buffer is below the minimum: the VM is held at its minimum.
    AtMinimum,
    /// Demand plus buffer is above the maximum: the VM is held at its maximum.
    AtMaximum,
    /// The host cannot give every VM what it wants: shared by weight.
    Weighted,
    /// Growth limited to what the host can spare now; more follows in the next rounds.
    GrowthLimited,
    /// The change would be too small to be worth it; the VM keeps what it has.
    Hysteresis,
    /// The host is short of memory even with every VM at its minimum (only possible when the
    /// host's own use grew into the reserve): VMs are held at their minimum, and VMs with
    /// stale reports give memory back towards theirs.
    HostShortage,
}

impl Reason {
    /// The kebab-case name (`stale-demand`, `growth-limited`...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Static => "static",
            Reason::StaleDemand => "stale-demand",
            Reason::Demand => "demand",
            Reason::AtMinimum => "at-minimum",
            Reason::AtMaximum => "at-maximum",
            Reason::Weighted => "weighted",
            Reason::GrowthLimited => "growth-limited",
            Reason::Hysteresis => "hysteresis",
            Reason::HostShortage => "host-shortage",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The balancer's decision for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The VM's id.
    pub id: String,
    /// Memory the guest should have, bytes (`balloon_target + virtio_mem_requested`).
    pub target: u64,
    /// Value for QMP `balloon`: the part of `target` within startup RAM.
    pub balloon_target: u64,
    /// Value for the virtio-mem device's `requested-size`: the part of `target` above startup,
    /// a multiple of the block size.
    pub virtio_mem_requested: u64,
    /// Why.
    pub reason: Reason,
    /// Demand used this round (the reported one, even when stale).
    pub demand: u64,
    /// What the VM would get if the host had enough (demand plus buffer, within its limits).
    pub wanted: u64,
    /// demand / assigned, in percent (over 100: the guest needs more than it has).
    pub pressure_percent: u32,
    /// The target differs from `assigned` or from what the devices are asked now
    /// (`requested`), rounded down to 2 MiB / whole blocks: the worker has something to apply.
    pub changed: bool,
}

/// One balancer round with the default [`BalanceConfig`]; `now_ms` is on the same clock as
/// [`VmDemand::reported_at`]. Returns one decision per VM, in the order given.
pub fn balance(vms: &[VmDemand], host: &HostMemory, now_ms: u64) -> Vec<Decision> {
    balance_with(vms, host, now_ms, &BalanceConfig::default())
}

/// Per-VM working state of one round.
struct Slot {
    floor: u64,
    ceiling: u64,
    wanted: u64,
    /// Demand plus buffer before clamping.
    raw: u64,
    target: u64,
    weight: u32,
    reason: Option<Reason>,
    /// Shares by demand this round (dynamic with a fresh report).
    active: bool,
    /// `assigned` rounded down like targets are (the state a target is compared with).
    current: u64,
    /// [`VmDemand::committed`] rounded down like targets are (growth is measured from it).
    committed: u64,
}

/// One balancer round with explicit tunables. See the module documentation for the rules.
pub fn balance_with(
    vms: &[VmDemand],
    host: &HostMemory,
    now_ms: u64,
    cfg: &BalanceConfig,
) -> Vec<Decision> {
    let block = cfg.block_size.max(ALIGN);
    let spare = host.spare_for(vms);
    let held = vms.iter().fold(0u64, |a, v| a.saturating_add(v.assigned));
    // When the host's own use ate into the reserve, the budget is below what VMs hold: they
    // give memory back.
    let budget = host.vm_limit().min(
        held.saturating_add(host.free_for_vms)
            .saturating_sub(host.reserve),
    );

    let mut slots: Vec<Slot> = vms
        .iter()
        .map(|v| {
            let s = &v.settings;
            let current = align_down(v.assigned, s.startup, block);
            let committed = align_down(v.committed(), s.startup, block);
            let floor = s.floor();
            let ceiling = align_down(s.ceiling(), s.startup, block).max(floor);
            let fresh = v
                .reported_at
                .is_some_and(|t| now_ms.saturating_sub(t) <= cfg.stale_after_ms);
            let raw =
                with_buffer(v.demand, s.buffer_percent).max(v.demand.saturating_add(cfg.min_free));
            let mut slot = Slot {
                floor,
                ceiling,
                wanted: align_up(raw, s.startup, block).clamp(floor, ceiling),
                raw,
                target: 0,
                weight: s.weight,
                reason: None,
                active: false,
                current,
                committed,
            };
            if !s.dynamic {
                slot.target = s.startup;
                slot.wanted = s.startup;
                slot.reason = Some(Reason::Static);
            } else if !fresh {
                slot.target = committed.clamp(floor, ceiling);
                slot.reason = Some(Reason::StaleDemand);
            } else {
                slot.active = true;
            }
            slot
        })
        .collect();

    share(&mut slots, budget, block, vms);
    hysteresis(&mut slots, vms, budget, cfg);
    limit_growth(&mut slots, vms, spare, block);

    vms.iter()
        .zip(slots)
        .map(|(v, s)| {
            let reason = s
                .reason
                .unwrap_or(if s.target >= s.ceiling && s.raw > s.ceiling {
                    Reason::AtMaximum
                } else if s.target <= s.floor && s.raw <= s.floor {
                    Reason::AtMinimum
                } else {
                    Reason::Demand
                });
            let startup = v.settings.startup;
            Decision {
                id: v.id.clone(),
                target: s.target,
                balloon_target: s.target.min(startup),
                virtio_mem_requested: s.target.saturating_sub(startup),
                reason,
                demand: v.demand,
                wanted: s.wanted,
                pressure_percent: pressure(v.demand, v.assigned),
                changed: s.target != s.current
                    || v.requested
                        .is_some_and(|r| align_down(r, startup, block) != s.target),
            }
        })
        .collect()
}

/// Steps 3 and 4: targets of the active VMs from the budget left by the fixed ones.
fn share(slots: &mut [Slot], budget: u64, block: u64, vms: &[VmDemand]) {
    let fixed: u64 = slots.iter().filter(|s| !s.active).map(|s| s.target).sum();
    let floors: u64 = slots.iter().filter(|s| s.active).map(|s| s.floor).sum();
    let wanted: u64 = slots.iter().filter(|s| s.active).map(|s| s.wanted).sum();
    if fixed.saturating_add(floors) > budget {
        // The host is short even with every active VM at its minimum: they get exactly that,
        // and VMs with stale reports give back towards their minimum as far as needed (the
        // reserve comes before "no blind shrinking").
        let deficit = fixed.saturating_add(floors) - budget;
        let stale: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].reason == Some(Reason::StaleDemand))
            .collect();
        let excess: Vec<u64> = stale
            .iter()
            .map(|&i| slots[i].target - slots[i].floor)
            .collect();
        let weights: Vec<u32> = stale.iter().map(|&i| slots[i].weight).collect();
        let keep = water_fill(
            &excess,
            &weights,
            excess.iter().sum::<u64>().saturating_sub(deficit),
        );
        for (k, &i) in stale.iter().enumerate() {
            let s = &mut slots[i];
            let t = align_down(s.floor + keep[k], vms[i].settings.startup, block).max(s.floor);
            if t < s.target {
                s.target = t;
                s.reason = Some(Reason::HostShortage);
            }
        }
        for s in slots.iter_mut().filter(|s| s.active) {
            s.target = s.floor;
            s.reason = Some(Reason::HostShortage);
        }
        return;
    }
    let avail = budget - fixed;
    if wanted <= avail {
        for s in slots.iter_mut().filter(|s| s.active) {
            s.target = s.wanted;
        }
        return;
    }
    let idx: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].active).collect();
    let excess: Vec<u64> = idx
        .iter()
        .map(|&i| slots[i].wanted - slots[i].floor)
        .collect();
    let weights: Vec<u32> = idx.iter().map(|&i| slots[i].weight).collect();
    let shares = water_fill(&excess, &weights, avail - floors);
    for (k, &i) in idx.iter().enumerate() {
        let s = &mut slots[i];
        s.target = align_down(s.floor + shares[k], vms[i].settings.startup, block).max(s.floor);
        if s.target < s.wanted {
            s.reason = Some(Reason::Weighted);
        }
    }
}

/// Step 6: the sum of increases over the VMs' commitments stays within what is free now
/// (`spare`, from [`HostMemory::spare_for`]); minimums first.
fn limit_growth(slots: &mut [Slot], vms: &[VmDemand], spare: u64, block: u64) {
    let growth: Vec<u64> = slots
        .iter()
        .zip(vms)
        .map(|(s, _)| s.target.saturating_sub(s.committed))
        .collect();
    if growth.iter().sum::<u64>() <= spare {
        return;
    }
    let deficit: Vec<u64> = slots
        .iter()
        .zip(vms)
        .map(|(s, _)| s.floor.min(s.target).saturating_sub(s.committed))
        .collect();
    // Minimums are guarantees: shared equally, whatever the weights.
    let first = water_fill(&deficit, &vec![1; deficit.len()], spare);
    let weights: Vec<u32> = slots.iter().map(|s| s.weight).collect();
    let left = spare - first.iter().sum::<u64>();
    let rest: Vec<u64> = growth.iter().zip(&deficit).map(|(g, d)| g - d).collect();
    let second = water_fill(&rest, &weights, left);
    for (i, (s, v)) in slots.iter_mut().zip(vms).enumerate() {
        let granted = first[i] + second[i];
        if granted >= growth[i] {
            continue;
        }
        let t = align_down(s.committed + granted, v.settings.startup, block).max(s.committed);
        s.target = t.min(s.target);
        s.reason = Some(Reason::GrowthLimited);
    }
}

/// Step 5: skip small moves of VMs that share by demand. Small decreases are only skipped while
/// the budget still holds; this runs before the growth limit, so a skipped decrease never
/// blocks another VM's growth for good.
fn hysteresis(slots: &mut [Slot], vms: &[VmDemand], budget: u64, cfg: &BalanceConfig) {
    let threshold = |a: u64| {
        (a / 100)
            .saturating_mul(u64::from(cfg.hysteresis_percent))
            .max(cfg.hysteresis_min)
    };
    let mut shrinks = Vec::new();
    for (i, (s, v)) in slots.iter_mut().zip(vms).enumerate() {
        let movable = s.active && s.reason != Some(Reason::HostShortage);
        let cur = s.current;
        let inside = cur >= s.floor && cur <= s.ceiling;
        if !movable || !inside || s.target == cur {
            continue;
        }
        if s.target > cur {
            // A VM held below its weighted share would stay off the proportion the weights
            // decide; shares under contention are stable, so reaching them is no churn.
            let weighted = s.reason == Some(Reason::Weighted);
            if !weighted && s.target - cur < threshold(cur) && v.demand <= v.assigned {
                s.target = cur;
                s.reason = Some(Reason::Hysteresis);
            }
        } else if cur - s.target < threshold(cur) {
            shrinks.push(i);
        }
    }
    let sum: u64 = slots.iter().map(|s| s.target).sum();
    let mut slack = budget.saturating_sub(sum);
    shrinks.sort_by_key(|&i| slots[i].current - slots[i].target);
    for i in shrinks {
        let s = &mut slots[i];
        let delta = s.current - s.target;
        if delta > slack {
            break;
        }
        slack -= delta;
        s.target = s.current;
        s.reason = Some(Reason::Hysteresis);
    }
}

/// Weighted water-filling: shares `budget` among claims `excess` in proportion to `weights`,
/// no claim getting more than it asks; what a satisfied claim leaves goes to the others.
/// Zero-weight claims only get what positive-weight claims leave, shared equally.
/// The sum of the result never exceeds `budget`.
pub(crate) fn water_fill(excess: &[u64], weights: &[u32], budget: u64) -> Vec<u64> {
    let total: u128 = excess.iter().map(|&e| u128::from(e)).sum();
    if total <= u128::from(budget) {
        return excess.to_vec();
    }
    let mut out = vec![0u64; excess.len()];
    let mut remaining = budget;
    let mut idx: Vec<usize> = (0..excess.len())
        .filter(|&i| weights[i] > 0 && excess[i] > 0)
        .collect();
    // Ascending by excess per unit of weight: the first ones are satisfied first.
    idx.sort_by(|&a, &b| {
        let l = u128::from(excess[a]) * u128::from(weights[b]);
        let r = u128::from(excess[b]) * u128::from(weights[a]);
        l.cmp(&r).then(a.cmp(&b))
    });
    let mut wsum: u128 = idx.iter().map(|&i| u128::from(weights[i])).sum();
    let mut k = 0;
    while k < idx.len() {
        let i = idx[k];
        let fits = u128::from(excess[i]) * wsum <= u128::from(remaining) * u128::from(weights[i]);
        if !fits {
            break;
        }
        out[i] = excess[i];
        remaining -= excess[i];
        wsum -= u128::from(weights[i]);
        k += 1;
    }
    if k < idx.len() {
        let level = u128::from(remaining);
        for &i in &idx[k..] {
            // Cannot exceed `remaining`: weights[i] <= wsum.
            out[i] = (level * u128::from(weights[i]) / wsum) as u64;
        }
        return out;
    }
    let zero: Vec<usize> = (0..excess.len())
        .filter(|&i| weights[i] == 0 && excess[i] > 0)
        .collect();
    let ex: Vec<u64> = zero.iter().map(|&i| excess[i]).collect();
    let ones = vec![1u32; zero.len()];
    for (k, share) in water_fill(&ex, &ones, remaining).into_iter().enumerate() {
        out[zero[k]] = share;
    }
    out
}

/// demand × (1 + buffer / 100), saturating.
fn with_buffer(demand: u64, buffer_percent: u32) -> u64 {
    let v = u128::from(demand) * (100 + u128::from(buffer_percent)) / 100;
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Rounds `t` down to what the devices can do: 2 MiB within startup, whole virtio-mem blocks
/// above it.
fn align_down(t: u64, startup: u64, block: u64) -> u64 {
    if t <= startup {
        t - t % ALIGN
    } else {
        startup + (t - startup) / block * block
    }
}

/// Rounds `t` up like [`align_down`] rounds down (saturating).
fn align_up(t: u64, startup: u64, block: u64) -> u64 {
    let up = t.div_ceil(ALIGN).saturating_mul(ALIGN);
    if up <= startup {
        up
    } else {
        let above = (t.max(startup) - startup)
            .div_ceil(block)
            .saturating_mul(block);
        startup.saturating_add(above)
    }
}

/// demand / assigned in percent, saturating.
fn pressure(demand: u64, assigned: u64) -> u32 {
    if assigned == 0 {
        return if demand == 0 { 0 } else { u32::MAX };
    }
    u32::try_from(u128::from(demand) * 100 / u128::from(assigned)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default reserve scales with the host within [1 GiB, 8 GiB].
    #[test]
    fn default_reserve() {
        use crate::GIB;
        assert_eq!(HostMemory::default_reserve(4 * GIB), GIB);
        assert_eq!(HostMemory::default_reserve(24 * GIB), 2456 * MIB);
        assert_eq!(HostMemory::default_reserve(256 * GIB), 8 * GIB);
        assert_eq!(HostMemory::default_reserve(512 * MIB), 512 * MIB);
    }

    /// Water-filling: proportional to weight, capped claims leave their rest to the others,
    /// zero weights only get leftovers, and the sum never exceeds the budget.
    #[test]
    fn water_fill_rules() {
        assert_eq!(water_fill(&[10, 10], &[1, 1], 100), vec![10, 10]);
        assert_eq!(water_fill(&[100, 100], &[3, 1], 40), vec![30, 10]);
        assert_eq!(water_fill(&[5, 100, 100], &[1, 1, 2], 65), vec![5, 20, 40]);
        assert_eq!(water_fill(&[100, 100], &[1, 0], 50), vec![50, 0]);
        assert_eq!(
            water_fill(&[10, 100, 100], &[1, 0, 0], 60),
            vec![10, 25, 25]
        );
        let r = water_fill(&[u64::MAX, u64::MAX], &[10_000, 1], u64::MAX);
        assert!(r[0].checked_add(r[1]).is_some());
        assert!(r[0] / 10_000 + 1 >= r[1]);
    }

    /// Alignment: 2 MiB within startup, whole blocks above it.
    #[test]
    fn alignment() {
        let (st, blk) = (1024 * MIB, 128 * MIB);
        assert_eq!(align_down(1023 * MIB, st, blk), 1022 * MIB);
        assert_eq!(align_up(1021 * MIB, st, blk), 1022 * MIB);
        assert_eq!(align_down(1100 * MIB, st, blk), 1024 * MIB);
        assert_eq!(align_up(1100 * MIB, st, blk), 1152 * MIB);
        assert_eq!(align_up(u64::MAX, st, blk), u64::MAX);
    }
}
