//! The Kafka backend of `eventbus`, on rdkafka (librdkafka, bundled).
//!
//! Records are keyed by aggregate id, so an aggregate's events share a partition and keep their order; the
//! envelope's metadata travels as record headers and the payload as the raw value. The producer is idempotent
//! (`enable.idempotence=true`, `acks=all`) and batches as librdkafka does (`kafka.linger`, `kafka.batch_size`);
//! the bus's in-flight window holds publishers back before librdkafka's own queue fills, and each delivery report
//! settles its publish right on the producer's polling thread (through the window's collector only when the
//! publish-result stream is on).
//!
//! A consumer group on a topic is the Kafka consumer group `<group>@<topic>` ([`group_id`]): its members share
//! the topic's partitions, and subscriptions to other topics never make it rebalance. Within a member, the keyed
//! dispatcher handles the aggregates of a partition in parallel, each in order. Offsets are committed only up to
//! the contiguous prefix of handled records of each partition, so a crash never skips an unhandled record.
//! Before partitions are revoked, their running handlers get to finish and what was handled is committed; records
//! of revoked partitions not started yet are skipped, and the next owner reads them from the committed offset.
//! Topics are created (or checked) through the admin client, so subscribing to a topic nobody published to yet
//! works.
//!
//! ```no_run
//! use eventbus_core::{BusConfig, Envelope, EventBus, EventBusExt, SubscribeOptions};
//! use eventbus_kafka::KafkaBus;
//!
//! # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
//! let bus = KafkaBus::connect(BusConfig::from_url("kafka://localhost:9092")).await?;
//! let subscription = bus
//!     .subscribe_with("orders", SubscribeOptions::group("billing"), |event| async move {
//!         println!("{} v{}", event.aggregate_id, event.event_version);
//!         Ok(())
//!     })
//!     .await?;
//! let event = Envelope::builder("order-1", "OrderPlaced").payload("{}").build()?;
//! let ack = bus.publish("orders", event).await?.await?;
//! println!("partition {:?} offset {:?}", ack.partition, ack.sequence);
//! subscription.close().await;
//! bus.close().await;
//! # Ok(()) }
//! ```

mod bus;
mod client;
mod consume;
mod produce;
mod provision;
mod tracker;

pub use bus::{group_id, KafkaBus};
