//! Heartbeat policy: ping outcomes over time in, `ok | lost | no-contact` out.
//!
//! Pure: the caller passes the clock. The worker pings the agent every few seconds and
//! feeds each outcome to [`Heartbeat::observe`]; [`Heartbeat::state`] can be read at any
//! time.
//!
//! ```text
//!            answer                     no answer for `lost_after`
//! NoContact ─────────▶ Ok ◀──────────▶ Lost
//!     ▲                      answer        │
//!     └──────────── reset (VM restarted) ──┘
//! ```
//!
//! * `no-contact`: no ping has been answered since the heartbeat started (or was reset):
//!   the guest has no agent, or it has not started yet.
//! * `ok`: the last answer is younger than `lost_after`.
//! * `lost`: the agent answered before, but not for `lost_after` (guest hung, agent died,
//!   or the guest is rebooting).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Heartbeat as reported to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeartbeatState {
    /// The agent has never answered.
    NoContact,
    /// The agent answered recently.
    Ok,
    /// The agent answered before but has stopped.
    Lost,
}

impl HeartbeatState {
    /// The wire / display name: `ok`, `lost`, `no-contact`.
    pub fn as_str(self) -> &'static str {
        match self {
            HeartbeatState::NoContact => "no-contact",
            HeartbeatState::Ok => "ok",
            HeartbeatState::Lost => "lost",
        }
    }
}

impl std::fmt::Display for HeartbeatState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Default time without an answer after which an agent is `lost`.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(10);

/// Heartbeat tracker for one VM.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    lost_after: Duration,
    last_answer: Option<Instant>,
    reported: HeartbeatState,
}

impl Heartbeat {
    /// A tracker in `no-contact` that declares `lost` after `lost_after` of silence.
    pub fn new(lost_after: Duration) -> Self {
        Heartbeat {
            lost_after,
            last_answer: None,
            reported: HeartbeatState::NoContact,
        }
    }

    /// Back to `no-contact` (the VM was restarted).
    pub fn reset(&mut self) {
        self.last_answer = None;
        self.reported = HeartbeatState::NoContact;
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> HeartbeatState {
        match self.last_answer {
            None => HeartbeatState::NoContact,
            Some(t) if now.saturating_duration_since(t) < self.lost_after => HeartbeatState::Ok,
            Some(_) => HeartbeatState::Lost,
        }
    }

    /// Time of the last answered ping.
    pub fn last_answer(&self) -> Option<Instant> {
        self.last_answer
    }

    /// Records a ping outcome at `now` (`answered` = the agent replied) and returns
    /// `Some((old, new))` when the state differs from the one last returned, so the caller
    /// can log or publish the change once.
    pub fn observe(
        &mut self,
        now: Instant,
        answered: bool,
    ) -> Option<(HeartbeatState, HeartbeatState)> {
        if answered {
            // Outcomes may arrive out of order; never move the last answer backwards.
            match self.last_answer {
                Some(t) if t >= now => {}
                _ => self.last_answer = Some(now),
            }
        }
        self.poll(now)
    }

    /// Re-evaluates at `now` without a new outcome; returns a change as [`observe`] does.
    ///
    /// [`observe`]: Heartbeat::observe
    pub fn poll(&mut self, now: Instant) -> Option<(HeartbeatState, HeartbeatState)> {
        let new = self.state(now);
        let old = std::mem::replace(&mut self.reported, new);
        (old != new).then_some((old, new))
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat::new(DEFAULT_LOST_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HeartbeatState::*;

    /// A guest that never answers stays `no-contact` forever; failed pings change nothing.
    #[test]
    fn never_answered() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(Duration::from_secs(10));
        for s in 0..100 {
            assert_eq!(hb.observe(t0 + Duration::from_secs(s), false), None);
        }
        assert_eq!(hb.state(t0 + Duration::from_secs(1000)), NoContact);
    }

    /// ok -> lost after exactly `lost_after` of silence -> ok on the next answer.
    #[test]
    fn ok_lost_ok() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut hb = Heartbeat::new(Duration::from_secs(10));
        assert_eq!(hb.observe(s(3), true), Some((NoContact, Ok)));
        assert_eq!(hb.observe(s(5), false), None);
        assert_eq!(hb.observe(s(12), false), None);
        assert_eq!(hb.state(s(12)), Ok);
        assert_eq!(hb.observe(s(13), false), Some((Ok, Lost)));
        assert_eq!(hb.poll(s(20)), None);
        assert_eq!(hb.observe(s(21), true), Some((Lost, Ok)));
        assert_eq!(hb.last_answer(), Some(s(21)));
        // A late outcome from the past does not move the clock back.
        assert_eq!(hb.observe(s(15), true), None);
        assert_eq!(hb.last_answer(), Some(s(21)));
        hb.reset();
        assert_eq!(hb.state(s(22)), NoContact);
        assert_eq!(hb.poll(s(22)), None);
    }

    /// States serialize with their documented names.
    #[test]
    fn names() {
        assert_eq!(
            serde_json::to_string(&[Ok, Lost, NoContact]).unwrap(),
            r#"["ok","lost","no-contact"]"#
        );
        assert_eq!(NoContact.to_string(), "no-contact");
    }
}
