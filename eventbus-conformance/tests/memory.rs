//! Every conformance suite against the in-memory backend.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    eventbus_conformance::harness::run(Arc::new(eventbus_conformance::memory::Memory))
}
