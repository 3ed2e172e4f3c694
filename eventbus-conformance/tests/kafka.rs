//! Every conformance suite against a Kafka-protocol broker in a container, plus a group member crashing
//! mid-stream and interop with the bare rdkafka API. The image comes from `EVENTBUS_KAFKA_IMAGE` (default: the
//! official `apache/kafka` image); without Docker the suites are listed as ignored, or fail under
//! `EVENTBUS_REQUIRE_BROKERS=1`.

use std::process::ExitCode;
use std::sync::Arc;

use eventbus_conformance::harness::{self, Extra};
use eventbus_conformance::kafka::{self, Kafka};

fn main() -> ExitCode {
    let fixture = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let broker = match fixture.block_on(Kafka::start()) {
        Ok(broker) => Arc::new(broker),
        Err(error) => {
            return harness::broker_unavailable(
                "kafka",
                &format!("{error:#}"),
                &["consumer_crash", "interop", "outage"],
            )
        }
    };
    let (crash_broker, interop_broker, outage_broker) = (broker.clone(), broker.clone(), broker.clone());
    let extras: Vec<(&'static str, Extra)> = vec![
        (
            "consumer_crash",
            Box::new(move || {
                let broker = crash_broker.clone();
                Box::pin(async move { kafka::consumer_crash(&broker).await })
            }),
        ),
        (
            "interop",
            Box::new(move || {
                let broker = interop_broker.clone();
                Box::pin(async move { kafka::interop(&broker).await })
            }),
        ),
        // Last: on tansu the restart loses every topic.
        (
            "outage",
            Box::new(move || {
                let broker = outage_broker.clone();
                Box::pin(async move { kafka::outage(&broker).await })
            }),
        ),
    ];
    let code = harness::run_with(broker.clone(), extras);
    if let Ok(broker) = Arc::try_unwrap(broker) {
        fixture.block_on(broker.stop());
    }
    code
}
