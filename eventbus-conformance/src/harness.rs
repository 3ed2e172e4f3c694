//! Runs every suite against one backend as a test binary (`harness = false`), printing each scenario's figures.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;

use libtest_mimic::{Arguments, Failed, Trial};

use crate::backend::{Backend, Capabilities};
use crate::fixture::{brokers_required, REQUIRE_BROKERS};
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
        ("restart", |b| Box::pin(suites::restart::run(b))),
        ("leak", |b| Box::pin(suites::leak::run(b))),
    ]
}

/// A scenario of one backend only, run after the shared suites.
pub type Extra = Box<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send + Sync>;

/// Runs every suite against `backend`, one at a time (the leak suite measures the whole process), each on a
/// fresh multi-threaded runtime. Accepts the usual test-binary arguments (a name filter, `--list`, ...).
pub fn run(backend: Arc<dyn Backend>) -> ExitCode {
    run_with(backend, Vec::new())
}

/// [`run`], then the backend's own scenarios.
pub fn run_with(backend: Arc<dyn Backend>, extras: Vec<(&'static str, Extra)>) -> ExitCode {
    init_logging();
    let args = arguments();
    let capabilities = backend.capabilities();
    println!("conformance: backend {}", backend.name());
    for (capability, reason) in &capabilities.notes {
        println!("conformance: {} lacks {capability}: {reason}", backend.name());
    }
    let mut trials: Vec<Trial> = all_suites()
        .into_iter()
        .map(|(name, suite)| {
            if let Some(reason) = not_applicable(name, &capabilities) {
                // A suite the backend cannot run at all is listed as ignored, never as passed.
                println!("conformance: {} does not run suite {name}: {reason}", backend.name());
                return Trial::test(name, || Ok(())).with_ignored_flag(true);
            }
            let backend = backend.clone();
            Trial::test(name, move || on_runtime(|| suite(&*backend)))
        })
        .collect();
    trials.extend(extras.into_iter().map(|(name, extra)| Trial::test(name, move || on_runtime(&extra))));
    libtest_mimic::run(&args, trials).exit_code()
}

/// Why a whole suite does not apply to a backend with `capabilities`, if it does not.
fn not_applicable(suite: &str, capabilities: &Capabilities) -> Option<String> {
    let lacking = |capability: &str| {
        let note = capabilities.notes.iter().find(|(c, _)| *c == capability).map(|(_, why)| why.clone());
        Some(note.unwrap_or_else(|| format!("the backend does not declare {capability}")))
    };
    match suite {
        "restart" if !capabilities.restart => lacking("restart"),
        _ => None,
    }
}

/// What to do when a backend's broker cannot be started: fail under `EVENTBUS_REQUIRE_BROKERS=1`, otherwise
/// print why and list every suite as ignored (never as passed).
pub fn broker_unavailable(backend: &str, reason: &str, extras: &[&'static str]) -> ExitCode {
    if brokers_required() {
        eprintln!("conformance: backend {backend}: broker unavailable and {REQUIRE_BROKERS}=1: {reason}");
        return ExitCode::FAILURE;
    }
    println!("conformance: backend {backend} NOT RUN: {reason} (set {REQUIRE_BROKERS}=1 to make this a failure)");
    let names = all_suites().into_iter().map(|(name, _)| name).chain(extras.iter().copied());
    let trials = names.map(|name| Trial::test(name, || Ok(())).with_ignored_flag(true)).collect();
    libtest_mimic::run(&arguments(), trials).exit_code()
}

/// Logs of the bus on stderr when `EVENTBUS_LOG` holds a filter (for example `EVENTBUS_LOG=eventbus_nats=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("EVENTBUS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

fn arguments() -> Arguments {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    args
}

fn on_runtime<F>(scenario: impl FnOnce() -> F) -> Result<(), Failed>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        // Blocking-pool threads (name resolution) end soon after use, so thread counts settle quickly.
        .thread_keep_alive(std::time::Duration::from_millis(500))
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("cannot start a runtime: {e}")))?;
    let result = runtime.block_on(scenario());
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result.map_err(|e| Failed::from(format!("{e:#}")))
}

/// Prints one scenario's figures: `[backend] suite/scenario: figures`.
pub fn figures(backend: &dyn Backend, suite: &str, scenario: &str, figures: impl std::fmt::Display) {
    print_figures(&backend.name(), suite, scenario, figures);
}

/// [`figures`] for a scenario that names its backend itself.
pub fn print_figures(backend: &str, suite: &str, scenario: &str, figures: impl std::fmt::Display) {
    println!("[{backend}] {suite}/{scenario}: {figures}");
}

/// Prints that a scenario was not run on this backend, and why.
pub fn not_run(backend: &dyn Backend, suite: &str, scenario: &str, reason: impl std::fmt::Display) {
    println!("[{}] {suite}/{scenario}: NOT RUN: {reason}", backend.name());
}
