//! The in-memory backend bounds what a slow group leaves unread: publishes wait for room, then fail with a
//! clear error, and nothing already accepted is lost.

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, EventBusExt, HandlerError, MemoryBus, SubscribeOptions};
use tokio::sync::{mpsc, Semaphore};

fn event(version: u64) -> Envelope {
    Envelope::builder("order-1", "Placed").version(version).payload("x").build().unwrap()
}

#[tokio::test]
async fn a_full_backlog_holds_publishes_back_until_the_group_catches_up() {
    let mut config = BusConfig::default();
    config.memory.history = 0;
    config.memory.max_backlog = 4;
    config.publish.enqueue_timeout = Duration::from_millis(300);
    let bus = Arc::new(MemoryBus::new(config).unwrap());
    // One slot in the dispatcher and a handler that waits for a permit: the group reads one event and stops.
    let gate = Arc::new(Semaphore::new(0));
    let (seen, mut delivered) = mpsc::unbounded_channel();
    let handler_gate = gate.clone();
    let options = SubscribeOptions::group("slow").concurrency(1).max_in_flight(1);
    let subscription = bus
        .subscribe_with("orders", options, move |event| {
            let (gate, seen) = (handler_gate.clone(), seen.clone());
            async move {
                gate.acquire().await.unwrap().forget();
                seen.send(event.event_version).unwrap();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();

    // The handler holds v1, the dispatcher v2; v3..v6 fill the backlog of 4.
    let mut accepted = 0;
    let mut refused = None;
    for version in 1..=10 {
        match bus.publish("orders", event(version)).await {
            Ok(receipt) => {
                receipt.await.unwrap();
                accepted += 1;
            }
            Err(error) => {
                refused = Some((version, error));
                break;
            }
        }
    }
    let (version, error) = refused.expect("the backlog bound refused a publish");
    assert!(error.to_string().contains("memory.max_backlog = 4"), "{error}");
    assert!((4..=7).contains(&accepted), "accepted {accepted} before the bound held");
    assert_eq!(version, accepted + 1);

    // A publish waiting for room completes once the group catches up.
    let waiting = tokio::spawn({
        let bus = bus.clone();
        async move { bus.publish("orders", event(version)).await.map(drop) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(usize::MAX >> 4);
    waiting.await.unwrap().expect("the waiting publish got room");
    let mut versions = Vec::new();
    while versions.len() < version as usize {
        versions.push(tokio::time::timeout(Duration::from_secs(5), delivered.recv()).await.unwrap().unwrap());
    }
    assert_eq!(versions, (1..=version).collect::<Vec<_>>(), "nothing accepted was lost or reordered");
    subscription.close().await;
    bus.close().await;
}
