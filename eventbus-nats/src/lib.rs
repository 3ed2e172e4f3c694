//! The NATS JetStream backend of `eventbus`.
//!
//! Each topic is one JetStream stream (`EVENTBUS_<topic>`) over the subjects `eventbus.<topic>.<partition>`;
//! an event's partition is a stable hash of its aggregate id ([`naming::partition_of`]), among
//! `nats.partitions` (4 by default). Messages carry the envelope's metadata as headers and the payload as the
//! raw body, plus `Nats-Msg-Id` = event id, so the stream drops a re-send within its duplicate window.
//!
//! A consumer group is one durable pull consumer per partition, and a partition is pulled by one member of the
//! group at a time, which keeps every aggregate's order across members while the partitions are spread over
//! them. By default each member owns a fair share of the partitions through leases in a key-value bucket and
//! pulls up to `nats.max_ack_pending` (256) unacknowledged messages from each; a member taking over a partition
//! whose previous owner left messages unacknowledged re-creates its consumer at the first of them, so no event
//! overtakes an earlier one. With `nats.max_ack_pending = 1` there are no leases: every member pulls from every
//! partition and the server hands out one message of a partition at a time. `docs/nats.md` has the details.
//!
//! Each publish asks JetStream to answer on the bus's ack inbox under the publish's ticket in the window; one
//! task reads the inbox and settles the publishes, with no future or timer per message. While a message is
//! handled or retried in place, the bus tells the server it is in progress every third of the consumer's ack
//! wait, so the server never redelivers work that is still going on. A partition's owner acknowledges in bulk: its consumers use the `AckAll` policy, and one ack covers
//! every delivery of the settled prefix (`floor.rs`). Dead-lettered messages are settled too (terminated with
//! `Term` where each message is acked on its own), and messages a closing subscription fetched but did not
//! handle are left to the partition's next owner.
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

mod acks;
mod bus;
mod connect;
mod consume;
mod floor;
pub mod naming;
mod ownership;
mod provision;

pub use bus::NatsBus;
