//! The core of `eventbus`: the [`Envelope`] and its wire mapping, [`BusConfig`], the [`EventBus`] trait, the
//! keyed [`Dispatcher`](dispatch::Dispatcher), the bounded [`PublishWindow`](inflight::PublishWindow) and the
//! in-memory backend [`MemoryBus`]. It depends on no broker client; the backend crates build on it.
//!
//! Most applications depend on the `eventbus` facade instead, which re-exports this crate and adds the
//! broker backends behind features.
//!
//! ```
//! use eventbus_core::{BusConfig, Envelope, EventBus, EventBusExt, MemoryBus, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
//! let bus = MemoryBus::new(BusConfig::default())?;
//! let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
//! let subscription = bus
//!     .subscribe_with("accounts", SubscribeOptions::group("ledger"), move |event| {
//!         let seen_tx = seen_tx.clone();
//!         async move {
//!             seen_tx.send(event.event_version)?;
//!             Ok(())
//!         }
//!     })
//!     .await?;
//! for version in 1..=3 {
//!     let event = Envelope::builder("account-1", "Deposited").version(version).payload("10").build()?;
//!     bus.publish("accounts", event).await?.await?;
//! }
//! for expected in 1..=3 {
//!     assert_eq!(seen.recv().await, Some(expected));
//! }
//! subscription.close().await;
//! let report = bus.close().await;
//! assert!(report.unacked.is_empty());
//! # Ok(()) }
//! ```

pub mod bus;
pub mod config;
pub mod deadline;
pub mod dispatch;
pub mod envelope;
pub mod error;
pub mod inflight;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod subscription;

pub use bus::{
    CloseReport, ConnectionState, EventBus, EventBusExt, Handler, HandlerError, Health, Metrics, PublishAck,
    PublishReceipt, PublishResult, PublishResults, SubscribeOptions,
};
pub use config::{BusConfig, DeadLetterConfig, MemoryConfig, PublishConfig, RetryPolicy, SubscribeConfig};
pub use envelope::wire::{self, DecodeError, WireMessage};
pub use envelope::{validate_group, validate_topic, Envelope, EnvelopeBuilder, EventId, ValidationError};
pub use error::{Error, Result};
pub use memory::MemoryBus;
pub use subscription::{Subscription, SubscriptionReport};
