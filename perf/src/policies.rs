//! The policy set of the L7 measurement: `total` Policy documents, `own` of them targeting
//! the server sidecar's workload, the rest targeting other workloads of the mesh (a sidecar
//! reads the whole directory and keeps what targets itself).
//!
//! Policy 0 is the benchmark grant: `GET /api/v1/orders/{id}` on the workload's HTTP port is
//! allowed to the benchmark client. The other policies on the server carry routes that share
//! the request's path prefix (`/api`, `/api/v1`, `/api/v1/orders`), with host, method, header
//! and dry-run conditions that do not apply to the client, so every request walks a populated
//! part of the route trie. Nothing else allows the client: any other path is default-denied.

/// The path every load generator requests (on every path under test).
pub const BENCH_PATH: &str = "/api/v1/orders/42";
/// Matched by the benchmark route; the backend answers it with the `x-sigil-peer-id` it got.
pub const WHOAMI_PATH: &str = "/api/v1/orders/whoami";
/// No route allows the client here: the L7 sidecar must answer 403.
pub const DENIED_PATH: &str = "/api/v1/payments/7";
/// `policy/rule` label of the benchmark grant in `sigil_requests_total`.
pub const BENCH_ROUTE: &str = "server-0000/read-orders";
/// The YAML parser refuses more than 1,024 documents per stream; stay well below.
pub const MAX_PER_FILE: usize = 500;

/// One `(file name, YAML text)` per file, at most `per_file` documents each.
pub fn generate(
    server: &str,
    client: &str,
    port: u16,
    total: usize,
    own: usize,
    per_file: usize,
) -> Vec<(String, String)> {
    assert!(own >= 1 && own <= total, "own policies: 1..=total");
    assert!((1..=MAX_PER_FILE).contains(&per_file));
    let docs: Vec<String> = (0..total)
        .map(|i| {
            if i == 0 {
                bench_grant(server, client, port)
            } else if i < own {
                server_policy(server, port, i)
            } else {
                other_policy(i)
            }
        })
        .collect();
    docs.chunks(per_file)
        .enumerate()
        .map(|(n, chunk)| (format!("policies-{n:02}.yaml"), chunk.concat()))
        .collect()
}

fn header(name: &str, owner: &str, purpose: &str, target: &str) -> String {
    format!(
        "---\napiVersion: sigil.dev/v1\nkind: Policy\n\
         metadata: {{name: {name}, owner: {owner}, purpose: \"{purpose}\"}}\n\
         spec:\n  target: {target}\n"
    )
}

fn bench_grant(server: &str, client: &str, port: u16) -> String {
    header(
        "server-0000",
        "team-orders",
        "perf: the benchmark client reads orders",
        server,
    ) + &format!(
        "  ports:\n    - port: {port}\n      protocol: http\n      routes:\n\
         \x20       - {{name: read-orders, match: {{methods: [GET], path: {{template: \"/api/v1/orders/{{id}}\"}}}}, \
         allow: [\"{client}\", \"spiffe://example.org/ns/web/*\"], deny: [spiffe://example.org/ns/web/sa/sandbox]}}\n\
         \x20       - {{name: list-orders, match: {{methods: [GET], path: {{exact: /api/v1/orders}}}}, allow: [\"{client}\"]}}\n"
    )
}

/// Grants of other callers on the server's API. Team `t` owns client `c{i}`.
fn server_policy(server: &str, port: u16, i: usize) -> String {
    let t = i % 40;
    let caller = format!("spiffe://example.org/ns/team{t}/sa/c{i}");
    let mut s = header(
        &format!("server-{i:04}"),
        &format!("team-{t}"),
        "perf: grants of team callers on the server API",
        server,
    );
    if i.is_multiple_of(20) {
        s += "  expiresAt: 2099-01-01T00:00:00Z\n";
    }
    s += &format!(
        "  ports:\n    - port: {port}\n      protocol: http\n      routes:\n\
         \x20       - {{name: svc, match: {{methods: [GET, POST], path: {{prefix: /svc{i}/v1}}}}, \
         allow: [{caller}, \"spiffe://example.org/ns/ops/*\"], deny: [spiffe://example.org/ns/ops/sa/intern]}}\n\
         \x20       - {{name: item, match: {{path: {{template: \"/svc{i}/v1/items/{{id}}\"}}, headers: [{{name: x-tenant, value: t{t}}}]}}, allow: [{caller}]}}\n\
         \x20       - {{name: res, match: {{methods: [GET], path: {{prefix: /api/v1/res{i}}}}}, allow: [{caller}]}}\n"
    );
    if i.is_multiple_of(7) {
        s += &format!(
            "        - {{name: health, match: {{path: {{exact: /svc{i}/health}}}}, allow: [\"spiffe://example.org/*\"], mode: dry-run}}\n"
        );
    }
    if i.is_multiple_of(50) {
        // Prefix routes above the benchmark path: evaluated on every request, never matching.
        s += &format!(
            "        - {{name: api-host, match: {{hosts: [svc{i}.internal], path: {{prefix: /api}}}}, allow: [{caller}]}}\n\
             \x20       - {{name: orders-audit, match: {{methods: [GET], path: {{prefix: /api/v1/orders}}}}, \
             allow: [\"spiffe://example.org/ns/audit/*\"], mode: dry-run}}\n"
        );
    }
    if i.is_multiple_of(10) {
        s += &format!(
            "    - port: 5432\n      protocol: tcp\n      rules: [{{name: db, allow: [{caller}]}}]\n"
        );
    }
    s
}

