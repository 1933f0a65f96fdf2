//! Restart pacing (pure): exponential backoff with jitter, and the crash limit that marks a server Failed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How restarts are paced and when the runner gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub cap: Duration,
    /// This many failures within `window` mark the server Failed.
    pub max_failures: usize,
    /// The window failures are counted in.
    pub window: Duration,
    /// A run at least this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_failures: 5,
            window: Duration::from_secs(600),
            healthy_after: Duration::from_secs(300),
        }
    }
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start again after this delay.
    RestartAfter(Duration),
    /// Too many failures in the window: stop trying until the spec changes or an admin restarts it.
    GiveUp {
        /// Failures counted in the window.
        failures: usize,
    },
}

/// Remembers recent failures and the current backoff step.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RestartPolicy,
    attempt: u32,
    failures: VecDeque<Instant>,
}

impl Backoff {
    /// A fresh tracker.
    pub fn new(policy: RestartPolicy) -> Self {
        Self { policy, attempt: 0, failures: VecDeque::new() }
    }

    /// Records an exit at `now` after a run of `ran_for`. `failure` is whether it counts as one;
    /// `jitter` in [0, 1) spreads restarts of many servers apart (up to +25%).
    pub fn on_exit(&mut self, now: Instant, ran_for: Duration, failure: bool, jitter: f64) -> Verdict {
        if ran_for >= self.policy.healthy_after {
            self.attempt = 0;
        }
        if failure {
            self.failures.push_back(now);
            while self.failures.front().is_some_and(|t| now.duration_since(*t) > self.policy.window) {
                self.failures.pop_front();
            }
            if self.failures.len() >= self.policy.max_failures {
                return Verdict::GiveUp { failures: self.failures.len() };
            }
        }
        let exp = self.policy.base.saturating_mul(2u32.saturating_pow(self.attempt.min(20)));
        let delay = exp.min(self.policy.cap);
        self.attempt = self.attempt.saturating_add(1);
        let jittered = delay.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0));
        Verdict::RestartAfter(jittered.min(self.policy.cap.mul_f64(1.25)))
    }

    /// Forgets history (after a spec change or an admin's restart).
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.failures.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_one_second_up_to_the_cap() {
        let policy = RestartPolicy { max_failures: 100, ..RestartPolicy::default() };
        let mut b = Backoff::new(policy);
        let start = Instant::now();
        let delays: Vec<u64> = (0..12)
            .map(|i| match b.on_exit(start + Duration::from_secs(i), Duration::from_secs(1), true, 0.0) {
                Verdict::RestartAfter(d) => d.as_secs(),
                Verdict::GiveUp { .. } => u64::MAX,
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        let mut b = Backoff::new(RestartPolicy::default());
        let Verdict::RestartAfter(d) = b.on_exit(Instant::now(), Duration::ZERO, true, 0.999) else {
            unreachable!("first failure restarts")
        };
        assert!(d > Duration::from_millis(1200) && d <= Duration::from_millis(1250), "{d:?}");
    }

    #[test]
    fn n_failures_in_the_window_give_up_but_old_ones_expire() {
        let policy = RestartPolicy { max_failures: 3, window: Duration::from_secs(60), ..RestartPolicy::default() };
        let mut b = Backoff::new(policy);
        let t0 = Instant::now();
        assert!(matches!(b.on_exit(t0, Duration::ZERO, true, 0.0), Verdict::RestartAfter(_)));
        assert!(matches!(
            b.on_exit(t0 + Duration::from_secs(100), Duration::ZERO, true, 0.0),
            Verdict::RestartAfter(_)
        ));
        assert!(matches!(
            b.on_exit(t0 + Duration::from_secs(110), Duration::ZERO, true, 0.0),
            Verdict::RestartAfter(_)
        ));
        assert_eq!(
            b.on_exit(t0 + Duration::from_secs(120), Duration::ZERO, true, 0.0),
            Verdict::GiveUp { failures: 3 }
        );
    }

    #[test]
    fn a_long_healthy_run_resets_the_delay_and_clean_exits_do_not_count() {
        let mut b = Backoff::new(RestartPolicy::default());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.on_exit(t0, Duration::ZERO, true, 0.0);
        }
        assert_eq!(b.on_exit(t0, Duration::from_secs(600), false, 0.0), Verdict::RestartAfter(Duration::from_secs(1)));
        for i in 0..10 {
            assert!(matches!(
                b.on_exit(t0 + Duration::from_secs(i), Duration::ZERO, false, 0.0),
                Verdict::RestartAfter(_)
            ));
        }
    }
}
