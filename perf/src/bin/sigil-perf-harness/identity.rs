//! The two workload identities every pair uses, and their certificate files.

use std::path::Path;

use sigil_e2e::write_identity;
use sigil_testkit::{Ca, SvidSpec};

const TRUST_DOMAIN: &str = "example.org";
pub const CLIENT_ID: &str = "spiffe://example.org/ns/perf/sa/client";
pub const SERVER_ID: &str = "spiffe://example.org/ns/perf/sa/server";
/// nginx cannot pin a SPIFFE URI SAN; the server SVID also carries this DNS SAN so that the
/// nginx client side can pin *something* (`proxy_ssl_name`). Sigil ignores DNS SANs.
pub const SERVER_DNS: &str = "server.perf.sigil.test";

/// client.crt/key + client-bundles/, server.crt/key + server-bundles/ in `dir`.
pub fn write_certs(dir: &Path) {
    let ca = Ca::new(TRUST_DOMAIN);
    write_identity(dir, "client", &ca, CLIENT_ID, &[&ca]);
    let mut spec = SvidSpec::new(SERVER_ID);
    spec.dns = vec![SERVER_DNS.to_string()];
    ca.issue(&spec).write(dir, "server");
    let bundles = dir.join("server-bundles");
    std::fs::create_dir_all(&bundles).expect("bundle dir");
    std::fs::write(bundles.join(format!("{TRUST_DOMAIN}.pem")), ca.bundle_pem())
        .expect("write bundle");
}
