//! Workload identities on disk: an SVID's certificate and key, and the trust bundles beside
//! them, written at test time and changed under a running sidecar.

use std::path::{Path, PathBuf};

use sigil_testkit::{Ca, Svid};

use crate::write_atomic;

/// Files of one workload identity: `<name>.crt`, `<name>.key` and a bundle directory with
/// one `<trust domain>.pem` per CA.
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle_dir: PathBuf,
}

impl IdentityFiles {
    /// Replaces the SVID with `svid`, each file whole (renamed over). The key first, so that a
    /// watcher never pairs the new certificate with the old key for long (such a pair is
    /// refused and read again).
    pub fn install_svid(&self, svid: &Svid) {
        write_atomic(&self.key, svid.key_pem().as_bytes());
        write_atomic(&self.cert, svid.chain_pem().as_bytes());
    }

    /// The bundle file of `trust_domain`.
    pub fn bundle(&self, trust_domain: &str) -> PathBuf {
        self.bundle_dir.join(format!("{trust_domain}.pem"))
    }

    /// Trusts `ca` for its trust domain from now on, in place of what was trusted there.
    pub fn trust(&self, ca: &Ca) {
        write_atomic(&self.bundle(ca.trust_domain()), ca.bundle_pem().as_bytes());
    }
}

pub fn write_identity(dir: &Path, name: &str, ca: &Ca, id: &str, trusted: &[&Ca]) -> IdentityFiles {
    let svid = ca.svid(id);
    let (cert, key) = svid.write(dir, name);
    let bundle_dir = dir.join(format!("{name}-bundles"));
    std::fs::create_dir_all(&bundle_dir).expect("bundle dir");
    let files = IdentityFiles {
        cert,
        key,
        bundle_dir,
    };
    for t in trusted {
        std::fs::write(files.bundle(t.trust_domain()), t.bundle_pem()).expect("write bundle");
    }
    files
}
