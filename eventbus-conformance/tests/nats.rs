//! Every conformance suite against NATS JetStream in a container, plus token authentication, interop with
//! the bare async-nats client, provisioning and partition ownership. The image comes from
//! `EVENTBUS_NATS_IMAGE` (default: the official `nats` image); without Docker the suites are listed as ignored,
//! or fail under `EVENTBUS_REQUIRE_BROKERS=1`.

use std::process::ExitCode;
use std::sync::Arc;

use eventbus_conformance::harness::{self, Extra};
use eventbus_conformance::nats::{self, Nats};

fn main() -> ExitCode {
    // The container is started and removed on a runtime of its own that lives as long as the test binary; the
    // suites run on runtimes of their own.
    let fixture = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let broker = match fixture.block_on(Nats::start()) {
        Ok(broker) => Arc::new(broker),
        Err(error) => {
            return harness::broker_unavailable(
                "nats",
                &format!("{error:#}"),
                &["auth", "interop", "provisioning", "ownership"],
            )
        }
    };
    let (interop_broker, provisioning_broker, ownership_broker) = (broker.clone(), broker.clone(), broker.clone());
    let extras: Vec<(&'static str, Extra)> = vec![
        ("auth", Box::new(|| Box::pin(nats::auth()))),
        (
            "interop",
            Box::new(move || {
                let broker = interop_broker.clone();
                Box::pin(async move { nats::interop(&broker).await })
            }),
        ),
        (
            "provisioning",
            Box::new(move || {
                let broker = provisioning_broker.clone();
                Box::pin(async move { nats::provisioning(&broker).await })
            }),
        ),
        (
            "ownership",
            Box::new(move || {
                let broker = ownership_broker.clone();
                Box::pin(async move { nats::ownership(&broker).await })
            }),
        ),
    ];
    let code = harness::run_with(broker.clone(), extras);
    if let Ok(broker) = Arc::try_unwrap(broker) {
        fixture.block_on(broker.stop());
    }
    code
}
