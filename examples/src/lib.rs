//! Runnable programs showing `eventbus` in use; see the `examples` of this package:
//!
//! - `quickstart`: publishes the life of a few orders and consumes them in order per order.
//!
//! ```text
//! cargo run --example quickstart                 # in-memory backend, no broker needed
//! cargo run -p eventbus-examples --features nats --example quickstart -- nats://127.0.0.1:4222
//! ```
//!
//! The heart of the quickstart, runnable as it stands:
//!
//! ```
//! use eventbus::{BusConfig, Envelope, EventBusExt, SubscribeOptions};
//!
//! # #[tokio::main] async fn main() -> eventbus::Result<()> {
//! let bus = eventbus::connect(&BusConfig::default()).await?;
//! let subscription = bus
//!     .subscribe_with("orders", SubscribeOptions::group("fulfilment"), |event| async move {
//!         println!("consumed {} v{} {}", event.aggregate_id, event.event_version, event.event_type);
//!         Ok(())
//!     })
//!     .await?;
//! for (version, step) in (1..).zip(["OrderPlaced", "PaymentCaptured", "OrderShipped"]) {
//!     let event = Envelope::builder("order-1", step).version(version).payload("{}").build()?;
//!     bus.publish("orders", event).await?.await?;
//! }
//! subscription.close().await;
//! bus.close().await;
//! # Ok(()) }
//! ```
