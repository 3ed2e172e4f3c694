//! Broker containers for the suites, started by testcontainers, with the fault controls the suites use.
//!
//! The image of each broker comes from an environment variable (`EVENTBUS_NATS_IMAGE`, ...) and defaults to
//! the official image. Where no registry is reachable, `scripts/test-images.sh` builds local images and prints
//! the variables that point here. The host port is fixed when the container is created, so a stop / start
//! keeps it, and with it the address every client already has.

use std::process::Stdio;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort, Mount, WaitFor};

use crate::backend::Faults;
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// Set to `1` to make an unreachable broker a failure instead of a printed skip (CI sets it).
pub const REQUIRE_BROKERS: &str = "EVENTBUS_REQUIRE_BROKERS";

/// Whether brokers are required (`EVENTBUS_REQUIRE_BROKERS=1`).
pub fn brokers_required() -> bool {
    std::env::var(REQUIRE_BROKERS).is_ok_and(|v| v == "1")
}

/// What to start.
#[derive(Clone, Debug)]
pub struct BrokerSpec {
    /// Image reference, `name[:tag]`.
    pub image: String,
    /// The port the broker listens on inside the container.
    pub port: u16,
    /// Arguments after the image's entrypoint; `{host_port}` stands for the host port mapped to `port`.
    pub args: Vec<String>,
    /// Environment variables; `{host_port}` in a value stands for the mapped host port.
    pub env: Vec<(String, String)>,
    /// Paths in the container that get an anonymous volume, kept across a stop / start and removed with the
    /// container. Broker data belongs on a volume as in production: the container's own layered filesystem
    /// can be far slower (fuse-overlayfs cut JetStream file storage to a third here).
    pub volumes: Vec<String>,
    /// A line the broker prints once it accepts clients.
    pub ready: Ready,
}

/// Where a broker announces that it is ready.
#[derive(Clone, Debug)]
pub enum Ready {
    /// A line on standard output containing this text.
    Stdout(String),
    /// A line on standard error containing this text.
    Stderr(String),
}

/// A running broker container.
pub struct Broker {
    container: Option<ContainerAsync<GenericImage>>,
    id: String,
    pauses: tokio::sync::Mutex<usize>,
    /// The image it runs.
    pub image: String,
    /// The host port mapped to the broker's port (on 127.0.0.1).
    pub host_port: u16,
}

impl Broker {
    /// Starts a container from `spec` and waits until it is ready.
    pub async fn start(spec: &BrokerSpec) -> anyhow::Result<Self> {
        let host_port = free_port()?;
        let (name, tag) = split_image(&spec.image);
        let fill = |text: &str| text.replace("{host_port}", &host_port.to_string());
        let wait = match &spec.ready {
            Ready::Stdout(line) => WaitFor::message_on_stdout(line.clone()),
            Ready::Stderr(line) => WaitFor::message_on_stderr(line.clone()),
        };
        let mut request = GenericImage::new(name, tag)
            .with_exposed_port(spec.port.tcp())
            .with_wait_for(wait)
            .with_mapped_port(host_port, spec.port.tcp())
            .with_cmd(spec.args.iter().map(|a| fill(a)).collect::<Vec<_>>())
            .with_startup_timeout(Duration::from_secs(90));
        for (key, value) in &spec.env {
            request = request.with_env_var(key.clone(), fill(value));
        }
        for path in &spec.volumes {
            // No source: Docker creates an anonymous volume, which testcontainers removes with the container.
            request = request.with_mount(Mount::volume_mount("", path.clone()));
        }
        let container = request.start().await.map_err(|e| {
            anyhow::anyhow!("cannot start {} (is Docker running, is the image present?): {e}", spec.image)
        })?;
        let id = container.id().to_owned();
        Ok(Self { container: Some(container), id, pauses: Default::default(), image: spec.image.clone(), host_port })
    }

    /// The host process id of the container's main process, where this host runs the container (a remote
    /// Docker daemon's processes are not this host's): checked against the process's cgroup.
    pub async fn process_id(&self) -> Option<u32> {
        let pid: u32 = docker_output(&["inspect", "--format", "{{.State.Pid}}", &self.id]).await.ok()?.parse().ok()?;
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        (pid != 0 && cgroup.contains(&self.id)).then_some(pid)
    }

