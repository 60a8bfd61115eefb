//! Helpers of the load harness (`src/bin/sigil-perf-harness/`): reading `/proc`, running
//! and parsing `wrk` and `h2load`, a bounded bulk-transfer client, the generated policy set of
//! the L7 measurement, nginx config rendering, medians; and the renewal storm of
//! `sigil-control-load --renewals` (`renewals`).
//! The criterion micro-benchmarks are in `benches/hot_path.rs`; see README.md for both.

pub mod bulk;
pub mod h2load;
pub mod policies;
pub mod procfs;
pub mod render;
pub mod renewals;
pub mod stats;
pub mod wrk;
