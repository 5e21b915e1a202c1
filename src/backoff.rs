//! Exponential backoff with equal jitter, shared by every retry in the crate:
//! the decision core's store calls, effects and side-topic writes, the HTTP
//! sink's attempts, and the partition task's own waits. Half of each step is
//! fixed and half random, so the retries of many records (or many members)
//! do not arrive in step.

use std::time::Duration;

/// The waits between attempts: each step doubles, up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// From `initial`, doubling up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { next: initial, max }
    }

    /// For failures (a store or a topic that errs): from 50 ms to 5 s.
    pub(crate) fn failures() -> Backoff {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// For a claim waiting on another process's batch (one in this process
    /// wakes the waiter when it settles): from 20 ms to 1 s.
    pub(crate) fn claim_waits() -> Backoff {
        Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// The next wait: half the current step, plus a random share of the other half.
    pub(crate) fn wait(&mut self) -> Duration {
        let step = self.next.as_millis() as u64;
        self.next = (self.next * 2).min(self.max);
        Duration::from_millis(step / 2 + rand::random_range(0..=step - step / 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wait_is_between_half_and_all_of_its_doubling_step_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        for step in [100u64, 200, 400, 400, 400] {
            let wait = b.wait().as_millis() as u64;
            assert!((step / 2..=step).contains(&wait), "step {step}: waited {wait} ms");
        }
    }
}
