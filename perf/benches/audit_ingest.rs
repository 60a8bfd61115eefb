//! Criterion benchmark of the control plane's audit ingest: one batch of 1,000 chained
//! connection records with its signed checkpoint, as a sidecar ships it, stored by
//! `sigil_control::audit_store::AuditStore::ingest` in a SQLite file on disk (one
//! transaction, committed with `synchronous=FULL`, as `sigil-control` runs it). Criterion
//! prints the rate in records per second (issue 16's goal: at least 50,000 per second).
//!
//! Each iteration ingests the next batch of the same sidecar's chain, so the store grows
//! through the run as it does in service. The same again into PostgreSQL (Debian's server,
//! started here on loopback, TLS, as several replicas share it), where it is installed. Run:
//! `cargo bench -p sigil-perf --bench audit_ingest`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rustls_pki_types::UnixTime;
use sigil_api::audit::{Batch, Checkpoint, Kind, Record, SCHEMA};
use sigil_api::Message;
use sigil_config::SpiffeId;
use sigil_control::audit_store::{AuditDb, AuditStore, PostgresSpec};
use sigil_filters::audit::{link, new_chain_id, sign_checkpoint, Hash, GENESIS};
use sigil_filters::LocalIdentity;
use sigil_testkit::Ca;

const ID: &str = "spiffe://example.org/ns/perf/sa/web";
const BATCH: u64 = 1_000;

/// A sidecar's chain: the next `BATCH` records, as it encodes, links and signs them.
struct Chain {
    identity: LocalIdentity,
    chain: String,
    seq: u64,
    head: Hash,
}

impl Chain {
    fn batch(&mut self) -> Batch {
        let mut records = Vec::with_capacity(BATCH as usize);
        for _ in 0..BATCH {
            self.seq += 1;
            let r = Record {
                schema: SCHEMA,
                seq: self.seq,
                prev: self.head.to_vec(),
                time_unix_nanos: 1_800_000_000_000_000_000 + self.seq as i64,
                kind: Kind::ConnectionClose as i32,
                direction: "inbound".into(),
                local_addr: "10.0.0.7:8443".into(),
                peer_addr: "10.0.0.9:51234".into(),
                local_id: ID.into(),
                peer_id: "spiffe://example.org/ns/perf/sa/client".into(),
                protocol: "tcp".into(),
                decision: "allow".into(),
                close_reason: "done".into(),
                bytes_in: 4_096,
                bytes_out: 65_536,
                duration_ms: 120,
                port: 8080,
                conn: self.seq,
                ..Record::default()
            }
            .encode_to_vec();
            self.head = link(self.seq, &self.head, &r);
            records.push(r);
        }
        Batch {
            records,
            checkpoints: vec![Checkpoint {
                seq: self.seq,
                head: self.head.to_vec(),
                signature: sign_checkpoint(&self.identity, self.seq, &self.head)
                    .expect("a P-256 SVID signs"),
                signer: self.identity.chain()[0].to_vec(),
            }],
            chain: self.chain.clone(),
        }
    }
}

fn ingest(c: &mut Criterion) {
    let dir = sigil_e2e::TempDir::new("bench-audit");
    let sqlite = AuditDb::Sqlite(dir.path().join("audit.db"));
    ingest_into(c, "ingest_batch_of_1000", &sqlite);
    let pg_dir = sigil_e2e::TempDir::new("bench-audit-pg");
    if let Some(pg) = sigil_e2e::PgServer::start(pg_dir.path(), "audit ingest bench") {
        let at = AuditDb::Postgres(PostgresSpec {
            url: pg.url(),
            ca: pg.ca_file.clone(),
            client: Some(pg.client.clone()),
        });
        ingest_into(c, "ingest_batch_of_1000_postgresql", &at);
    }
}

fn ingest_into(c: &mut Criterion, name: &str, at: &AuditDb) {
    let store = AuditStore::open(at).expect("open the audit store");
    let svid = Ca::new("example.org").svid(ID);
    let identity = LocalIdentity::from_pem(
        svid.chain_pem().as_bytes(),
        svid.key_pem().as_bytes(),
        UnixTime::now(),
        None,
        &sigil_filters::tls::provider(),
    )
    .expect("an SVID");
    let leaf = identity.chain()[0].to_vec();
    let id = SpiffeId::parse(ID).expect("SPIFFE ID");
    let mut chain = Chain {
        identity,
        chain: new_chain_id(),
        seq: 0,
        head: GENESIS,
    };
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(20).measurement_time(Duration::from_secs(15));
    g.bench_function(name, |b| {
        b.iter_batched(
            || chain.batch(),
            |batch| {
                let got = store.ingest(&id, &leaf, &batch).expect("ingest");
                assert_eq!(got.durable_through, batch_last(&batch));
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn batch_last(b: &Batch) -> u64 {
    b.checkpoints[0].seq
}

criterion_group!(benches, ingest);
criterion_main!(benches);
