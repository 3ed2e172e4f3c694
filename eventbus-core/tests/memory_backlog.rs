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

/// A publish refused for want of a window slot (acks held by an outage) gives its backlog room back: the room
/// of events never stored must not shrink the backlog for good.
#[tokio::test]
async fn a_publish_refused_by_the_window_gives_its_backlog_room_back() {
    let mut config = BusConfig::default();
    config.memory.history = 0;
    config.memory.max_backlog = 2;
    config.publish.window = 1;
    config.publish.enqueue_timeout = Duration::from_millis(100);
    config.publish.ack_timeout = Duration::from_secs(5);
    let bus = Arc::new(MemoryBus::new(config).unwrap());
    let (seen, mut delivered) = mpsc::unbounded_channel();
    let subscription = bus
        .subscribe_with("orders", SubscribeOptions::group("g"), move |event| {
            let seen = seen.clone();
            async move {
                seen.send(event.event_version).unwrap();
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();

    // During an outage the first publish holds the only window slot; the next ones take room, then are refused.
    bus.pause();
    let held = bus.publish("orders", event(1)).await.expect("the first publish is held, not refused");
    for version in 2..=4 {
        let refused = bus.publish("orders", event(version)).await.expect_err("no window slot during the outage");
        assert!(refused.to_string().contains("window"), "{refused}");
    }
    bus.resume();
    held.await.expect("the held publish is stored after the outage");

    // Had each refused publish kept its room, the backlog of 2 would now hold none.
    for version in 2..=5 {
        tokio::time::timeout(Duration::from_secs(2), async { bus.publish("orders", event(version)).await?.await })
            .await
            .expect("room came back")
            .unwrap();
    }
    let mut versions = Vec::new();
    while versions.len() < 5 {
        versions.push(tokio::time::timeout(Duration::from_secs(5), delivered.recv()).await.unwrap().unwrap());
    }
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    subscription.close().await;
    bus.close().await;
}
