//! The Kafka backend as a [`Backend`], on a Kafka-protocol broker container, plus the scenarios only Kafka
//! has: a group member that crashes mid-stream, and interop with the bare rdkafka API.
//!
//! The image comes from `EVENTBUS_KAFKA_IMAGE`: the official `apache/kafka` image in KRaft mode by default, or
//! a local `tansu` image (see `scripts/test-images.sh`), whose in-memory storage does not survive a restart.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use async_trait::async_trait;
use bytes::Bytes;
use eventbus::kafka::KafkaBus;
use eventbus::wire::{self, WireMessage};
use eventbus::{BusConfig, Envelope, SubscribeOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::backend::{Backend, Capabilities, Connection, RawAccess};
use crate::fixture::{Broker, BrokerFaults, BrokerSpec, Ready};
use crate::harness::figures;
use crate::recorder::Recorder;
use crate::suites::DELIVERY_DEADLINE;
use crate::workload::{foreign_message, forward_into, record_into, share_into, unique, Workload};

/// Environment variable naming the Kafka-protocol image.
pub const IMAGE_VARIABLE: &str = "EVENTBUS_KAFKA_IMAGE";
/// The official image, used when the variable is unset.
pub const DEFAULT_IMAGE: &str = "apache/kafka:3.9.0";

/// A Kafka-protocol broker in a container.
pub struct Kafka {
    broker: Arc<Broker>,
    /// tansu keeps its data in memory: no restart.
    tansu: bool,
}

impl Kafka {
    /// The image to run: `$EVENTBUS_KAFKA_IMAGE`, else the official image.
    pub fn image() -> String {
        std::env::var(IMAGE_VARIABLE).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| DEFAULT_IMAGE.to_owned())
    }

    fn spec(image: &str) -> BrokerSpec {
        let strings = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        if image.contains("tansu") {
            BrokerSpec {
                image: image.to_owned(),
                port: 9092,
                args: strings(&[
                    "broker",
                    "--listener-url",
                    "tcp://0.0.0.0:9092",
                    "--advertised-listener-url",
                    "tcp://127.0.0.1:{host_port}",
                    "--storage-engine",
                    "memory://tansu/",
                ]),
                env: Vec::new(),
                // In-memory storage: nothing to keep on a volume.
                volumes: Vec::new(),
                ready: Ready::Stdout("ready in".to_owned()),
            }
        } else {
            // Apache Kafka in KRaft mode, one node, advertising the mapped port.
            let env = [
                ("KAFKA_NODE_ID", "1"),
                ("KAFKA_PROCESS_ROLES", "broker,controller"),
                ("KAFKA_LISTENERS", "PLAINTEXT://:9092,CONTROLLER://:9093"),
                ("KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT://127.0.0.1:{host_port}"),
                ("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER"),
                ("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"),
                ("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093"),
                ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
                ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1"),
                ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1"),
                ("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0"),
            ];
            BrokerSpec {
                image: image.to_owned(),
                port: 9092,
                args: Vec::new(),
                env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                volumes: Vec::new(),
                ready: Ready::Stdout("Kafka Server started".to_owned()),
            }
        }
    }

    /// Starts the broker.
    pub async fn start() -> anyhow::Result<Self> {
        let image = Self::image();
        let broker = Broker::start(&Self::spec(&image)).await?;
        Ok(Self { broker: Arc::new(broker), tansu: image.contains("tansu") })
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.broker.host_port)
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.broker.host_port)
    }

    /// The host process id of the broker, where this host runs its container.
    pub async fn process_id(&self) -> Option<u32> {
        self.broker.process_id().await
    }

    /// Stops the broker's container.
    pub async fn stop(self) {
        if let Ok(broker) = Arc::try_unwrap(self.broker) {
            broker.remove().await;
        }
    }
}

#[async_trait]
impl Backend for Kafka {
    fn name(&self) -> String {
        format!("kafka ({})", self.broker.image)
    }

    fn capabilities(&self) -> Capabilities {
        let mut notes = Vec::new();
        if self.tansu {
            notes.push(("restart", "tansu's in-memory storage does not survive a broker restart".to_owned()));
            notes.push((
                "mid-batch fetch",
                "tansu serves nothing to a fetch starting inside a record batch; the suites produce one record \
                 per batch on it (batch.num.messages=1)"
                    .to_owned(),
            ));
        }
        Capabilities {
            history: true,
            max_payload: BusConfig::default().kafka.max_message_bytes,
            restart: !self.tansu,
            partitioning: None,
            notes,
        }
    }

    fn config(&self) -> BusConfig {
        let mut config = BusConfig::from_url(self.url());
        if self.tansu {
            // tansu 0.6 serves no records to a fetch that starts inside a record batch, which is where a group
            // resumes after a member leaves mid-stream (Apache Kafka returns the batch and the client skips the
            // records before the offset). One record per batch keeps every committed offset at a batch start.
            config.kafka.properties.0.insert("batch.num.messages".into(), "1".into());
        }
        config
    }

