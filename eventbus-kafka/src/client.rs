//! librdkafka client configuration from the bus configuration, and the client context that reports the
//! connection state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use eventbus_core::config::{KafkaConfig, SecurityProtocol};
use eventbus_core::{BusConfig, ConnectionState, Error, Health, Result};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// The bootstrap servers of `config`: the host list of `url` (`kafka://a:9092,b:9092`) plus `kafka.servers`.
pub(crate) fn bootstrap_servers(config: &BusConfig) -> Result<String> {
    let hosts = config
        .url
        .strip_prefix("kafka://")
        .ok_or_else(|| Error::Config(format!("KafkaBus needs a kafka:// url, got {:?}", config.url)))?;
    let hosts = hosts.trim_end_matches('/');
    let mut servers: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
    servers.extend(config.kafka.servers.iter().map(String::as_str));
    if servers.is_empty() {
        return Err(Error::Config("kafka:// url names no broker; use kafka://host:port".into()));
    }
    Ok(servers.join(","))
}

/// The properties every client of the bus shares: servers, client id, security, pass-through properties.
pub(crate) fn base(config: &BusConfig) -> Result<ClientConfig> {
    let kafka: &KafkaConfig = &config.kafka;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", bootstrap_servers(config)?)
        .set("client.id", &kafka.client_id)
        .set("security.protocol", kafka.security_protocol.as_librdkafka())
        .set("socket.connection.setup.timeout.ms", millis(config.connect_timeout))
        .set("reconnect.backoff.max.ms", "2000")
        .set_log_level(RDKafkaLogLevel::Warning);
    if matches!(kafka.security_protocol, SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl) {
        let sasl = &kafka.sasl;
        if let Some(mechanism) = &sasl.mechanism {
            client.set("sasl.mechanism", mechanism);
        }
        if let Some(user) = &sasl.username {
            client.set("sasl.username", user);
        }
        if let Some(password) = &sasl.password {
            client.set("sasl.password", password.expose());
        }
    }
    let tls = &kafka.tls;
    for (key, path) in [
        ("ssl.ca.location", &tls.ca_file),
        ("ssl.certificate.location", &tls.cert_file),
        ("ssl.key.location", &tls.key_file),
    ] {
        if let Some(path) = path {
            client.set(key, path.display().to_string());
        }
    }
    if let Some(password) = &tls.key_password {
        client.set("ssl.key.password", password.expose());
    }
    for (key, value) in &kafka.properties.0 {
        client.set(key, value);
    }
    Ok(client)
}

pub(crate) fn millis(duration: std::time::Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// Connection state shared by every client of one bus.
#[derive(Default)]
pub(crate) struct Connection {
    health: Mutex<Option<Health>>,
    /// Fast check for [`up`](Self::up), which runs on every ack.
    reconnecting: AtomicBool,
}

impl Connection {
    pub(crate) fn health(&self) -> Health {
        lock(&self.health).clone().unwrap_or_else(|| Health::new(ConnectionState::Connected))
    }

    pub(crate) fn set(&self, state: ConnectionState, error: Option<String>) {
        let mut health = lock(&self.health);
        if health.as_ref().is_some_and(|h| h.state == ConnectionState::Closed) {
            return;
        }
        let same = health.as_ref().is_some_and(|h| h.state == state);
        if same && error.is_none() {
            return;
        }
        let last_error = error.or_else(|| health.as_ref().and_then(|h| h.last_error.clone()));
        let mut next = if same { health.clone().expect("same state") } else { Health::new(state) };
        next.last_error = last_error;
        *health = Some(next);
        self.reconnecting.store(state == ConnectionState::Reconnecting, Ordering::Release);
    }

    /// A broker answered: the connection is up.
    pub(crate) fn up(&self) {
        if self.reconnecting.load(Ordering::Acquire) {
            self.set(ConnectionState::Connected, None);
        }
    }

    pub(crate) fn closed(&self) {
        let mut health = lock(&self.health);
        let last_error = health.as_ref().and_then(|h| h.last_error.clone());
        let mut closed = Health::new(ConnectionState::Closed);
        closed.last_error = last_error;
        *health = Some(closed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The client context of every librdkafka client of a bus: routes librdkafka's errors to `health()`.
#[derive(Clone)]
pub(crate) struct BusContext {
    pub(crate) connection: Arc<Connection>,
}

impl ClientContext for BusContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let down = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure)
        );
        if down {
            tracing::warn!(%error, reason, "lost the connection to the Kafka brokers; reconnecting");
            self.connection.set(ConnectionState::Reconnecting, Some(format!("{error}: {reason}")));
        } else {
            tracing::warn!(%error, reason, "Kafka client error");
        }
    }
}
