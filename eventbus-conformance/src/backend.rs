//! What a backend offers the suites: a way to connect, the capabilities it declares, and optional raw access
//! and fault controls.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventbus::{BusConfig, EventBus, WireMessage};

/// A backend under test. The suites connect through it as often as they need, each time with a config they
/// derived from [`Backend::config`].
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Name printed beside every figure, such as `memory` or `nats (image nats:2.10)`.
    fn name(&self) -> String;

    /// What this backend can be asked to do; suites print what they leave out and why.
    fn capabilities(&self) -> Capabilities;

    /// A configuration pointed at this backend, with its defaults.
    fn config(&self) -> BusConfig;

    /// Connects a new bus.
    async fn connect(&self, config: BusConfig) -> eventbus::Result<Connection>;

    /// A configuration pointing at an address where no broker listens, to test the connect deadline; `None`
    /// when the backend has no address (explain why in [`Capabilities::notes`]).
    fn unreachable_config(&self) -> Option<BusConfig> {
        None
    }
}

/// A connected bus, plus the controls a suite may use on it.
pub struct Connection {
    /// The bus under test.
    pub bus: Arc<dyn EventBus>,
    /// Publishing and reading raw broker messages, bypassing the bus (for undecodable input and interop).
    pub raw: Option<Arc<dyn RawAccess>>,
    /// Broker fault injection.
    pub faults: Option<Arc<dyn Faults>>,
}

/// Capabilities a backend declares. A suite scenario that needs one the backend lacks is printed as not run,
/// with the reason, and never counted as passed.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// A group subscribing for the first time receives the events the topic retained from before.
    pub history: bool,
    /// Largest payload the backend accepts, in bytes.
    pub max_payload: usize,
    /// Events survive a broker restart ([`Faults::restart`] is offered and the storage is durable).
    pub restart: bool,
    /// When aggregates are grouped into partitions that are handled one message at a time, how: a slow
    /// aggregate then holds back the aggregates of its partition, not only itself.
    pub partitioning: Option<Partitioning>,
    /// Why the backend lacks each capability it lacks, for the printed report.
    pub notes: Vec<(&'static str, String)>,
}

/// How a backend groups aggregates into partitions.
#[derive(Clone, Copy, Debug)]
pub struct Partitioning {
    /// Partitions per topic.
    pub partitions: u16,
    /// The partition of an aggregate id.
    pub partition_of: fn(&str, u16) -> u16,
}

impl Partitioning {
    /// Whether two aggregates share a partition.
    pub fn shared(&self, a: &str, b: &str) -> bool {
        (self.partition_of)(a, self.partitions) == (self.partition_of)(b, self.partitions)
    }
}

/// Raw broker access for the suites.
#[async_trait]
pub trait RawAccess: Send + Sync {
    /// Publishes a raw message as a foreign producer would.
    async fn publish_raw(&self, topic: &str, message: WireMessage) -> anyhow::Result<()>;

    /// Reads at least `count` messages of `topic` from its start, waiting at most `within`; returns what it
    /// read.
    async fn read_raw(&self, topic: &str, count: usize, within: Duration) -> anyhow::Result<Vec<WireMessage>>;
}

/// Broker fault injection.
#[async_trait]
pub trait Faults: Send + Sync {
    /// Makes the broker unreachable without closing connections (a network outage).
    async fn pause(&self) -> anyhow::Result<()>;

    /// Ends the outage.
    async fn unpause(&self) -> anyhow::Result<()>;

    /// Stops the broker, keeps it down for `down_for`, and starts it again with its stored data; returns once
    /// it accepts connections.
    async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        let _ = down_for;
        anyhow::bail!("this backend cannot be restarted")
    }
}
