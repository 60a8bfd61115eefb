//! Reading the sidecars' Prometheus pages.

use crate::Sidecar;

/// Fetches a Prometheus text page and returns the value of the first sample whose line
/// starts with `series` (name plus label set as printed), or None.
pub fn metric(page: &str, series_prefix: &str, must_contain: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(series_prefix) && must_contain.iter().all(|m| l.contains(m)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// A metric's value on a sidecar's /metrics (summed over matching series; 0 if none).
pub fn count(s: &Sidecar, series: &str, labels: &[&str]) -> f64 {
    metric(&s.metrics(), series, labels).unwrap_or(0.0)
}

/// `sigil_reloads_total` of `resource` (svid, bundle, policy, revocation) with `result`
/// (success, failure): what a test waits on after changing a watched file.
pub fn reloads(s: &Sidecar, resource: &str, result: &str) -> f64 {
    count(
        s,
        "sigil_reloads_total{",
        &[
            &format!("resource=\"{resource}\""),
            &format!("result=\"{result}\""),
        ],
    )
}

/// The `peer_id` label of `id`, as the sidecars print it.
pub fn peer(id: &str) -> String {
    format!("peer_id=\"{id}\"")
}
