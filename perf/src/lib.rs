//! Helpers of the load harness (`src/bin/sigil-perf-harness.rs`): reading `/proc`, running
//! and parsing `wrk`, a bounded bulk-transfer client, nginx config rendering, medians.
//! The criterion micro-benchmarks are in `benches/hot_path.rs`; see README.md for both.

pub mod bulk;
pub mod procfs;
pub mod render;
pub mod stats;
pub mod wrk;
