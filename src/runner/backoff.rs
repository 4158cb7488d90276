//! Reconnect backoff: exponential from a base (1 s by default) doubling to a cap (30 s), with
//! up to +25 % random jitter, the schedule the TypeScript runner uses. Deterministic for a
//! given seed so that tests can check the exact schedule. It computes delays only; it never
//! sleeps.

use std::time::Duration;

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Backoff state for one runner: the attempt counter and the jitter source.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    /// A backoff starting at `base`, doubling up to `max` (before jitter), with a seeded rng.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The number of delays handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Forgets past failures (called when a connection opens).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The delay before the next connection attempt; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.attempt.min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter: f64 = self.rng.random::<f64>() * 0.25;
        raw + raw.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), 7);
        let expected_raw = [1u64, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30, 30];
        for raw in expected_raw {
            let d = b.next_delay();
            let raw = Duration::from_secs(raw);
            assert!(d >= raw, "{d:?} < {raw:?}");
            assert!(d <= raw + raw / 4, "{d:?} > 1.25 * {raw:?}");
        }
        assert_eq!(b.attempt(), 12);
    }

    #[test]
    fn same_seed_same_schedule_and_reset_restarts() {
        let mut a = Backoff::new(Duration::from_millis(50), Duration::from_secs(30), 42);
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(30), 42);
        let sa: Vec<_> = (0..8).map(|_| a.next_delay()).collect();
        let sb: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(sa, sb);
        a.reset();
        let d = a.next_delay();
        assert!(d >= Duration::from_millis(50) && d <= Duration::from_micros(62_500));
        // A different seed gives a different jitter somewhere in the schedule.
        let mut c = Backoff::new(Duration::from_millis(50), Duration::from_secs(30), 43);
        let sc: Vec<_> = (0..8).map(|_| c.next_delay()).collect();
        assert_ne!(sa, sc);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), 1);
        for _ in 0..100 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(37_500));
        }
    }
}
