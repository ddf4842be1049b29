//! QoS mechanisms: a token bucket for maximum bandwidth and a deficit-round-robin scheduler
//! for weighted fair sharing of a congested output.

use std::collections::VecDeque;

/// A token bucket in bytes; time is passed in (nanoseconds, monotonic).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_bytes_per_s: u64,
    burst: u64,
    tokens: u64,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket refilling at `rate_bps` bits per second up to `burst_bytes`.
    pub fn new(rate_bps: u64, burst_bytes: u64, now_ns: u64) -> Self {
        TokenBucket {
            rate_bytes_per_s: (rate_bps / 8).max(1),
            burst: burst_bytes.max(1),
            tokens: burst_bytes.max(1),
            last_ns: now_ns,
        }
    }

    /// The default burst for a rate: 100 ms worth, at least 64 KiB.
    pub fn default_burst(rate_bps: u64) -> u64 {
        (rate_bps / 8 / 10).max(64 * 1024)
    }

    fn refill(&mut self, now_ns: u64) {
        let dt = now_ns.saturating_sub(self.last_ns);
        if dt == 0 {
            return;
        }
        let add = (u128::from(dt) * u128::from(self.rate_bytes_per_s) / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.burst);
            // advance by the time the added tokens represent, so remainders are not lost
            let used = (u128::from(add) * 1_000_000_000 / u128::from(self.rate_bytes_per_s)) as u64;
            self.last_ns = if self.tokens == self.burst {
                now_ns
            } else {
                self.last_ns + used
            };
        }
    }

    /// Takes `len` bytes of tokens if available.
    pub fn admit(&mut self, len: usize, now_ns: u64) -> bool {
        self.refill(now_ns);
        let len = len as u64;
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else if len > self.burst && self.tokens == self.burst {
            // a frame larger than the bucket (a TCP super-frame) passes on a full bucket
            self.tokens = 0;
            true
        } else {
            false
        }
    }
}

/// Deficit round robin over flows (e.g. source ports) with weights: under backlog each flow
/// gets a share of the output proportional to its weight, and no flow starves.
#[derive(Debug)]
pub struct Drr<T> {
    flows: Vec<Flow<T>>,
    active: VecDeque<usize>,
    quantum: usize,
    queued: usize,
    limit: usize,
}

#[derive(Debug)]
struct Flow<T> {
    key: u32,
    weight: u32,
    deficit: usize,
    queue: VecDeque<(usize, T)>,
    active: bool,
    in_turn: bool,
}

impl<T> Drr<T> {
    /// A scheduler giving `quantum` bytes per unit of weight per round, holding at most
    /// `limit` items per flow (a per-flow limit, so one busy flow cannot take the whole
    /// buffer and starve the others).
    pub fn new(quantum: usize, limit: usize) -> Self {
        Drr {
            flows: Vec::new(),
            active: VecDeque::new(),
            quantum,
            queued: 0,
            limit,
        }
    }

    /// Sets a flow's weight (1..); unknown flows get weight 1 when first used.
    pub fn set_weight(&mut self, key: u32, weight: u32) {
        let i = self.flow(key);
        self.flows[i].weight = weight.max(1);
    }

    fn flow(&mut self, key: u32) -> usize {
        if let Some(i) = self.flows.iter().position(|f| f.key == key) {
            return i;
        }
        self.flows.push(Flow {
            key,
            weight: 1,
            deficit: 0,
            queue: VecDeque::new(),
            active: false,
            in_turn: false,
        });
        self.flows.len() - 1
    }

    /// Queues an item of `len` bytes for flow `key`; gives it back when the scheduler is full.
    pub fn push(&mut self, key: u32, len: usize, item: T) -> Result<(), T> {
        let i = self.flow(key);
        let f = &mut self.flows[i];
        if f.queue.len() >= self.limit {
            return Err(item);
        }
        f.queue.push_back((len, item));
        self.queued += 1;
        if !f.active {
            f.active = true;
            f.deficit = 0;
            self.active.push_back(i);
        }
        Ok(())
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// The next item to send, by DRR order.
    pub fn pop(&mut self) -> Option<T> {
        loop {
            let &i = self.active.front()?;
            let quantum = self.quantum * self.flows[i].weight as usize;
            let f = &mut self.flows[i];
            if !f.in_turn {
                f.deficit += quantum;
                f.in_turn = true;
            }
            match f.queue.front() {
                Some(&(len, _)) if len <= f.deficit => {
                    f.deficit -= len;
                    let (_, item) = f.queue.pop_front()?;
                    self.queued -= 1;
                    if f.queue.is_empty() {
                        f.active = false;
                        f.in_turn = false;
                        f.deficit = 0;
                        self.active.pop_front();
                    }
                    return Some(item);
                }
                Some(_) => {
                    // turn over: keep the deficit, go to the back of the round
                    f.in_turn = false;
                    let i = self.active.pop_front()?;
                    self.active.push_back(i);
                }
                None => {
                    f.active = false;
                    f.in_turn = false;
                    self.active.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Over 10 simulated seconds the bucket passes rate × time plus the burst, no more.
    #[test]
    fn bucket_rate() {
        let rate = 8_000_000; // 1 MB/s
        let mut b = TokenBucket::new(rate, 10_000, 0);
        let mut passed = 0u64;
        let mut t = 0;
        while t < 10 * S {
            if b.admit(1000, t) {
                passed += 1000;
            }
            t += 100_000; // 10 µs
        }
        assert!(passed <= 10_000_000 + 10_000, "{passed}");
        assert!(passed >= 9_900_000, "{passed}");
    }

    /// Two backlogged flows with weights 1 and 3 share the output 1:3.
    #[test]
    fn drr_weights() {
        let mut d = Drr::new(1500, 100_000);
        d.set_weight(1, 1);
        d.set_weight(2, 3);
        for _ in 0..4000 {
            d.push(1, 1000, 1u32).unwrap();
            d.push(2, 1000, 2u32).unwrap();
        }
        let mut n = [0usize; 3];
        for _ in 0..4000 {
            n[d.pop().unwrap() as usize] += 1;
        }
        let ratio = n[2] as f64 / n[1] as f64;
        assert!((2.8..3.2).contains(&ratio), "{n:?}");
        // drains fully
        let mut rest = 0;
        while d.pop().is_some() {
            rest += 1;
        }
        assert_eq!(rest, 4000);
        assert!(d.is_empty());
    }

    /// The scheduler refuses items past a flow's limit, but still takes other flows'.
    #[test]
    fn drr_limit() {
        let mut d = Drr::new(1500, 2);
        assert!(d.push(1, 10, ()).is_ok());
        assert!(d.push(1, 10, ()).is_ok());
        assert!(d.push(1, 10, ()).is_err());
        assert!(d.push(2, 10, ()).is_ok());
        assert_eq!(d.len(), 3);
    }
}
