//! Criterion benchmark of what an audited connection costs its sidecar for each record:
//! `sigil_proxy::audit::Auditor::record` of a connection close as the ledger makes it (stamped,
//! encoded, chained and written to the on-disk spool under its lock), into a spool in a
//! temporary directory large enough never to fill during the run. A connection writes two
//! (its open and its close) on each side. Run: `cargo bench -p sigil-perf --bench audit_record`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sigil_api::audit::{Kind, Record};
use sigil_config::proxy_config::{AuditRequests, AuditSpec, WhenFull};
use sigil_proxy::audit::Auditor;
use sigil_proxy::metrics::Metrics;

fn record(c: &mut Criterion) {
    let dir = sigil_e2e::TempDir::new("bench-audit-record");
    let spec = AuditSpec {
        spool_dir: dir.path().to_path_buf(),
        max_bytes: 4 << 30,
        when_full: WhenFull::FailOpen,
        requests: AuditRequests::Denied,
    };
    let auditor = Auditor::open(&spec, dir.path(), &Metrics::new(100)).expect("open the spool");
    let mut conn = 0u64;
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30).measurement_time(Duration::from_secs(10));
    g.bench_function("record_close", |b| {
        b.iter(|| {
            conn += 1;
            auditor.record(Record {
                kind: Kind::ConnectionClose as i32,
                direction: "inbound".into(),
                local_id: "spiffe://example.org/ns/perf/sa/web".into(),
                peer_id: "spiffe://example.org/ns/perf/sa/client".into(),
                close_reason: "done".into(),
                conn,
                duration_ms: 3,
                bytes_in: 512,
                bytes_out: 4_096,
                ..Record::default()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, record);
criterion_main!(benches);
