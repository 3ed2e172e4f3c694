//! The NATS JetStream backend as a [`Backend`], on a broker container, plus the scenarios only NATS has:
//! token authentication, interop with the bare async-nats client, provisioning and partition ownership.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use async_nats::jetstream;
use async_trait::async_trait;
use bytes::Bytes;
use eventbus::nats::{naming, NatsBus};
use eventbus::wire::{self, WireMessage};
use eventbus::{BusConfig, Envelope, Error, EventBus, EventBusExt, SubscribeOptions};
use tokio::sync::{mpsc, OnceCell};

use crate::backend::{Backend, Capabilities, Connection, Partitioning, RawAccess};
use crate::fixture::{Broker, BrokerFaults, BrokerSpec, Ready};
use crate::harness::{figures, print_figures};
use crate::suites::DELIVERY_DEADLINE;
use crate::workload::{foreign_message, forward_into, share_into, unique};

/// Environment variable naming the NATS image.
pub const IMAGE_VARIABLE: &str = "EVENTBUS_NATS_IMAGE";
/// The official image, used when the variable is unset.
pub const DEFAULT_IMAGE: &str = "nats:2.10";

/// A NATS server with JetStream and file storage, in a container.
pub struct Nats {
    broker: Arc<Broker>,
}

impl Nats {
    /// The image to run: `$EVENTBUS_NATS_IMAGE`, else the official image.
    pub fn image() -> String {
        std::env::var(IMAGE_VARIABLE).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| DEFAULT_IMAGE.to_owned())
    }

    /// The container of a JetStream server with file storage, with `extra` arguments.
    pub fn spec(extra: &[&str]) -> BrokerSpec {
        let mut args: Vec<String> = ["-js", "-sd", "/data"].map(String::from).to_vec();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        BrokerSpec {
            image: Self::image(),
            port: 4222,
            args,
            env: Vec::new(),
            volumes: vec!["/data".to_owned()],
            ready: Ready::Stderr("Server is ready".to_owned()),
        }
    }

    /// Starts the broker.
    pub async fn start() -> anyhow::Result<Self> {
        Ok(Self { broker: Arc::new(Broker::start(&Self::spec(&[])).await?) })
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.broker.host_port)
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
impl Backend for Nats {
    fn name(&self) -> String {
        format!("nats ({})", self.broker.image)
    }

    fn capabilities(&self) -> Capabilities {
        let config = BusConfig::default().nats;
        Capabilities {
            history: true,
            max_payload: 1024 * 1024,
            restart: true,
            partitioning: Some(Partitioning { partitions: config.partitions, partition_of: naming::partition_of }),
            notes: Vec::new(),
        }
    }

    fn config(&self) -> BusConfig {
        BusConfig::from_url(self.url())
    }

    async fn connect(&self, config: BusConfig) -> eventbus::Result<Connection> {
        let raw = NatsRaw { url: self.url(), config: config.nats.clone(), client: OnceCell::new() };
        let bus = NatsBus::connect(config).await?;
        Ok(Connection {
            bus: Arc::new(bus),
            raw: Some(Arc::new(raw)),
            faults: Some(Arc::new(BrokerFaults { broker: self.broker.clone(), restart: true })),
        })
    }

    fn unreachable_config(&self) -> Option<BusConfig> {
        // Nothing listens on port 1.
        Some(BusConfig::from_url("nats://127.0.0.1:1"))
    }
}

/// The bare async-nats client, connected on first use.
struct NatsRaw {
    url: String,
    config: eventbus::config::NatsConfig,
    client: OnceCell<async_nats::Client>,
}

impl NatsRaw {
    async fn js(&self) -> anyhow::Result<jetstream::Context> {
        let client = self.client.get_or_try_init(|| async_nats::connect(self.url.as_str())).await?;
        Ok(jetstream::new(client.clone()))
    }

    fn stream_name(&self, topic: &str) -> String {
        naming::stream_name(&self.config.stream_prefix, topic)
    }
}

