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

/// The NATS JetStream backend (feature `nats`).
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;

/// The Kafka backend (feature `kafka`).
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;

/// Connects to the backend named by `config.url`: `memory://` runs in process; `nats://host:port` connects to
/// NATS JetStream (feature `nats`); `kafka://host:port[,host:port]` connects to Kafka (feature `kafka`).
///
/// Fails with [`Error::UnsupportedBackend`] for a scheme this build does not include, and with
/// [`Error::Config`] for an invalid configuration.
pub async fn connect(config: &BusConfig) -> Result<Bus> {
    config.validate()?;
    match config.scheme() {
        "memory" => Ok(Arc::new(MemoryBus::new(config.clone())?)),
        #[cfg(feature = "nats")]
        "nats" => Ok(Arc::new(eventbus_nats::NatsBus::connect(config.clone()).await?)),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(eventbus_kafka::KafkaBus::connect(config.clone()).await?)),
        scheme => Err(Error::UnsupportedBackend { scheme: scheme.to_owned(), reason: missing_feature(scheme) }),
    }
}

fn missing_feature(scheme: &str) -> String {
    match scheme {
        "nats" | "kafka" => format!("this build does not include it; enable the `{scheme}` feature of eventbus"),
        _ => "no backend has this scheme; use memory://, nats://host:port or kafka://host:port".to_owned(),
    }
}