    async fn connect(&self, config: BusConfig) -> eventbus::Result<Connection> {
        let bus = KafkaBus::connect(config).await?;
        Ok(Connection {
            bus: Arc::new(bus),
            raw: Some(Arc::new(KafkaRaw { bootstrap: self.bootstrap() })),
            faults: Some(Arc::new(BrokerFaults { broker: self.broker.clone(), restart: !self.tansu })),
        })
    }

    fn unreachable_config(&self) -> Option<BusConfig> {
        // Nothing listens on port 1.
        Some(BusConfig::from_url("kafka://127.0.0.1:1"))
    }
}

/// The bare rdkafka API, for raw records.
struct KafkaRaw {
    bootstrap: String,
}

impl KafkaRaw {
    fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }
}

#[async_trait]
impl RawAccess for KafkaRaw {
    async fn publish_raw(&self, topic: &str, message: WireMessage) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.client().create()?;
        let new = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
        let _ = admin.create_topics([&new], &AdminOptions::new()).await?;
        let producer: FutureProducer = self.client().create()?;
        let headers = message
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value.as_bytes()) }));
        let key = message.header(wire::AGGREGATE_ID).unwrap_or("raw").to_owned();
        let record = FutureRecord::to(topic).key(&key).payload(message.payload.as_ref()).headers(headers);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
        tokio::task::spawn_blocking(move || drop((producer, admin))).await?;
        Ok(())
    }

    async fn read_raw(&self, topic: &str, count: usize, within: Duration) -> anyhow::Result<Vec<WireMessage>> {
        let (config, topic) = (self.client(), topic.to_owned());
        tokio::task::spawn_blocking(move || read_blocking(config, &topic, count, within)).await?
    }
}

