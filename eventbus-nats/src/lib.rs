//! The NATS JetStream backend of `eventbus`.
//!
//! Each topic is one JetStream stream (`EVENTBUS_<topic>`) over the subjects `eventbus.<topic>.<partition>`;
//! an event's partition is a stable hash of its aggregate id ([`naming::partition_of`]), among
//! `nats.partitions` (16 by default). Messages carry the envelope's metadata as headers and the payload as the
//! raw body, plus `Nats-Msg-Id` = event id, so the stream drops a re-send within its duplicate window.
//!
//! A consumer group is one durable pull consumer per partition, each allowed a single unacknowledged message
//! (`max_ack_pending = 1`). A partition is therefore handled by one member of the group at a time, in stream
//! order, however many members the group has and whichever of them fetches it — which keeps every
//! aggregate's order across members — while the partitions of a topic are handled in parallel. The price is
//! that aggregates sharing a partition wait for each other: raise `nats.partitions` for more parallelism.
//!
//! Publishing goes through one JetStream context whose in-flight limit equals the bus's window; one collector
//! task settles the acks. While a message is handled or retried in place, the bus tells the server it is in
//! progress every third of the consumer's ack wait, so the server never redelivers work that is still going
//! on; messages that are dead-lettered are terminated (`Term`), and messages a closing subscription fetched but
//! did not handle are handed back (`Nak`, delayed until the closing member's pending pull requests expired).
//!
//! ```no_run
//! use eventbus_core::{BusConfig, Envelope, EventBus, EventBusExt, SubscribeOptions};
//! use eventbus_nats::NatsBus;
//!
//! # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
//! let bus = NatsBus::connect(BusConfig::from_url("nats://localhost:4222")).await?;
//! let subscription = bus
//!     .subscribe_with("orders", SubscribeOptions::group("billing"), |event| async move {
//!         println!("{} v{}", event.aggregate_id, event.event_version);
//!         Ok(())
//!     })
//!     .await?;
//! let event = Envelope::builder("order-1", "OrderPlaced").payload("{}").build()?;
//! let ack = bus.publish("orders", event).await?.await?;
//! println!("stream sequence {:?}", ack.sequence);
//! subscription.close().await;
//! bus.close().await;
//! # Ok(()) }
//! ```

mod bus;
mod connect;
mod consume;
pub mod naming;
mod provision;

pub use bus::NatsBus;
