//! A circuit breaker: after enough consecutive failures a dependency is skipped outright,
//! until a probe (not a request) sees it answer again.
//!
//! States: closed (calls go through) → open after `threshold` consecutive failures
//! (calls are skipped; only the prober calls) → closed by the prober's next success, the
//! half-open probe. A call's success never closes it: calls still in flight when it
//! opened answer from whichever part of the dependency still works (another shard of a
//! cluster whose one shard is failing over, a node that answers the keys of its own slots
//! only), which says nothing of the whole. Each transition is reported exactly once, to
//! the one caller that made it, so the caller can log it once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// What a recorded outcome did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// This failure opened it.
    Opened,
    /// This success closed it.
    Closed,
}

/// Consecutive-failure breaker, lock-free and shared by every request.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    failures: AtomicU32,
    open: AtomicBool,
}

impl CircuitBreaker {
    /// A closed breaker that opens after `threshold` (≥ 1) consecutive failures.
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            failures: AtomicU32::new(0),
            open: AtomicBool::new(false),
        }
    }

    /// Whether calls should go to the dependency.
    pub fn is_available(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
    }

    /// A call succeeded: the failures so far were not consecutive. An open breaker stays
    /// open (see the module's opening).
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The prober's check of the whole dependency succeeded: closes the breaker.
    pub fn record_probe_success(&self) -> Transition {
        self.failures.store(0, Ordering::Relaxed);
        if self.open.swap(false, Ordering::Relaxed) {
            Transition::Closed
        } else {
            Transition::None
        }
    }

    /// A health check's definitive verdict that the dependency cannot serve (not a
    /// timeout, which may be a blip): open at once, whatever the count.
    pub fn open_now(&self) -> Transition {
        self.failures.store(self.threshold, Ordering::Relaxed);
        if self.open.swap(true, Ordering::Relaxed) {
            Transition::None
        } else {
            Transition::Opened
        }
    }

    /// A call (or probe) failed.
    pub fn record_failure(&self) -> Transition {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= self.threshold && !self.open.swap(true, Ordering::Relaxed) {
            Transition::Opened
        } else {
            Transition::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_then_open_after_the_threshold_then_closed_by_a_success() {
        let breaker = CircuitBreaker::new(3);
        assert!(breaker.is_available(), "starts closed");
        assert_eq!(breaker.record_failure(), Transition::None);
        assert_eq!(breaker.record_failure(), Transition::None);
        assert!(breaker.is_available(), "two failures are not an outage");
        assert_eq!(
            breaker.record_failure(),
            Transition::Opened,
            "the third opens it"
        );
        assert!(!breaker.is_available());
        assert_eq!(
            breaker.record_failure(),
            Transition::None,
            "opened once, reported once"
        );
        assert_eq!(
            breaker.record_probe_success(),
            Transition::Closed,
            "the probe's success"
        );
        assert!(breaker.is_available());
        assert_eq!(breaker.record_probe_success(), Transition::None);
    }

    #[test]
    fn a_call_succeeding_while_open_does_not_close_it() {
        let breaker = CircuitBreaker::new(3);
        for _ in 0..3 {
            breaker.record_failure();
        }
        assert!(!breaker.is_available());
        breaker.record_success();
        assert!(
            !breaker.is_available(),
            "a call in flight when it opened answered: only the probe may close it"
        );
        assert_eq!(breaker.open_now(), Transition::None, "still open");
        assert_eq!(breaker.record_probe_success(), Transition::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = CircuitBreaker::new(3);
        breaker.record_failure();
        breaker.record_failure();
        breaker.record_success();
        breaker.record_failure();
        breaker.record_failure();
        assert!(breaker.is_available(), "failures must be consecutive");
    }

    #[test]
    fn concurrent_failures_report_the_opening_once() {
        let breaker = std::sync::Arc::new(CircuitBreaker::new(3));
        let opened: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let breaker = breaker.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter(|_| breaker.record_failure() == Transition::Opened)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(opened, 1);
    }

    #[test]
    fn a_definitive_verdict_opens_at_once_and_only_a_success_closes() {
        let breaker = CircuitBreaker::new(3);
        assert_eq!(breaker.open_now(), Transition::Opened);
        assert!(!breaker.is_available());
        assert_eq!(breaker.open_now(), Transition::None, "reported once");
        assert_eq!(breaker.record_failure(), Transition::None);
        breaker.record_success();
        assert!(!breaker.is_available(), "a call's answer is no verdict");
        assert_eq!(breaker.record_probe_success(), Transition::Closed);
        assert!(breaker.is_available());
    }
}