/// Reads `topic` from the start of every partition, without a consumer group.
fn read_blocking(
    mut config: ClientConfig,
    topic: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<Vec<WireMessage>> {
    let consumer: BaseConsumer =
        config.set("group.id", unique("raw-reader")).set("enable.auto.commit", "false").create()?;
    let deadline = std::time::Instant::now() + within;
    let partitions = loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        if !partitions.is_empty() || std::time::Instant::now() >= deadline {
            break partitions;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut messages = Vec::new();
    while messages.len() < count && std::time::Instant::now() < deadline {
        if let Some(record) = consumer.poll(Duration::from_millis(200)) {
            let record = record?;
            let headers = record
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let mut message =
                WireMessage { headers, payload: Bytes::copy_from_slice(record.payload().unwrap_or_default()) };
            if let Some(key) = record.key() {
                message.headers.push(("kafka-key".into(), String::from_utf8_lossy(key).into_owned()));
            }
            messages.push(message);
        }
    }
    Ok(messages)
}

/// consumer-crash: one of two group members is dropped mid-stream (no close); the other takes over its
/// partitions; no acked event is lost and the order per aggregate holds.
pub async fn consumer_crash(kafka: &Kafka) -> anyhow::Result<()> {
    let mut config = kafka.config();
    config.kafka.session_timeout = Duration::from_secs(6);
    let connection = kafka.connect(config).await?;
    let bus = connection.bus.clone();
    let workload = Workload::new("kafka-crash", 60, 20, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(Recorder::default());
    let crashed_handled = Arc::new(AtomicUsize::new(0));
    let survivor = record_into(&*bus, topic, SubscribeOptions::group("crash"), recorder.clone()).await?;
    let doomed =
        share_into(&*bus, topic, SubscribeOptions::group("crash"), recorder.clone(), crashed_handled.clone()).await?;
    let publisher = tokio::spawn({
        let (bus, workload) = (bus.clone(), workload.clone());
        async move { workload.publish(bus).await }
    });
    // Let both members work, then drop one without closing it.
    let working = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    while (recorder.distinct() < workload.total() / 4 || crashed_handled.load(Ordering::Relaxed) < 20)
        && tokio::time::Instant::now() < working
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let handled_by_crashed = crashed_handled.load(Ordering::Relaxed);
    drop(doomed);
    let published = publisher.await?;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    survivor.close().await;
    bus.close().await;
    let tally = recorder.tally(workload.total());
    let gaps: Vec<String> = (0..workload.aggregates)
        .filter_map(|i| {
            let versions = recorder.versions(&workload.aggregate_id(i));
            (versions.len() < workload.versions as usize).then(|| format!("{i}:{versions:?}"))
        })
        .take(3)
        .collect();
    figures(
        kafka,
        "consumer_crash",
        "member-dropped-mid-stream",
        format_args!(
            "messages={} acked={} handled_by_dropped_member={handled_by_crashed} {tally} incomplete={gaps:?}",
            workload.total(),
            published.acked
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(handled_by_crashed > 0, "the dropped member never got partitions");
    ensure!(complete && tally.losses == 0, "acked events were lost: {tally}");
    ensure!(tally.violations == 0, "order broke when the member was dropped: {tally}");
    Ok(())
}

/// interop: a record produced by the bare rdkafka API in the documented header format is consumed by the
/// bus, and the bus's records read back by the bare API show key, headers and raw payload.
pub async fn interop(kafka: &Kafka) -> anyhow::Result<()> {
    let connection = kafka.connect(kafka.config()).await?;
    let bus = connection.bus.clone();
    let raw = connection.raw.clone().context("raw access")?;
    let topic = unique("kafka-interop");
    let (subscription, mut received) = forward_into(&*bus, &topic, SubscribeOptions::group("g")).await?;
    let foreign = foreign_message("invoice-87", 3, "bare-rdkafka");
    raw.publish_raw(&topic, foreign).await?;
    let consumed = tokio::time::timeout(DELIVERY_DEADLINE, received.recv()).await?.context("nothing consumed")?;
    let sent = Envelope::builder("invoice-88", "InvoicePaid")
        .version(2)
        .header("x-origin", "bus")
        .payload(&b"\x00\x01raw"[..])
        .build()?;
    bus.publish(&topic, sent.clone()).await?.await?;
    let stored = raw.read_raw(&topic, 2, DELIVERY_DEADLINE).await?;
    subscription.close().await;
    bus.close().await;
    let read = stored
        .iter()
        .find(|m| m.header(wire::AGGREGATE_ID) == Some("invoice-88"))
        .context("bus record not readable")?;
    figures(
        kafka,
        "interop",
        "bare-rdkafka",
        format_args!(
            "bare_to_bus={} v{} headers={:?} | bus_to_bare key={:?} headers={} payload_intact={}",
            consumed.aggregate_id,
            consumed.event_version,
            consumed.headers,
            read.header("kafka-key"),
            read.headers.len() - 1,
            read.payload == sent.payload
        ),
    );
    ensure!(consumed.aggregate_id == "invoice-87" && consumed.event_version == 3, "decoded {consumed:?}");
    ensure!(consumed.headers.get("x-origin").map(String::as_str) == Some("bare-rdkafka"), "user header lost");
    ensure!(read.header("kafka-key") == Some("invoice-88"), "the record key is not the aggregate id");
    ensure!(read.payload == sent.payload, "the bare API did not read the raw payload");
    let mut headers_only = read.clone();
    headers_only.headers.retain(|(k, _)| k != "kafka-key");
    ensure!(headers_only.decode()? == sent, "the record headers do not decode to the sent envelope");
    Ok(())
}

/// outage: the broker stops; `health()` reports reconnecting, with the error; the broker starts again and a bus
/// works. Where the broker keeps its state across the restart, the same bus works again and reports connected.
/// tansu's in-memory storage forgets everything, the idempotent producer's state included, and the bus's
/// producer does not come back from that: there, that part is printed as not run, and only a new bus is
/// checked. (On tansu the restart also loses every topic, so this scenario runs last.)
pub async fn outage(kafka: &Kafka) -> anyhow::Result<()> {
    let connection = kafka.connect(kafka.config()).await?;
    let bus = connection.bus.clone();
    let before = Workload::new("kafka-outage-before", 1, 1, 1);
    bus.publish(&before.topics[0], before.event(0, 1)).await?.await?;
    let stopped = tokio::time::Instant::now();
    kafka.broker.stop_container().await?;
    let mut detected = None;
    while stopped.elapsed() < Duration::from_secs(30) {
        if bus.health().state == eventbus::ConnectionState::Reconnecting {
            detected = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let while_down = bus.health();
    kafka.broker.start_container().await?;

    let same_bus = if kafka.tansu {
        None
    } else {
        let after = Workload::new("kafka-outage-after", 1, 1, 1);
        let mut recovered = None;
        while recovered.is_none() && stopped.elapsed() < Duration::from_secs(60) {
            let attempt = async { bus.publish(&after.topics[0], after.event(0, 1)).await?.await };
            if attempt.await.is_ok() {
                recovered = Some(stopped.elapsed());
            } else {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        Some((recovered, bus.health().state))
    };
    bus.close().await;
    let fresh = kafka.connect(kafka.config()).await?;
    let after_fresh = Workload::new("kafka-outage-fresh", 1, 1, 1);
    let fresh_works = async { fresh.bus.publish(&after_fresh.topics[0], after_fresh.event(0, 1)).await?.await }.await;
    fresh.bus.close().await;
    figures(
        kafka,
        "outage",
        "broker-stopped-and-started",
        format_args!(
            "outage_detected_after={detected:?} last_error_while_down={:?} same_bus_after_restart={} \
             new_bus_after_restart={}",
            while_down.last_error,
            match &same_bus {
                Some((recovered, state)) => format!("works_again_after={recovered:?} state={state:?}"),
                None => "NOT RUN: tansu's restart loses the idempotent producer's state".to_owned(),
            },
            if fresh_works.is_ok() { "works" } else { "fails" }
        ),
    );
    ensure!(detected.is_some(), "health() never reported the outage");
    ensure!(fresh_works.is_ok(), "a new bus did not work after the restart: {fresh_works:?}");
    if let Some((recovered, state)) = same_bus {
        ensure!(recovered.is_some(), "the bus did not work again after the broker came back");
        ensure!(state == eventbus::ConnectionState::Connected, "health() did not report connected again");
    }
    Ok(())
}
