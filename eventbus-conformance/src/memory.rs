//! The in-memory backend as a [`Backend`]: the reference every broker backend is held to.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventbus::{BusConfig, MemoryBus, WireMessage};

use crate::backend::{Backend, Capabilities, Connection, Faults, RawAccess};

/// The in-memory backend. Its faults are simulated by [`MemoryBus::pause`] and [`MemoryBus::resume`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory;

#[async_trait]
impl Backend for Memory {
    fn name(&self) -> String {
        "memory".to_owned()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            history: true,
            max_payload: BusConfig::default().memory.max_payload,
            restart: false,
            partitioning: None,
            notes: vec![
                ("unreachable_config", "the in-process backend has no address to be unreachable".to_owned()),
                ("restart", "the in-process backend has no broker process to restart".to_owned()),
            ],
        }
    }

    fn config(&self) -> BusConfig {
        BusConfig::default()
    }

    async fn connect(&self, config: BusConfig) -> eventbus::Result<Connection> {
        let bus = Arc::new(MemoryBus::new(config)?);
        Ok(Connection {
            bus: bus.clone(),
            raw: Some(Arc::new(MemoryRaw(bus.clone()))),
            faults: Some(Arc::new(MemoryFaults(bus))),
        })
    }
}

struct MemoryRaw(Arc<MemoryBus>);

#[async_trait]
impl RawAccess for MemoryRaw {
    async fn publish_raw(&self, topic: &str, message: WireMessage) -> anyhow::Result<()> {
        self.0.publish_raw(topic, message)?;
        Ok(())
    }

    async fn read_raw(&self, topic: &str, count: usize, within: Duration) -> anyhow::Result<Vec<WireMessage>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let messages = self.0.read_raw(topic);
            if messages.len() >= count || tokio::time::Instant::now() >= deadline {
                return Ok(messages);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct MemoryFaults(Arc<MemoryBus>);

#[async_trait]
impl Faults for MemoryFaults {
    async fn pause(&self) -> anyhow::Result<()> {
        self.0.pause();
        Ok(())
    }

    async fn unpause(&self) -> anyhow::Result<()> {
        self.0.resume();
        Ok(())
    }
}
