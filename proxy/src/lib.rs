//! The Sigil sidecar as a library: `sigil-proxy` (main.rs) parses its arguments and calls
//! `start::run`; the in-process tests drive the pool, the relay and both HTTP paths directly.
//! docs/architecture.md walks the rooms and the request and revocation paths.

pub mod admin;
pub mod admission;
pub mod alloc;
pub mod audit;
pub mod conns;
pub mod control;
pub mod dial;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inbound_http;
pub mod install;
pub mod issuance;
pub mod ledger;
pub mod listeners;
pub mod logs;
pub mod metrics;
pub mod outbound;
pub mod outbound_http;
pub mod pool;
pub mod proxy;
pub mod reasons;
pub mod relay;
pub mod resources;
pub mod shipper;
pub mod sources;
pub mod spool;
pub mod start;
pub mod watch;
pub mod workers;
pub mod workload;
pub mod workload_api;
pub mod workload_client;
