//! Capped, jittered exponential backoff that never gives up.
//!
//! The delay before retry `n` (1-based) is `min(initial * 2^(n-1), cap)`, scaled by a jitter
//! factor in `[0.5, 1.5)` and capped again, so a fleet of nodes that failed together does not
//! retry together. The state is one counter, so memory stays flat however long a component fails.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
}

impl Backoff {
    /// Defaults tuned for node agents: first retry after about half a second, at most 30 s apart
    /// (tailscaled's cap), like the figures in the field survey.
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_millis(500),
        cap: Duration::from_secs(30),
    };

    /// For failures only an operator can fix: about a minute, then doubling up to 15 minutes.
    pub const OPERATOR: Backoff = Backoff {
        initial: Duration::from_secs(60),
        cap: Duration::from_secs(15 * 60),
    };

    /// A node's retries towards its gateways: full jitter from 250 ms up to 30 s, so a fleet
    /// that lost its gateway together spreads its reconnects over the whole window.
    pub const GATEWAY: Backoff = Backoff {
        initial: Duration::from_millis(250),
        cap: Duration::from_secs(30),
    };

    pub fn new(initial: Duration, cap: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        Self {
            initial,
            cap: cap.max(initial),
        }
    }

    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The un-jittered delay before retry `attempt` (1-based; 0 is treated as 1).
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let nanos = (self.initial.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.cap)
    }

    /// The delay before retry `attempt`, with `jitter` drawn uniformly from all of `u32` by the caller.
    pub fn delay(&self, attempt: u32, jitter: u32) -> Duration {
        let base = self.base_delay(attempt).as_nanos() as u64;
        // factor = 0.5 + jitter / 2^32, in [0.5, 1.5)
        let scaled = (base as u128 * (u64::from(jitter) + (1u64 << 31)) as u128) >> 32;
        Duration::from_nanos(scaled as u64).min(self.cap)
    }
}

impl Backoff {
    /// "Full jitter": uniform in `[0, base_delay(attempt))` for `jitter` uniform over `u32`,
    /// at least 1 ms so a retry loop never spins.
    pub fn full_jitter(&self, attempt: u32, jitter: u32) -> Duration {
        let base = self.base_delay(attempt).as_nanos() as u64;
        let scaled = (u128::from(base) * u128::from(jitter)) >> 32;
        Duration::from_nanos(scaled as u64).max(Duration::from_millis(1))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_retry_is_about_the_initial_delay() {
        let b = Backoff::DEFAULT;
        assert_eq!(b.delay(1, 0), Duration::from_millis(250));
        assert_eq!(b.delay(1, 1 << 31), Duration::from_millis(500));
        assert!(b.delay(1, u32::MAX) < Duration::from_millis(750));
    }

    #[test]
    fn gateway_retries_start_under_250_ms_and_reach_the_whole_30_s_window() {
        let b = Backoff::GATEWAY;
        assert!(b.full_jitter(1, u32::MAX) < Duration::from_millis(250));
        assert!(b.full_jitter(1, u32::MAX) > Duration::from_millis(249));
        assert_eq!(b.full_jitter(1, 0), Duration::from_millis(1));
        assert!(b.full_jitter(20, u32::MAX) > Duration::from_millis(29_999));
        assert_eq!(b.full_jitter(20, 1 << 31), Duration::from_secs(15));
    }

    #[test]
    fn delays_double_until_the_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let bases: Vec<u64> = (1..=6).map(|n| b.base_delay(n).as_secs()).collect();
        assert_eq!(bases, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn a_component_failing_for_a_year_still_retries_within_the_cap() {
        let b = Backoff::DEFAULT;
        let attempts_in_a_year = 365 * 24 * 3600 / 15;
        let d = b.delay(attempts_in_a_year, 12345);
        assert!(d > Duration::ZERO && d <= b.cap());
        assert!(b.delay(u32::MAX, u32::MAX) <= b.cap());
    }

    proptest! {
        #[test]
        fn delay_is_bounded_and_jitter_stays_within_half(
            initial_ms in 1u64..10_000,
            cap_ms in 1u64..600_000,
            attempt in 0u32..=u32::MAX,
            jitter in 0u32..=u32::MAX,
        ) {
            let b = Backoff::new(Duration::from_millis(initial_ms), Duration::from_millis(cap_ms));
            let base = b.base_delay(attempt);
            let d = b.delay(attempt, jitter);
            prop_assert!(d <= b.cap());
            prop_assert!(d >= base / 2);
            prop_assert!(d <= base * 3 / 2);
            prop_assert!(d > Duration::ZERO);
        }

        #[test]
        fn gateway_retries_wait_between_nothing_and_the_doubled_delay_capped_at_thirty_seconds(
            attempt in 0u32..=u32::MAX,
            jitter in 0u32..=u32::MAX,
        ) {
            let b = Backoff::GATEWAY;
            let d = b.full_jitter(attempt, jitter);
            prop_assert!(d >= Duration::from_millis(1));
            prop_assert!(d < b.base_delay(attempt).max(Duration::from_millis(2)));
            prop_assert!(d < Duration::from_secs(30));
        }

        #[test]
        fn base_delay_never_shrinks_as_failures_continue(attempt in 1u32..1000) {
            let b = Backoff::DEFAULT;
            prop_assert!(b.base_delay(attempt + 1) >= b.base_delay(attempt));
        }
    }
}
