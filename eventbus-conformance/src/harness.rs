//! Runs every suite against one backend as a test binary (`harness = false`), printing each scenario's figures.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::backend::Backend;
use crate::suites;

/// A suite: an async function over a backend.
pub type Suite = for<'a> fn(&'a dyn Backend) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Every suite, in the order they run.
pub fn all_suites() -> Vec<(&'static str, Suite)> {
    vec![
        ("bad_input", |b| Box::pin(suites::bad_input::run(b))),
        ("delivery", |b| Box::pin(suites::delivery::run(b))),
        ("ordering", |b| Box::pin(suites::ordering::run(b))),
        ("retry", |b| Box::pin(suites::retry::run(b))),
        ("timeout", |b| Box::pin(suites::timeout::run(b))),
        ("leak", |b| Box::pin(suites::leak::run(b))),
    ]
}

/// Runs every suite against `backend`, one at a time (the leak suite measures the whole process), each on a
/// fresh multi-threaded runtime. Accepts the usual test-binary arguments (a name filter, `--list`, ...).
pub fn run(backend: Arc<dyn Backend>) -> ExitCode {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let capabilities = backend.capabilities();
    println!("conformance: backend {}", backend.name());
    for (capability, reason) in &capabilities.notes {
        println!("conformance: {} lacks {capability}: {reason}", backend.name());
    }
    let trials = all_suites()
        .into_iter()
        .map(|(name, suite)| {
            let backend = backend.clone();
            Trial::test(name, move || run_suite(&*backend, suite))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn run_suite(backend: &dyn Backend, suite: Suite) -> Result<(), Failed> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("cannot start a runtime: {e}")))?;
    let result = runtime.block_on(suite(backend));
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result.map_err(|e| Failed::from(format!("{e:#}")))
}

/// Prints one scenario's figures: `[backend] suite/scenario: figures`.
pub fn figures(backend: &dyn Backend, suite: &str, scenario: &str, figures: impl std::fmt::Display) {
    println!("[{}] {suite}/{scenario}: {figures}", backend.name());
}

/// Prints that a scenario was not run on this backend, and why.
pub fn not_run(backend: &dyn Backend, suite: &str, scenario: &str, reason: impl std::fmt::Display) {
    println!("[{}] {suite}/{scenario}: NOT RUN: {reason}", backend.name());
}
