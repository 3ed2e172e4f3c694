//! The conformance suites of `eventbus`: the same scenarios, with the same figures, against every backend.
//!
//! Each suite is a plain async function over a [`Backend`]; `tests/<backend>.rs` hands its backend to
//! [`harness::run`], which runs every suite in turn and prints each scenario's figures. A scenario that needs
//! a capability the backend lacks is printed as not run, with the reason.
//!
//! A backend's test file (with `harness = false`) is one line:
//!
//! ```no_run
//! // tests/memory.rs
//! fn main() -> std::process::ExitCode {
//!     eventbus_conformance::harness::run(std::sync::Arc::new(eventbus_conformance::memory::Memory))
//! }
//! ```
//!
//! A single suite runs on its own too:
//!
//! ```
//! use eventbus_conformance::{memory::Memory, suites};
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! suites::bad_input::run(&Memory).await?; // prints "[memory] bad_input/...: figures"
//! # Ok(()) }
//! ```

pub mod backend;
pub mod bench;
pub mod fixture;
pub mod harness;
pub mod kafka;
pub mod memory;
pub mod nats;
pub mod probe;
pub mod recorder;
pub mod suites;
pub mod workload;

pub use backend::{Backend, Capabilities, Connection, Faults, Partitioning, RawAccess};
