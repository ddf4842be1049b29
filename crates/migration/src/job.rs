//! The migration job on the source: its phases and the recovery policy.
//!
//! ```text
//!  Negotiating ──> Preparing ──> [CopyingDisks] ──> Memory ──> Switchover ──> Completed
//!       │              │               │              │            │
//!       └──────────────┴───────────────┴──────────────┴────────────┴──> Failed | Cancelled
//! ```
//!
//! Whatever fails, the VM must end up running on exactly one host. [`recovery`] says what
//! the source undoes, in order, from what it has done so far ([`Done`]).

use api::migration::MigrationPhase;
use serde::{Deserialize, Serialize};

/// Events of a migration job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The destination is compatible.
    Compatible,
    /// The destination waits for the state.
    Prepared {
        /// Disks are copied first.
        copy_disks: bool,
    },
    /// Disk copy converged (mirror in sync).
    DisksInSync,
    /// QEMU paused the VM before switchover.
    PreSwitchover,
    /// The destination runs the VM.
    Committed,
    /// Something failed.
    Failed,
    /// The user cancelled.
    Cancelled,
}

/// The phase after `ev` in `phase`; final phases never change, a cancel after the commit
/// is too late and ignored.
pub fn next(phase: MigrationPhase, ev: &Event) -> MigrationPhase {
    use MigrationPhase as P;
    if phase.is_final() {
        return phase;
    }
    match (phase, ev) {
        (_, Event::Failed) => P::Failed,
        (_, Event::Cancelled) => P::Cancelled,
        (P::Negotiating, Event::Compatible) => P::Preparing,
        (P::Preparing, Event::Prepared { copy_disks: true }) => P::CopyingDisks,
        (P::Preparing, Event::Prepared { copy_disks: false }) => P::Memory,
        (P::CopyingDisks, Event::DisksInSync) => P::Memory,
        (P::Memory, Event::PreSwitchover) => P::Switchover,
        (P::Switchover, Event::Committed) => P::Completed,
        (p, _) => p,
    }
}

/// What the source has done so far (persisted with the job, so a restarted vireod can
/// undo it too).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The destination prepared an incoming VM.
    pub prepared: bool,
    /// QEMU's outgoing migration was started.
    pub migrating: bool,
    /// Disk mirrors to the destination were started (shared-nothing).
    #[serde(default)]
    pub mirroring: bool,
    /// Every disk mirror completed: the destination holds verified copies.
    #[serde(default)]
    pub mirrored: bool,
    /// The source worker closed its disk images (shared storage handover).
    pub disks_released: bool,
    /// The destination was asked to open the disks.
    pub activate_sent: bool,
    /// The commit request was sent (the destination may run the VM).
    pub commit_sent: bool,
    /// The destination confirmed it runs the VM.
    pub committed: bool,
}

/// One undo step, in the order they must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Ask the destination to abort; if it cannot be reached, wait until its lease expired
    /// (it then aborts by itself) before touching shared disks again.
    AbortDestination {
        /// The destination may hold the shared disks open: confirmation or lease expiry is
        /// required before [`Recovery::ReopenSourceDisks`].
        must_confirm: bool,
    },
    /// Stop the disk mirrors (shared-nothing); the source chains are untouched.
    CancelDiskMirrors,
    /// Serve the disks again on the source (a new worker re-attaches to QEMU).
    ReopenSourceDisks,
    /// Cancel QEMU's outgoing migration; QEMU resumes the VM if it was running.
    CancelQemuMigration,
    /// Make sure the source VM runs.
    ResumeSource,
    /// Nothing can be undone: the destination runs the VM; the source copy is stopped.
    FinishOnDestination,
    /// The commit may or may not have arrived: ask the destination until it answers.
    AskDestination,
}

