//! Publishes the life of a few orders and consumes them, printing a trace and a summary.
//!
//! ```text
//! cargo run --example quickstart                 # in-memory backend, no broker needed
//! cargo run -p eventbus-examples --features nats --example quickstart -- nats://127.0.0.1:4222
//! ```
//!
//! Each order's events reach the handler one at a time and in the order they were published, while different
//! orders are handled in parallel.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::{BusConfig, Envelope, EventBusExt, HandlerError, SubscribeOptions};

const ORDERS: usize = 4;
const STEPS: [&str; 4] = ["OrderPlaced", "PaymentCaptured", "OrderPacked", "OrderShipped"];

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("quickstart failed: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> eventbus::Result<bool> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "memory://".to_owned());
    let mut config = BusConfig::from_url(&url);
    config.subscribe.concurrency = 4;
    let bus = eventbus::connect(&config).await?;
    println!("connected to {url}");

    // Remember the last version handled per order, to show that each order's events arrive in order.
    let last_version: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let out_of_order = Arc::new(Mutex::new(0usize));
    let started = Instant::now();
    let subscription = {
        let (last_version, out_of_order) = (last_version.clone(), out_of_order.clone());
        bus.subscribe_with("orders", SubscribeOptions::group("fulfilment"), move |event| {
            let (last_version, out_of_order) = (last_version.clone(), out_of_order.clone());
            async move {
                // Pretend to do some work, so orders overlap in time.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let mut last = last_version.lock().unwrap();
                let previous = last.insert(event.aggregate_id.clone(), event.event_version).unwrap_or(0);
                let in_order = event.event_version == previous + 1;
                if !in_order {
                    *out_of_order.lock().unwrap() += 1;
                }
                println!(
                    "  {:>7.1} ms  consumed  {:<8} v{}  {:<16} {}",
                    started.elapsed().as_secs_f64() * 1000.0,
                    event.aggregate_id,
                    event.event_version,
                    event.event_type,
                    if in_order { "in order" } else { "OUT OF ORDER" }
                );
                Ok::<(), HandlerError>(())
            }
        })
        .await?
    };

    // Publish every step of every order; receipts are awaited together, so publishes are pipelined.
    let mut receipts = Vec::new();
    for (version, step) in (1..).zip(STEPS) {
        for order in 1..=ORDERS {
            let event = Envelope::builder(format!("order-{order}"), step)
                .version(version)
                .correlation_id(format!("checkout-{order}"))
                .payload(format!(r#"{{"order":{order},"step":"{step}"}}"#))
                .build()?;
            receipts.push(bus.publish("orders", event).await?);
        }
    }
    let published = receipts.len();
    for receipt in receipts {
        receipt.await?;
    }
    println!("  {:>7.1} ms  published {published} events, all acked", started.elapsed().as_secs_f64() * 1000.0);

    // Wait until every event has been handled, at most five seconds.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.metrics().acked < published as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscription.close().await;
    let report = bus.close().await;
    let metrics = bus.metrics();
    let out_of_order = *out_of_order.lock().unwrap();
    println!(
        "summary: {} orders, {published} published, {} consumed, {out_of_order} out of order, \
         {} unacked at close, closed in {:?}",
        ORDERS,
        metrics.acked,
        report.unacked.len(),
        report.elapsed
    );
    Ok(metrics.acked == published as u64 && out_of_order == 0 && report.unacked.is_empty())
}