/// A policy of some other workload of the mesh: ignored by the server's sidecar.
fn other_policy(i: usize) -> String {
    let t = i % 40;
    let caller = format!("spiffe://example.org/ns/team{}/sa/c{i}", (t + 1) % 40);
    header(
        &format!("svc-{i:04}"),
        &format!("team-{t}"),
        "perf: a grant of another workload",
        &format!("spiffe://example.org/ns/team{t}/sa/svc{i}"),
    ) + &format!(
        "  ports:\n    - port: 8080\n      routes:\n\
         \x20       - {{name: list, match: {{methods: [GET], path: {{prefix: /v1/res{i}}}}}, \
         allow: [{caller}, \"spiffe://example.org/ns/ops/*\"], deny: [spiffe://example.org/ns/ops/sa/intern]}}\n\
         \x20       - {{name: item, match: {{path: {{template: \"/v1/res{i}/{{id}}\"}}, headers: [{{name: x-tenant, value: t{t}}}]}}, allow: [{caller}]}}\n\
         \x20   - port: 5432\n      protocol: tcp\n      rules: [{{name: db, allow: [{caller}]}}]\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_config::{Policy, SpiffeId};
    use sigil_filters::{HttpRequest, PolicyIndex};
    use std::path::Path;

    const SERVER: &str = "spiffe://example.org/ns/perf/sa/server";
    const CLIENT: &str = "spiffe://example.org/ns/perf/sa/client";

    #[test]
    fn generated_set_loads_and_decides() {
        let files = generate(SERVER, CLIENT, 18080, 1200, 300, MAX_PER_FILE);
        assert_eq!(files.len(), 3);
        let mut all = Vec::new();
        for (name, text) in &files {
            let ps = Policy::parse_all(Path::new(name), text).expect("valid policies");
            assert!(ps.len() <= MAX_PER_FILE);
            all.extend(ps);
        }
        assert_eq!(all.len(), 1200);
        let server = SpiffeId::parse(SERVER).unwrap();
        let own = all.iter().filter(|p| p.spec.target == server).count();
        assert_eq!(own, 300);

        let idx = PolicyIndex::compile(&all, &server);
        assert!(idx.is_http(18080));
        let client = SpiffeId::parse(CLIENT).unwrap();
        let stranger = SpiffeId::parse("spiffe://example.org/ns/team3/sa/c3").unwrap();
        let decide = |peer: &SpiffeId, method: &str, path: &str| {
            let d = idx.decide_http(&HttpRequest {
                peer,
                port: 18080,
                method,
                host: "127.0.0.1:18080",
                path,
                header: |_: &str| None,
                now: 1_790_000_000,
            });
            (d.allowed, idx.label(&d.rule).to_string(), d.would_deny)
        };
        let (ok, label, would) = decide(&client, "GET", BENCH_PATH);
        assert!(ok);
        assert_eq!(label, BENCH_ROUTE);
        assert!(
            would.is_none(),
            "the benchmark request must not hit dry-run rules"
        );
        assert!(decide(&client, "GET", WHOAMI_PATH).0);
        assert!(!decide(&client, "GET", DENIED_PATH).0);
        assert!(!decide(&client, "POST", BENCH_PATH).0);
        assert!(!decide(&stranger, "GET", BENCH_PATH).0);
        assert!(decide(&stranger, "GET", "/api/v1/res3/x").0);
    }
}