/// Undo plan after a failure or cancel, given what was done.
pub fn recovery(done: &Done) -> Vec<Recovery> {
    use Recovery::*;
    if done.committed {
        return vec![FinishOnDestination];
    }
    if done.commit_sent {
        return vec![AskDestination];
    }
    let mut plan = Vec::new();
    if done.prepared {
        plan.push(AbortDestination {
            must_confirm: done.activate_sent,
        });
    }
    if done.mirroring && !done.disks_released {
        plan.push(CancelDiskMirrors);
    }
    if done.disks_released {
        plan.push(ReopenSourceDisks);
    }
    if done.migrating {
        plan.push(CancelQemuMigration);
    }
    plan.push(ResumeSource);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use MigrationPhase as P;

    /// The happy path reaches Completed.
    #[test]
    fn happy_path() {
        let mut p = P::Negotiating;
        for ev in [
            Event::Compatible,
            Event::Prepared { copy_disks: true },
            Event::DisksInSync,
            Event::PreSwitchover,
            Event::Committed,
        ] {
            p = next(p, &ev);
        }
        assert_eq!(p, P::Completed);
    }

    /// Disks are reopened only after the destination let go of them, and QEMU's migration
    /// is cancelled (resuming the guest) only once the disks are served again.
    #[test]
    fn recovery_order() {
        let done = Done {
            prepared: true,
            migrating: true,
            disks_released: true,
            activate_sent: true,
            ..Done::default()
        };
        assert_eq!(
            recovery(&done),
            vec![
                Recovery::AbortDestination { must_confirm: true },
                Recovery::ReopenSourceDisks,
                Recovery::CancelQemuMigration,
                Recovery::ResumeSource
            ]
        );
        assert_eq!(recovery(&Done::default()), vec![Recovery::ResumeSource]);
        let copying = Done {
            prepared: true,
            mirroring: true,
            ..Done::default()
        };
        assert_eq!(
            recovery(&copying),
            vec![
                Recovery::AbortDestination {
                    must_confirm: false
                },
                Recovery::CancelDiskMirrors,
                Recovery::ResumeSource
            ]
        );
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Compatible),
            any::<bool>().prop_map(|c| Event::Prepared { copy_disks: c }),
            Just(Event::DisksInSync),
            Just(Event::PreSwitchover),
            Just(Event::Committed),
            Just(Event::Failed),
            Just(Event::Cancelled),
        ]
    }

    proptest! {
        /// Over any event sequence: final phases stick, and Completed is reached only
        /// through Switchover + Committed.
        #[test]
        fn phases_are_monotonic(evs in proptest::collection::vec(event(), 0..20)) {
            let mut p = P::Negotiating;
            for ev in &evs {
                let n = next(p, ev);
                if p.is_final() { prop_assert_eq!(n, p); }
                if n == P::Completed && p != P::Completed {
                    prop_assert_eq!(p, P::Switchover);
                    prop_assert_eq!(ev, &Event::Committed);
                }
                p = n;
            }
        }

        /// Every plan ends with the VM running somewhere: the source resumes unless the
        /// destination has (or may have) it.
        #[test]
        fn plan_always_ends_running(a in any::<bool>(), b in any::<bool>(), c in any::<bool>(),
                                    d in any::<bool>(), e in any::<bool>(), f in any::<bool>()) {
            let done = Done { prepared: a, migrating: b, disks_released: c,
                              activate_sent: d, commit_sent: e, committed: f, mirroring: a && b, mirrored: a && c };
            let plan = recovery(&done);
            let last = *plan.last().unwrap();
            let ends_running = matches!(
                last,
                Recovery::ResumeSource | Recovery::FinishOnDestination | Recovery::AskDestination
            );
            prop_assert!(ends_running);
            if let Some(i) = plan.iter().position(|r| *r == Recovery::ReopenSourceDisks) {
                let only_aborts = plan[..i]
                    .iter()
                    .all(|r| matches!(r, Recovery::AbortDestination { .. } | Recovery::CancelDiskMirrors));
                prop_assert!(only_aborts);
            }
        }
    }
}