#[async_trait]
impl RawAccess for NatsRaw {
    async fn publish_raw(&self, topic: &str, message: WireMessage) -> anyhow::Result<()> {
        let js = self.js().await?;
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.stream_name(topic),
            subjects: vec![naming::stream_subjects(&self.config.subject_prefix, topic)],
            ..Default::default()
        })
        .await?;
        let partition =
            message.header(wire::AGGREGATE_ID).map_or(0, |a| naming::partition_of(a, self.config.partitions));
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in &message.headers {
            headers.append(name.as_str(), value.as_str());
        }
        let subject = naming::subject(&self.config.subject_prefix, topic, partition);
        js.publish_with_headers(subject, headers, message.payload).await?.await?;
        Ok(())
    }

    async fn read_raw(&self, topic: &str, count: usize, within: Duration) -> anyhow::Result<Vec<WireMessage>> {
        let js = self.js().await?;
        let deadline = tokio::time::Instant::now() + within;
        let mut messages = Vec::new();
        let mut sequence = 1;
        while messages.len() < count && tokio::time::Instant::now() < deadline {
            let Ok(stream) = js.get_stream(self.stream_name(topic)).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            match stream.get_raw_message(sequence).await {
                Ok(message) => {
                    let headers = message
                        .headers
                        .iter()
                        .flat_map(|(name, values)| {
                            values.iter().map(move |v| (name.to_string(), v.as_str().to_owned()))
                        })
                        .collect();
                    messages.push(WireMessage { headers, payload: message.payload });
                    sequence += 1;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(messages)
    }
}

/// auth: a broker that requires a token accepts the right one, refuses a wrong one with an auth error that
/// says so, and the token appears in no printed configuration or error.
pub async fn auth() -> anyhow::Result<()> {
    const TOKEN: &str = "s3cret-token-9f2c";
    let broker = Broker::start(&Nats::spec(&["--auth", TOKEN])).await?;
    let url = format!("nats://127.0.0.1:{}", broker.host_port);
    let outcome = async {
        let mut right = BusConfig::from_url(&url);
        right.nats.auth.token = Some(TOKEN.into());
        let printed = format!("{right:?}");
        let bus = NatsBus::connect(right).await.context("the right token was refused")?;
        let topic = unique("auth");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let subscription = bus
            .subscribe_with(&topic, SubscribeOptions::group("g"), move |event| {
                let tx = tx.clone();
                async move {
                    tx.send(event.event_version)?;
                    Ok(())
                }
            })
            .await?;
        bus.publish(&topic, Envelope::builder("a-1", "T").payload("p").build()?).await?.await?;
        let delivered = tokio::time::timeout(DELIVERY_DEADLINE, rx.recv()).await?;
        subscription.close().await;
        bus.close().await;

        let mut wrong = BusConfig::from_url(&url);
        wrong.nats.auth.token = Some("not-the-token".into());
        wrong.connect_timeout = Duration::from_secs(5);
        let refused = NatsBus::connect(wrong).await;
        let message = refused.as_ref().err().map(ToString::to_string).unwrap_or_default();
        let mut missing = BusConfig::from_url(&url);
        missing.connect_timeout = Duration::from_secs(5);
        let without = NatsBus::connect(missing).await.err().map(|e| e.to_string()).unwrap_or_default();
        print_figures(
            "nats",
            "auth",
            "token",
            format_args!(
                "right_token_delivered={} wrong_token_error={message:?} no_token_error={without:?} \
                 token_in_printed_config={}",
                delivered.is_some(),
                printed.contains(TOKEN)
            ),
        );
        ensure!(delivered == Some(1), "nothing delivered with the right token");
        ensure!(matches!(refused, Err(Error::Auth(_))), "a wrong token gave {message:?}");
        ensure!(message.contains("refused"), "the auth error does not say the server refused: {message}");
        ensure!(!printed.contains(TOKEN) && !message.contains(TOKEN), "the token was printed");
        Ok(())
    }
    .await;
    broker.remove().await;
    outcome
}

/// interop: a message published by the bare client with the documented headers is consumed by the bus, and an
/// event published by the bus reads back through the bare client as headers plus the raw payload.
pub async fn interop(nats: &Nats) -> anyhow::Result<()> {
    let connection = nats.connect(nats.config()).await?;
    let bus = connection.bus.clone();
    let raw = connection.raw.clone().context("raw access")?;
    let topic = unique("interop");
    let (subscription, mut rx) = forward_into(&*bus, &topic, SubscribeOptions::group("g")).await?;

    // Bare client → bus: the documented headers, written by hand.
    let foreign = foreign_message("invoice-77", 3, "bare-client");
    raw.publish_raw(&topic, foreign).await?;
    let consumed = tokio::time::timeout(DELIVERY_DEADLINE, rx.recv()).await?.context("nothing consumed")?;

    // Bus → bare client.
    let sent = Envelope::builder("invoice-78", "InvoicePaid")
        .version(2)
        .header("x-origin", "bus")
        .payload(&b"\x00\x01raw"[..])
        .build()?;
    bus.publish(&topic, sent.clone()).await?.await?;
    let stored = raw.read_raw(&topic, 2, DELIVERY_DEADLINE).await?;
    subscription.close().await;
    bus.close().await;
    let read =
        stored.iter().find(|m| m.header(wire::AGGREGATE_ID) == Some("invoice-78")).context("bus event not readable")?;
    figures(
        nats,
        "interop",
        "bare-client",
        format_args!(
            "bare_to_bus={} v{} headers={:?} | bus_to_bare headers={} payload_intact={} msg_id={:?}",
            consumed.aggregate_id,
            consumed.event_version,
            consumed.headers,
            read.headers.len(),
            read.payload == sent.payload,
            read.header("Nats-Msg-Id")
        ),
    );
    ensure!(consumed.aggregate_id == "invoice-77" && consumed.event_version == 3, "decoded {consumed:?}");
    ensure!(consumed.payload == Bytes::from_static(br#"{"amount":42}"#), "payload changed");
    ensure!(consumed.headers.get("x-origin").map(String::as_str) == Some("bare-client"), "user header lost");
    ensure!(read.payload == sent.payload, "the bare client did not read the raw payload");
    ensure!(read.decode()? == sent, "the bare client's headers do not decode to the sent envelope");
    ensure!(read.header("Nats-Msg-Id") == Some(sent.event_id.to_string().as_str()), "Nats-Msg-Id is not the event id");
    Ok(())
}

/// provisioning: under `validate-only` a missing stream or consumer, or a stream whose settings differ, is a
/// clear `Mismatch` error naming what differs; `create-or-update` brings the stream in line, after which
/// validation passes.
pub async fn provisioning(nats: &Nats) -> anyhow::Result<()> {
    use eventbus::config::Provisioning;
    let topic = unique("provisioning");
    let event = |version| Envelope::builder("p-1", "Provisioned").version(version).payload("p").build();
    let with = |provisioning, max_age| {
        let mut config = nats.config();
        config.nats.provisioning = provisioning;
        config.nats.stream.max_age = max_age;
        config
    };
    let hour = Duration::from_secs(3600);

    // Nothing exists yet: validate-only refuses to publish or subscribe.
    let validating = NatsBus::connect(with(Provisioning::ValidateOnly, Duration::ZERO)).await?;
    let missing_stream = validating.publish(&topic, event(1)?).await.err();
    validating.close().await;

    // A default bus creates the stream (no age limit) and the group's consumers.
    let creating = NatsBus::connect(nats.config()).await?;
    creating.publish(&topic, event(1)?).await?.await?;
    let subscription = creating.subscribe_with(&topic, SubscribeOptions::group("kept"), |_| async { Ok(()) }).await?;
    subscription.close().await;
    creating.close().await;

    // validate-only with other stream settings names the setting; with the same settings it works.
    let differing = NatsBus::connect(with(Provisioning::ValidateOnly, hour)).await?;
    let mismatch = differing.publish(&topic, event(2)?).await.err();
    differing.close().await;
    let matching = NatsBus::connect(with(Provisioning::ValidateOnly, Duration::ZERO)).await?;
    matching.publish(&topic, event(2)?).await?.await?;
    let existing_group = matching.subscribe_with(&topic, SubscribeOptions::group("kept"), |_| async { Ok(()) }).await;
    let missing_group = matching.subscribe_with(&topic, SubscribeOptions::group("new"), |_| async { Ok(()) }).await;
    let existing_group_ok = existing_group.is_ok();
    if let Ok(subscription) = existing_group {
        subscription.close().await;
    }
    matching.close().await;

    // create-or-update applies the new setting; validation then passes with it.
    let updating = NatsBus::connect(with(Provisioning::CreateOrUpdate, hour)).await?;
    updating.publish(&topic, event(3)?).await?.await?;
    updating.close().await;
    let revalidating = NatsBus::connect(with(Provisioning::ValidateOnly, hour)).await?;
    let after_update = revalidating.publish(&topic, event(4)?).await.map(drop);
    revalidating.close().await;

    // A stream deleted under a bus that knows it: the server answers the publish with "no responders", which
    // settles it as a broker error at once instead of an ack timeout.
    let deleting = NatsBus::connect(nats.config()).await?;
    deleting.publish(&topic, event(5)?).await?.await?;
    let bare = async_nats::connect(nats.url()).await?;
    jetstream::new(bare.clone()).delete_stream(naming::stream_name(&nats.config().nats.stream_prefix, &topic)).await?;
    drop(bare);
    let started = std::time::Instant::now();
    let after_delete = deleting.publish(&topic, event(6)?).await?.await;
    let deleted_answered_in = started.elapsed();
    deleting.close().await;

    let text = |e: &Option<Error>| e.as_ref().map(ToString::to_string).unwrap_or_default();
    let missing_group_error = missing_group.as_ref().err().map(ToString::to_string).unwrap_or_default();
    figures(
        nats,
        "provisioning",
        "validate-create-update",
        format_args!(
            "missing_stream={:?} differing_stream={:?} existing_group_ok={existing_group_ok} \
             missing_group={missing_group_error:?} validates_after_update={} after_delete={:?} \
             answered_in={deleted_answered_in:?}",
            text(&missing_stream),
            text(&mismatch),
            after_update.is_ok(),
            after_delete.as_ref().err().map(ToString::to_string),
        ),
    );
    ensure!(matches!(missing_stream, Some(Error::Mismatch { .. })), "missing stream: {missing_stream:?}");
    ensure!(text(&missing_stream).contains("does not exist"), "missing stream not named as missing");
    ensure!(matches!(mismatch, Some(Error::Mismatch { .. })), "differing stream: {mismatch:?}");
    ensure!(text(&mismatch).contains("max_age"), "the differing setting is not named");
    ensure!(existing_group_ok, "validate-only refused consumers that exist");
    ensure!(matches!(missing_group, Err(Error::Mismatch { .. })), "a missing consumer was not refused");
    ensure!(after_update.is_ok(), "create-or-update did not bring the stream in line: {after_update:?}");
    ensure!(
        matches!(&after_delete, Err(Error::Broker { message, .. }) if message.contains("no stream answers")),
        "a publish to a deleted stream: {after_delete:?}"
    );
    ensure!(
        deleted_answered_in < nats.config().publish.ack_timeout,
        "the deleted stream's publish waited for its deadline"
    );
    Ok(())
}

/// ownership: partitions pass between the members of a group without breaking an aggregate's order.
///
/// 1. A member handles versions 1 and 2 of every aggregate, then hangs on version 3, holding it and what its
///    client buffered unacknowledged, and dies without closing. The next member takes the partitions over once
///    the dead one's leases expired (`ack_wait`), starting at the first unacknowledged message: every event
///    arrives and none before an earlier one of its aggregate.
/// 2. A member that joins a busy group holds its fair share of the partitions when its subscribe returns.
/// 3. When it closes, the remaining member holds every partition again within a few renewals.
///
/// Then `lost-delivery`, `interrupted-take-over`, `queued-kept-alive`, and `shared-partitions`: the layout
/// without ownership, checked the same way.
pub async fn ownership(nats: &Nats) -> anyhow::Result<()> {
    // A bucket of its own, whose entries live this test's short ack wait.
    let mut config = own_streams(nats, "OWN");
    config.nats.ack_wait = Duration::from_secs(2);
    let partitions = usize::from(config.nats.partitions);
    let workload = crate::workload::Workload::new("ownership", 40, 5, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(crate::recorder::Recorder::default());
    let hang_from = 3;

    let dying = Arc::new(NatsBus::connect(config.clone()).await?);
    let recording = recorder.clone();
    // A worker per aggregate, so the hung handlers do not hold back the other aggregates' first versions.
    let options = SubscribeOptions::group("owned").concurrency(workload.aggregates);
    let hanging = dying
        .subscribe_with(topic, options, move |event| {
            let recorder = recording.clone();
            async move {
                if event.event_version >= hang_from {
                    std::future::pending::<()>().await;
                }
                recorder.record(&event);
                Ok(())
            }
        })
        .await?;
    let published = workload.publish(dying.clone()).await;
    let handled_before = recorder.wait_for(workload.aggregates * 2, DELIVERY_DEADLINE).await;
    // Dies: no lease is given back, nothing more is acked.
    drop(hanging);
    drop(dying);

    let died = std::time::Instant::now();
    let survivor = NatsBus::connect(config.clone()).await?;
    let first =
        crate::workload::record_into(&survivor, topic, SubscribeOptions::group("owned"), recorder.clone()).await?;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    let taken_over_in = died.elapsed();
    let after_failover = recorder.tally(workload.total());

    let leases = async_nats::jetstream::new(async_nats::connect(nats.url()).await?)
        .get_key_value(naming::lease_bucket(&config.nats.stream_prefix))
        .await?;
    let scope = naming::lease_scope(&config.nats.stream_prefix, topic, "owned");
    let owners = |leases: async_nats::jetstream::kv::Store, scope: String| async move {
        let mut owners = std::collections::BTreeMap::<String, usize>::new();
        for partition in 0..partitions {
            if let Some(owner) = leases.get(format!("{scope}.partitions.{partition}")).await? {
                *owners.entry(String::from_utf8_lossy(&owner).into_owned()).or_default() += 1;
            }
        }
        anyhow::Ok(owners.into_values().collect::<Vec<usize>>())
    };
    let joining = NatsBus::connect(config.clone()).await?;
    let second =
        crate::workload::record_into(&joining, topic, SubscribeOptions::group("owned"), recorder.clone()).await?;
    let shared = owners(leases.clone(), scope.clone()).await?;
    second.close().await;
    joining.close().await;
    let mut whole = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        whole = owners(leases.clone(), scope.clone()).await?;
        if whole == [partitions] {
            break;
        }
    }
    first.close().await;
    survivor.close().await;

    figures(
        nats,
        "ownership",
        "failover-join-leave",
        format_args!(
            "messages={} handled_before_death={handled_before} after_failover=[{after_failover}] \
             taken_over_in={taken_over_in:?} partitions_per_member_after_join={shared:?} after_leave={whole:?}",
            workload.total()
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(handled_before, "the first member did not handle versions 1 and 2");
    ensure!(complete, "events were lost when the partitions passed on: {after_failover}");
    ensure!(after_failover.violations == 0, "an event overtook an earlier one: {after_failover}");
    let fair = partitions / 2;
    ensure!(shared == [fair, partitions - fair] || shared == [partitions - fair, fair], "unfair share: {shared:?}");
    ensure!(whole == [partitions], "the remaining member did not take every partition back: {whole:?}");
    lost_delivery(nats).await?;
    interrupted_take_over(nats).await?;
    queued_kept_alive(nats).await?;
    settled_behind_kept_alive(nats).await?;
    foreign_ack(nats).await?;
    shared_partitions(nats).await
}

/// foreign-ack: an ack of another member's reaching the partition's consumer late (sent before that member lost
/// the partition, delivered after a take-over re-created the consumer) moves the consumer's delivery floor past
/// the owner's deliveries, so the server ignores the owner's acks and keeps delivering its messages again. The
/// owner notices acked messages coming back, finds the consumer's floor past its own deliveries, and reads the
/// partition again through a fresh consumer; the partition ends acknowledged through its last message.
async fn foreign_ack(nats: &Nats) -> anyhow::Result<()> {
    let mut config = own_streams(nats, "FOREIGN");
    config.nats.ack_wait = Duration::from_secs(2);
    config.nats.partitions = 1;
    let workload = crate::workload::Workload::new("foreign", 1, 20, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(crate::recorder::Recorder::default());
    let bus = NatsBus::connect(config.clone()).await?;
    let member =
        crate::workload::record_into(&bus, topic, SubscribeOptions::group("foreign"), recorder.clone()).await?;
    for version in 1..=10 {
        bus.publish(topic, workload.event(0, version)).await?.await?;
    }
    ensure!(recorder.wait_for(10, DELIVERY_DEADLINE).await, "the first 10 events were not handled");
    // The late ack: delivery 1,000,000 of the consumer before its re-creation, at the stream's next message.
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let stream_name = naming::stream_name(&config.nats.stream_prefix, topic);
    let next = js.get_stream(&stream_name).await?.info().await?.state.last_sequence + 1;
    let consumer_name = naming::durable_name("foreign", 0);
    client.publish(format!("$JS.ACK.{stream_name}.{consumer_name}.1.{next}.1000000.0.0"), "+ACK".into()).await?;
    client.flush().await?;
    for version in 11..=20 {
        bus.publish(topic, workload.event(0, version)).await?.await?;
    }
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    // Acked through the last message once the member has read the partition again (within a few ack waits).
    let started = std::time::Instant::now();
    let acks = PartitionAcks::settled(&js, &stream_name, &consumer_name, DELIVERY_DEADLINE).await?;
    let recovered_in = started.elapsed();
    member.close().await;
    bus.close().await;
    let tally = recorder.tally(workload.total());
    figures(
        nats,
        "ownership",
        "foreign-ack",
        format_args!("messages={} [{tally}] after={recovered_in:.1?}: {acks}", workload.total()),
    );
    ensure!(complete && tally.violations == 0, "{tally}");
    ensure!(acks.through_last(), "the owner's acks stayed ignored: {acks}");
    Ok(())
}

/// A partition consumer's acknowledgements, as the server holds them.
struct PartitionAcks {
    unacknowledged: usize,
    ack_floor: u64,
    /// The stream's last message.
    last: u64,
}

impl PartitionAcks {
    /// The state once the partition's consumer is acknowledged through the stream's last message, or as it is
    /// after `within`.
    async fn settled(
        js: &jetstream::Context,
        stream_name: &str,
        consumer_name: &str,
        within: Duration,
    ) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        loop {
            let mut stream = js.get_stream(stream_name).await?;
            let last = stream.info().await?.state.last_sequence;
            let mut consumer: jetstream::consumer::PullConsumer = stream
                .get_consumer(consumer_name)
                .await
                .map_err(|e| anyhow::anyhow!("the partition's consumer: {e}"))?;
            let info = consumer.info().await?;
            let acks = Self { unacknowledged: info.num_ack_pending, ack_floor: info.ack_floor.stream_sequence, last };
            if acks.through_last() || started.elapsed() >= within {
                return Ok(acks);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn through_last(&self) -> bool {
        self.unacknowledged == 0 && self.ack_floor == self.last
    }
}

impl std::fmt::Display for PartitionAcks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unacknowledged={} ack_floor={} last={}", self.unacknowledged, self.ack_floor, self.last)
    }
}

/// settled-behind-a-slow-one: an owner acks its partition up to the first delivery not yet handled, so the
/// deliveries handled after a slow one wait unacknowledged (one partition, a 2 s ack wait, the first event's
/// handler taking 5 s while 20 events of four other aggregates are handled at once). They get in-progress
/// notices, so the server delivers none of them again; once the slow one is done, the whole partition is
/// acknowledged.
async fn settled_behind_kept_alive(nats: &Nats) -> anyhow::Result<()> {
    let mut config = own_streams(nats, "BEHIND");
    config.nats.ack_wait = Duration::from_secs(2);
    config.nats.partitions = 1;
    let workload = crate::workload::Workload::new("behind", 5, 5, 1);
    let topic = &workload.topics[0];
    let slow_aggregate = workload.aggregate_id(0);
    let bus = Arc::new(NatsBus::connect(config.clone()).await?);
    let options = SubscribeOptions::group("behind").concurrency(5);
    let SlowRun { member, recorder, published, complete } = handle_slowly(&bus, &workload, options, move |event| {
        let slow = event.aggregate_id == slow_aggregate && event.event_version == 1;
        if slow {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        }
    })
    .await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let stream_name = naming::stream_name(&config.nats.stream_prefix, topic);
    let acks = PartitionAcks::settled(&js, &stream_name, &naming::durable_name("behind", 0), Duration::ZERO).await?;
    member.close().await;
    bus.close().await;
    let tally = recorder.tally(workload.total());
    figures(
        nats,
        "ownership",
        "settled-behind-a-slow-one",
        format_args!("messages={} [{tally}] {acks}", workload.total()),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0, "{tally}");
    ensure!(tally.duplicates == 0, "deliveries handled behind the slow one were delivered again: {tally}");
    ensure!(acks.through_last(), "the partition is not acknowledged through its last message: {acks}");
    Ok(())
}

/// queued-kept-alive: an owner holds more than its workers handle within the ack wait (one worker, 300 ms per
/// event, 20 events, a 2 s ack wait); the deliveries waiting in its queue get in-progress notices too, so the
/// server delivers none of them again.
async fn queued_kept_alive(nats: &Nats) -> anyhow::Result<()> {
    let mut config = own_streams(nats, "QUEUED");
    config.nats.ack_wait = Duration::from_secs(2);
    let workload = crate::workload::Workload::new("queued", 1, 20, 1);
    let bus = Arc::new(NatsBus::connect(config).await?);
    let SlowRun { member: slow, recorder, published, complete } =
        handle_slowly(&bus, &workload, SubscribeOptions::group("slow").concurrency(1), |_| Duration::from_millis(300))
            .await?;
    slow.close().await;
    bus.close().await;
    let tally = recorder.tally(workload.total());
    figures(nats, "ownership", "queued-kept-alive", format_args!("messages={} [{tally}]", workload.total()));
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0, "{tally}");
    ensure!(tally.duplicates == 0, "queued deliveries were delivered again: {tally}");
    Ok(())
}

/// What [`handle_slowly`] leaves: the member, still subscribed, and what it handled.
struct SlowRun {
    member: eventbus::Subscription,
    recorder: Arc<crate::recorder::Recorder>,
    published: crate::workload::PublishStats,
    /// Every event arrived within the delivery deadline.
    complete: bool,
}

/// Subscribes a member whose handler takes `delay(event)` before recording each event, publishes `workload`
/// (one topic), and waits for every event, then for one 2 s ack wait more, within which redeliveries would come.
async fn handle_slowly(
    bus: &Arc<NatsBus>,
    workload: &crate::workload::Workload,
    options: SubscribeOptions,
    delay: impl Fn(&Envelope) -> Duration + Send + Sync + 'static,
) -> anyhow::Result<SlowRun> {
    let recorder = Arc::new(crate::recorder::Recorder::default());
    let recording = recorder.clone();
    let member = bus
        .subscribe_with(&workload.topics[0], options, move |event| {
            let (recorder, delay) = (recording.clone(), delay(&event));
            async move {
                tokio::time::sleep(delay).await;
                recorder.record(&event);
                Ok(())
            }
        })
        .await?;
    let published = workload.publish(bus.clone()).await;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(SlowRun { member, recorder, published, complete })
}

/// interrupted-take-over: a member that died between deleting a partition's consumer and re-creating it left
/// only the stand-in; the next member re-creates the consumer at the stand-in's position instead of from the
/// start of the stream.
async fn interrupted_take_over(nats: &Nats) -> anyhow::Result<()> {
    let config = own_streams(nats, "HANDOVER");
    let workload = crate::workload::Workload::new("interrupted", 1, 40, 1);
    let topic = &workload.topics[0];
    let bus = NatsBus::connect(config.clone()).await?;
    let (first, mut first_events) = forward_into(&bus, topic, SubscribeOptions::group("resumed")).await?;
    for version in 1..=20 {
        bus.publish(topic, workload.event(0, version)).await?.await?;
    }
    let handled = receive_versions(&mut first_events, 20).await.len();
    first.close().await;
    for version in 21..=40 {
        bus.publish(topic, workload.event(0, version)).await?.await?;
    }
    // What a take-over that stopped half-way leaves: a stand-in at the first unhandled message, no consumer.
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js.get_stream(naming::stream_name(&config.nats.stream_prefix, topic)).await?;
    let first_unhandled = stream.info().await?.state.last_sequence - 19;
    let partition = naming::partition_of(&workload.aggregate_id(0), config.nats.partitions);
    let name = naming::durable_name("resumed", partition);
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(format!("{name}_handover")),
            filter_subject: naming::subject(&config.nats.subject_prefix, topic, partition),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: first_unhandled },
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    stream.delete_consumer(&name).await?;

    let (second, mut second_events) = forward_into(&bus, topic, SubscribeOptions::group("resumed")).await?;
    let versions = receive_versions(&mut second_events, 20).await;
    // Anything more would be a replay from the start.
    let extra = tokio::time::timeout(Duration::from_millis(500), second_events.recv()).await.ok().flatten();
    second.close().await;
    bus.close().await;
    figures(
        nats,
        "ownership",
        "interrupted-take-over",
        format_args!(
            "handled_before={handled} resumed_from_stream_sequence={first_unhandled} received_after={} first={:?} \
             extra={:?}",
            versions.len(),
            versions.first(),
            extra.as_ref().map(|e| e.event_version)
        ),
    );
    ensure!(handled == 20, "the first member handled {handled} of 20");
    ensure!(versions == (21..=40).collect::<Vec<u64>>(), "resumed with {versions:?}, not versions 21 to 40");
    ensure!(extra.is_none(), "more than the unhandled events arrived (a replay from the start?)");
    Ok(())
}

/// lost-delivery: a delivery of an owned partition that never reaches its owner (here taken by another client
/// pulling from the same consumer, as a message lost with a dropped connection would be) leaves a gap in the
/// consumer sequence; the owner re-reads the partition from its first unacknowledged message instead of
/// handling the later events first.
async fn lost_delivery(nats: &Nats) -> anyhow::Result<()> {
    let config = own_streams(nats, "GAP");
    // One aggregate: every event in one partition, pulled by its owner and by the thief below.
    let workload = crate::workload::Workload::new("lost-delivery", 1, 40, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(crate::recorder::Recorder::default());
    let bus = Arc::new(NatsBus::connect(config.clone()).await?);
    let member = crate::workload::record_into(&*bus, topic, SubscribeOptions::group("gap"), recorder.clone()).await?;
    let partition = naming::partition_of(&workload.aggregate_id(0), config.nats.partitions);
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let stream = js.get_stream(naming::stream_name(&config.nats.stream_prefix, topic)).await?;
    let thief: jetstream::consumer::PullConsumer = stream
        .get_consumer(&naming::durable_name("gap", partition))
        .await
        .map_err(|e| anyhow::anyhow!("the partition's consumer: {e}"))?;
    // Waiting beside the owner's pull request, it takes one delivery of the partition (nats-server 2.9.10 hands
    // the second event to it: the server serves waiting pull requests in turn).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut consumer = thief.clone();
    let owners_requests = consumer.info().await?.num_waiting;
    let mut stolen = thief
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("the thief's pull: {e}"))?;
    // The thief's pull request travels on a connection of its own: the events must not reach the server before
    // it does, or the owner's request takes them all.
    let registered = tokio::time::timeout(Duration::from_secs(10), async {
        while consumer.info().await.map(|info| info.num_waiting).unwrap_or(0) <= owners_requests {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    ensure!(registered.is_ok(), "the thief's pull request never waited beside the owner's");
    let published = workload.publish(bus.clone()).await;
    let stolen = tokio::time::timeout(Duration::from_secs(10), futures_util::StreamExt::next(&mut stolen))
        .await
        .ok()
        .flatten()
        .and_then(Result::ok);
    let stolen_version =
        stolen.as_ref().and_then(|m| m.headers.as_ref()?.get(wire::EVENT_VERSION).map(|v| v.to_string()));
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    member.close().await;
    bus.close().await;
    let tally = recorder.tally(workload.total());
    figures(
        nats,
        "ownership",
        "lost-delivery",
        format_args!("messages={} stolen_version={stolen_version:?} [{tally}]", workload.total()),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(stolen_version.is_some(), "no delivery was taken from the owner: the scenario did not happen");
    ensure!(complete, "the taken event never reached the owner: {tally}");
    ensure!(tally.violations == 0, "a later event overtook the one lost on the way: {tally}");
    Ok(())
}

/// The versions of the next `count` events, fewer if they do not arrive within the delivery deadline.
async fn receive_versions(events: &mut mpsc::UnboundedReceiver<Arc<Envelope>>, count: usize) -> Vec<u64> {
    let mut versions = Vec::new();
    while versions.len() < count {
        match tokio::time::timeout(DELIVERY_DEADLINE, events.recv()).await {
            Ok(Some(event)) => versions.push(event.event_version),
            _ => break,
        }
    }
    versions
}

/// The broker's configuration with a stream prefix of its own, so a scenario's lease bucket (whose entry
/// lifetime is fixed by its first user) and streams are its own.
fn own_streams(nats: &Nats, prefix: &str) -> BusConfig {
    let mut config = nats.config();
    config.nats.stream_prefix = unique(prefix).replace('-', "_");
    config
}

/// shared-partitions: with `nats.max_ack_pending = 1` there are no leases: two members of a group pull from
/// every partition, one message of a partition at a time, and every aggregate still arrives whole and in order.
async fn shared_partitions(nats: &Nats) -> anyhow::Result<()> {
    let mut config = own_streams(nats, "SHARED");
    config.nats.max_ack_pending = 1;
    let workload = crate::workload::Workload::new("shared", 40, 5, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(crate::recorder::Recorder::default());
    let bus = Arc::new(NatsBus::connect(config.clone()).await?);
    let mut members = Vec::new();
    let counts: [Arc<std::sync::atomic::AtomicUsize>; 2] = Default::default();
    for count in &counts {
        members.push(
            share_into(
                bus.as_ref(),
                topic,
                SubscribeOptions::group("shared").concurrency(4),
                recorder.clone(),
                count.clone(),
            )
            .await?,
        );
    }
    let published = workload.publish(bus.clone()).await;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    for member in members {
        member.close().await;
    }
    bus.close().await;
    let leases = async_nats::jetstream::new(async_nats::connect(nats.url()).await?)
        .get_key_value(naming::lease_bucket(&config.nats.stream_prefix))
        .await
        .is_ok();
    let tally = recorder.tally(workload.total());
    let shares = counts.map(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    figures(
        nats,
        "ownership",
        "shared-partitions",
        format_args!("messages={} [{tally}] shares={shares:?} lease_bucket_created={leases}", workload.total()),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    ensure!(shares.iter().all(|&s| s > 0), "a member received nothing: {shares:?}");
    ensure!(!leases, "max_ack_pending 1 needs no lease bucket, yet one was created");
    Ok(())
}
