//! The suites. Each is named after what users ask of an event bus; see `docs/guarantees.md` for which suite
//! proves which guarantee.

pub mod bad_input;
pub mod delivery;
pub mod leak;
pub mod ordering;
pub mod restart;
pub mod retry;
pub mod timeout;

use std::time::Duration;

use eventbus::{BusConfig, RetryPolicy};

/// How long a scenario waits for deliveries it expects before it counts the rest as lost.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// A retry policy with short waits, so suites that inject failures stay quick.
pub(crate) fn quick_retry(max_attempts: u32) -> RetryPolicy {
    let mut retry = BusConfig::default().retry;
    retry.max_attempts = max_attempts;
    retry.initial_backoff = Duration::from_millis(5);
    retry.max_backoff = Duration::from_millis(50);
    retry
}
