//! Building the NATS connection from the configuration, and reporting its state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, ConnectErrorKind, ConnectOptions, Event};
use eventbus_core::{BusConfig, ConnectionState, Error, Health, Result};
use tokio::sync::Notify;

/// Connection state shared between the client's event callback and the bus.
#[derive(Default)]
pub(crate) struct ConnectionEvents {
    pub(crate) health: Mutex<Option<Health>>,
    /// Signalled when the client reports it has closed (after a drain).
    pub(crate) closed: Notify,
}

impl ConnectionEvents {
    pub(crate) fn health(&self) -> Health {
        lock(&self.health).clone().unwrap_or_else(|| Health::new(ConnectionState::Reconnecting))
    }

    pub(crate) fn set_state(&self, state: ConnectionState, error: Option<String>) {
        let mut health = lock(&self.health);
        let last_error = error.or_else(|| health.as_ref().and_then(|h| h.last_error.clone()));
        if health.as_ref().is_some_and(|h| h.state == ConnectionState::Closed) {
            return;
        }
        let mut next = Health::new(state);
        next.last_error = last_error;
        *health = Some(next);
    }

    fn record(&self, event: Event) {
        match event {
            Event::Connected => self.set_state(ConnectionState::Connected, None),
            Event::Disconnected => {
                tracing::warn!("lost the connection to the NATS server; reconnecting");
                self.set_state(ConnectionState::Reconnecting, Some("disconnected from the NATS server".into()));
            }
            Event::Closed => {
                self.set_state(ConnectionState::Closed, None);
                self.closed.notify_one();
            }
            Event::ServerError(error) => {
                tracing::warn!(%error, "NATS server error");
                let state = self.health().state;
                self.set_state(state, Some(format!("server error: {error}")));
            }
            Event::ClientError(error) => {
                tracing::warn!(%error, "NATS client error");
                let state = self.health().state;
                self.set_state(state, Some(format!("client error: {error}")));
            }
            // The client dropped messages a full subscription could not take; on the ack inbox that turns
            // stored publishes into ack timeouts, so it shows in health().
            Event::SlowConsumer(subscription) => {
                tracing::warn!(subscription, "a NATS subscription fell behind and the client dropped messages");
                let state = self.health().state;
                self.set_state(state, Some(format!("slow consumer: subscription {subscription} dropped messages")));
            }
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The url with any user information replaced, for messages and logs.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Connects with every option of `config.nats`, within `config.connect_timeout`.
pub(crate) async fn connect(config: &BusConfig, events: Arc<ConnectionEvents>) -> Result<Client> {
    let nats = &config.nats;
    let max_delay = nats.reconnect.max_delay;
    let callback_events = events.clone();
    let mut options = ConnectOptions::new()
        .name(&nats.name)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(nats.request_timeout))
        .ping_interval(nats.ping_interval)
        // Room on the client for a full window of publishes plus the acks of handled messages, so queuing there
        // never waits.
        .client_capacity((config.publish.window * 2).max(2048))
        // Room on every subscription for a full window of publish answers: the client drops what a full
        // subscription cannot take, and an answer dropped there would time out a publish that was stored.
        .subscription_capacity((config.publish.window + 1024).max(64 * 1024))
        .max_reconnects(nats.reconnect.max_attempts)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
        .event_callback(move |event| {
            let events = callback_events.clone();
            async move { events.record(event) }
        });
    let auth = &nats.auth;
    if let Some(token) = &auth.token {
        options = options.token(token.expose().to_owned());
    }
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(seed) = &auth.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &auth.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| Error::Config(format!("nats.auth.credentials_file {} cannot be read: {e}", path.display())))?;
    }
    let tls = &nats.tls;
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => options = options.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => return Err(Error::Config("nats.tls.cert_file and nats.tls.key_file must be set together".into())),
    }
    if tls.required {
        options = options.require_tls(true);
    }

    let mut servers = vec![config.url.clone()];
    servers.extend(nats.servers.iter().cloned());
    let shown = redact(&config.url);
    match tokio::time::timeout(config.connect_timeout, options.connect(servers)).await {
        Ok(Ok(client)) => {
            events.set_state(ConnectionState::Connected, None);
            Ok(client)
        }
        Ok(Err(error)) => Err(match error.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Error::Auth(format!("{shown} refused the connection ({error})"))
            }
            _ => Error::Connect { url: shown, message: error.to_string() },
        }),
        Err(_) => Err(Error::Connect {
            url: shown,
            message: format!("no connection within {:?} (connect_timeout)", config.connect_timeout),
        }),
    }
}

/// 0 ms for the first attempt, then doubling from 10 ms up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = (attempts - 2).min(16) as u32;
    Duration::from_millis(10u64 << exponent).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(redact("nats://user:secret@localhost:4222"), "nats://***@localhost:4222");
        assert_eq!(redact("nats://localhost:4222"), "nats://localhost:4222");
    }

    #[test]
    fn reconnect_delay_grows_to_its_cap() {
        let max = Duration::from_secs(2);
        let delays: Vec<_> = (1..=12).map(|a| reconnect_delay(a, max).as_millis()).collect();
        assert_eq!(delays[..4], [0, 10, 20, 40]);
        assert_eq!(delays[11], 2000);
    }
}
