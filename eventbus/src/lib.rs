//! `eventbus`: one async event-bus API over real brokers, with the guarantees event-driven services need —
//! per-aggregate order with parallelism across aggregates, at-least-once delivery with retries and a
//! dead-letter topic, bounded memory and tasks, deadlines on every wait, and a `close()` that leaves nothing
//! running.
//!
//! [`connect`] builds the backend the configuration's URL names. `memory://` (the in-process backend) is
//! always available.
//!
//! ```
//! use eventbus::{BusConfig, Envelope, EventBusExt, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> eventbus::Result<()> {
//! let bus = eventbus::connect(&BusConfig::from_url("memory://")).await?;
//! let subscription = bus
//!     .subscribe_with("orders", SubscribeOptions::group("shipping"), |event| async move {
//!         println!("{} {} v{}", event.aggregate_id, event.event_type, event.event_version);
//!         Ok(())
//!     })
//!     .await?;
//! let event = Envelope::builder("order-1", "OrderPlaced").payload(r#"{"items":3}"#).build()?;
//! bus.publish("orders", event).await?.await?;
//! subscription.close().await;
//! bus.close().await;
//! # Ok(()) }
//! ```

use std::sync::Arc;

pub use eventbus_core::*;

/// The README's code samples, compiled and run as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// A bus of any backend, as [`connect`] returns it.
pub type Bus = Arc<dyn EventBus>;

/// Connects to the backend named by `config.url`: `memory://` runs in process.
///
/// Fails with [`Error::UnsupportedBackend`] for a scheme this build does not include, and with
/// [`Error::Config`] for an invalid configuration.
pub async fn connect(config: &BusConfig) -> Result<Bus> {
    config.validate()?;
    match config.scheme() {
        "memory" => Ok(Arc::new(MemoryBus::new(config.clone())?)),
        scheme => Err(Error::UnsupportedBackend {
            scheme: scheme.to_owned(),
            reason: "this build includes only the memory backend; the broker backends come with the \
                     `nats` and `kafka` features"
                .to_owned(),
        }),
    }
}