    /// Freezes the broker's processes: connections stay open, nothing is answered (a network outage).
    /// Pauses nest: the broker runs again after as many [`unpause`](Self::unpause) calls.
    pub async fn pause(&self) -> anyhow::Result<()> {
        let mut pauses = self.pauses.lock().await;
        if *pauses == 0 {
            docker(&["pause", &self.id]).await?;
        }
        *pauses += 1;
        Ok(())
    }

    /// Ends one pause.
    pub async fn unpause(&self) -> anyhow::Result<()> {
        let mut pauses = self.pauses.lock().await;
        if *pauses == 1 {
            docker(&["unpause", &self.id]).await?;
        }
        *pauses = pauses.saturating_sub(1);
        Ok(())
    }

    /// Stops the broker (it shuts down cleanly) and starts it again on the same port with the same stored
    /// data; returns once it accepts connections again.
    pub async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        self.stop_container().await?;
        tokio::time::sleep(down_for).await;
        self.start_container().await
    }

    /// Stops the broker (it shuts down cleanly); the container stays, with its port.
    pub async fn stop_container(&self) -> anyhow::Result<()> {
        docker(&["stop", "--time", "5", &self.id]).await
    }

    /// Starts a stopped broker again; returns once it accepts connections.
    pub async fn start_container(&self) -> anyhow::Result<()> {
        docker(&["start", &self.id]).await?;
        self.wait_accepting(Duration::from_secs(30)).await
    }

    /// Waits until the broker behind the host port accepts a connection. Docker's port proxy accepts and at
    /// once closes connections while the broker is down, so a connection counts only if it either brings the
    /// broker's greeting (NATS) or stays open (Kafka, whose clients speak first).
    pub async fn wait_accepting(&self, within: Duration) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let attempt = async {
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.host_port)).await.ok()?;
                let mut first = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut first)).await {
                    Ok(Ok(read)) => (read > 0).then_some(()),
                    Ok(Err(_)) => None,
                    Err(_) => Some(()),
                }
            };
            if attempt.await.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("broker on port {} not accepting after {within:?}", self.host_port)
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes the container.
    pub async fn remove(mut self) {
        if let Some(container) = self.container.take() {
            let _ = container.rm().await;
        }
    }
}

/// A broker's fault controls, as the suites use them. `restart` says whether the broker's storage survives a
/// restart (a broker that loses everything is declared unable to restart).
pub struct BrokerFaults {
    /// The broker.
    pub broker: std::sync::Arc<Broker>,
    /// Whether [`Faults::restart`] is offered.
    pub restart: bool,
}

#[async_trait::async_trait]
impl Faults for BrokerFaults {
    async fn pause(&self) -> anyhow::Result<()> {
        self.broker.pause().await
    }

    async fn unpause(&self) -> anyhow::Result<()> {
        self.broker.unpause().await
    }

    async fn restart(&self, down_for: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(self.restart, "this broker's storage does not survive a restart");
        self.broker.restart(down_for).await
    }
}

/// Runs `docker` with `args`, failing with its error output when it fails.
async fn docker(args: &[&str]) -> anyhow::Result<()> {
    docker_output(args).await.map(drop)
}

/// Runs `docker` with `args`; its standard output, trimmed.
async fn docker_output(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("docker").args(args).stdin(Stdio::null()).output().await?;
    anyhow::ensure!(
        output.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// A port free on 127.0.0.1 right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `registry/name:tag` → (`registry/name`, `tag`), the tag defaulting to `latest`.
fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::split_image;

    #[test]
    fn image_references() {
        assert_eq!(split_image("nats"), ("nats", "latest"));
        assert_eq!(split_image("nats:2.10"), ("nats", "2.10"));
        assert_eq!(split_image("localhost:5000/nats"), ("localhost:5000/nats", "latest"));
        assert_eq!(split_image("eventbus-local/nats:2.9.10"), ("eventbus-local/nats", "2.9.10"));
    }
}
