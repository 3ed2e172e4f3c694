//! Runnable programs showing `eventbus` in use; see the `examples` of this package:
//!
//! - `quickstart`: publishes the life of a few orders and consumes them in order per order.
//!
//! ```text
//! cargo run --example quickstart                 # in-memory backend, no broker needed
//! cargo run --example quickstart -- <url>        # another backend, by URL
//! ```
