//! Our SVID and the trust bundles, read from files and re-read when they change.
//!
//! Files are polled rather than watched with inotify: polling sees every way of writing them
//! (in place, rename over, Kubernetes' `..data` symlink swap, a half-finished copy) with one
//! code path, and at 4 reads a second of a few KB it costs nothing. A change takes effect for
//! new handshakes at the next poll whose content is valid; an invalid state is logged and
//! counted once per distinct content and never replaces the last good one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::{ClientConfig, ServerConfig};
use sigil_config::proxy_config::SvidSource;
use sigil_config::{ProxyConfig, Revocation, SpiffeId, TrustDomain};
use sigil_filters::tls::{self, Carries};
use sigil_filters::{LocalIdentity, Revocations, TrustBundles};

pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One consistent set of TLS material. Replaced whole on any change; connections keep the
/// `Arc` they started with.
pub struct TlsState {
    pub identity: LocalIdentity,
    /// Our SPIFFE ID as a metrics label value, built once per SVID.
    pub local_label: Arc<str>,
    pub bundles: Arc<TrustBundles>,
    pub revocations: Arc<Revocations>,
    pub server: Arc<ServerConfig>,
    /// The control-plane snapshot version the bundles came with (0: files only): what a
    /// handshake verified with this state names in its audit records.
    pub bundle_version: u64,
    /// Client configs per expected peer ID and kind of traffic, built on first use.
    clients: Mutex<HashMap<SpiffeId, [Option<Arc<ClientConfig>>; 3]>>,
    provider: Arc<CryptoProvider>,
}

impl TlsState {
    fn new(
        identity: LocalIdentity,
        bundles: Arc<TrustBundles>,
        revocations: Arc<Revocations>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        let server = tls::server_config(
            &identity,
            bundles.clone(),
            revocations.clone(),
            provider.clone(),
        );
        Self {
            local_label: identity.id().as_str().into(),
            identity,
            bundles,
            revocations,
            server,
            bundle_version: 0,
            clients: Mutex::new(HashMap::new()),
            provider,
        }
    }

    pub fn client_config(&self, expected: &SpiffeId, carries: Carries) -> Arc<ClientConfig> {
        let slot = carries as usize;
        let mut clients = self.clients.lock().expect("client config lock");
        if let Some(c) = clients.get(expected).and_then(|kinds| kinds[slot].as_ref()) {
            return c.clone();
        }
        let c = tls::client_config(
            &self.identity,
            self.bundles.clone(),
            self.revocations.clone(),
            self.provider.clone(),
            expected.clone(),
            carries,
        );
        clients.entry(expected.clone()).or_default()[slot] = Some(c.clone());
        c
    }

    /// The revocation that covers our own SVID: while there is one, we present it to nobody.
    pub fn self_revoked(&self) -> Option<&Revocation> {
        let not_before = i64::try_from(self.identity.not_before()).unwrap_or(i64::MAX);
        self.revocations.covering(self.identity.id(), not_before)
    }

    /// Ready to serve: SVID unexpired and not revoked, and a non-empty bundle for our own
    /// trust domain.
    pub fn is_ready(&self, now: UnixTime) -> bool {
        self.self_revoked().is_none()
            && now.as_secs() < self.identity.not_after()
            && self
                .bundles
                .get(self.identity.id().trust_domain_name())
                .is_some_and(|b| !b.certs().is_empty())
    }
}

/// The files one proxy reads its identity from.
pub struct IdentityFiles {
    /// The SVID's files, or None when the control plane issues it (`issuance`), which puts
    /// each new one in force itself.
    svid: Option<(PathBuf, PathBuf)>,
    bundle_dir: PathBuf,
    /// `identity.spiffeId`: every SVID must carry it.
    expected: Option<SpiffeId>,
    /// Without `spiffeId`, the ID of the first SVID loaded, which later SVIDs must carry too
    /// unless `allowIdentityChange` is set (then None).
    pinned: Option<SpiffeId>,
    allow_change: bool,
}

/// Raw bytes last seen, to notice changes and to report each bad state only once.
#[derive(Default)]
pub struct Seen {
    svid: Option<(Vec<u8>, Vec<u8>)>,
    bundles: HashMap<PathBuf, Vec<u8>>,
    /// Last good bundle per domain, kept when its file turns bad.
    good_bundles: HashMap<TrustDomain, Vec<u8>>,
}

#[derive(Debug)]
pub enum Change {
    Svid(Result<LocalIdentity, FileProblem>),
    /// A new bundle set if the trusted content changed, and the problems met building it
    /// (bad files are left out, or replaced by their last good content).
    Bundles(Option<Arc<TrustBundles>>, Vec<FileProblem>),
}

/// What is wrong with an identity file; `Display` names the file.
#[derive(Debug)]
pub enum FileProblem {
    Unreadable(PathBuf, std::io::Error),
    /// The certificate and key do not make a valid SVID.
    Svid {
        cert: PathBuf,
        key: PathBuf,
        error: sigil_filters::IdentityError,
    },
    /// An SVID for another ID than the one this sidecar is pinned to.
    NotPinned {
        cert: PathBuf,
        id: SpiffeId,
        pinned: SpiffeId,
    },
    /// A bundle file whose name is not a trust domain.
    BundleName(PathBuf, sigil_config::SpiffeIdError),
    Bundle(PathBuf, sigil_filters::BundleError),
    /// A domain's bundle file went away; its last good content is still trusted.
    BundleGone(PathBuf, TrustDomain),
    /// No bundle at all at start.
    NoBundle(PathBuf),
    /// No SVID was read at start.
    NoSvid,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreadable(path, e) => write!(f, "{}: {e}", path.display()),
            Self::Svid { cert, key, error } => {
                write!(f, "{} / {}: {error}", cert.display(), key.display())
            }
            Self::NotPinned { cert, id, pinned } => write!(
                f,
                "{}: the SVID is for {id}, but this sidecar's identity is pinned to {pinned} \
                 (the first SVID it loaded): an SVID for another workload would take this \
                 workload out from under its policies. Restart the sidecar to change its \
                 identity, or set identity.allowIdentityChange: true",
                cert.display()
            ),
            Self::BundleName(path, e) => write!(
                f,
                "{}: file name is not a trust domain: {e}",
                path.display()
            ),
            Self::Bundle(path, e) => write!(f, "{}: {e}", path.display()),
            Self::BundleGone(dir, td) => write!(
                f,
                "{}: bundle file for {td} is gone; still trusting its last good content \
                 (write an empty file to distrust the domain)",
                dir.display()
            ),
            Self::NoBundle(dir) => write!(
                f,
                "{}: no trust bundle (<trust domain>.pem) found",
                dir.display()
            ),
            Self::NoSvid => f.write_str("no SVID read"),
        }
    }
}

impl IdentityFiles {
    pub fn from_config(cfg: &ProxyConfig) -> Self {
        let id = &cfg.spec.identity;
        let svid = match id.source() {
            SvidSource::Files { cert, key } => Some((cfg.resolve(&cert), cfg.resolve(&key))),
            SvidSource::Issued { .. } | SvidSource::WorkloadApi { .. } => None,
        };
        Self {
            svid,
            bundle_dir: cfg.resolve(&id.bundle_dir),
            expected: id.spiffe_id.clone(),
            pinned: None,
            allow_change: id.allow_identity_change,
        }
    }

    /// Initial load: every file must be valid, or the proxy does not start. Pins the
    /// sidecar's identity to this SVID's ID (see `pinned`).
    pub fn load(
        &mut self,
        seen: &mut Seen,
        provider: &Arc<CryptoProvider>,
    ) -> Result<TlsState, FileProblem> {
        let identity = match self.poll_svid(seen, provider) {
            Some(Ok(id)) => id,
            Some(Err(e)) => return Err(e),
            None => return Err(FileProblem::NoSvid),
        };
        self.load_with(identity, false, seen, provider)
    }

    /// Initial load with an SVID the control plane issued or a Workload API handed out: the
    /// bundle files must be valid, and there must be some unless `bundles_elsewhere` (the
    /// Workload API's). Pins the identity as `load` does.
    pub fn load_with(
        &mut self,
        identity: LocalIdentity,
        bundles_elsewhere: bool,
        seen: &mut Seen,
        provider: &Arc<CryptoProvider>,
    ) -> Result<TlsState, FileProblem> {
        if self.expected.is_none() && !self.allow_change {
            self.pinned = Some(identity.id().clone());
        }
        let (bundles, problems) = self.poll_bundles(seen).unwrap_or_default();
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
        let bundles = bundles.unwrap_or_default();
        if bundles.is_empty() && !bundles_elsewhere {
            return Err(FileProblem::NoBundle(self.bundle_dir.clone()));
        }
        Ok(TlsState::new(
            identity,
            bundles,
            Arc::default(),
            provider.clone(),
        ))
    }

    /// The trust bundles of the bundle directory as they are now, read on their own (a first
    /// SVID is asked for before the rest is loaded).
    pub fn bundles_now(&self) -> Result<Arc<TrustBundles>, FileProblem> {
        let (bundles, problems) = self.poll_bundles(&mut Seen::default()).unwrap_or_default();
        if let Some(p) = problems.into_iter().next() {
            return Err(p);
        }
        match bundles {
            Some(b) if !b.is_empty() => Ok(b),
            _ => Err(FileProblem::NoBundle(self.bundle_dir.clone())),
        }
    }

    /// The ID every SVID must carry (`identity.spiffeId`), if the config names one.
    pub fn expected(&self) -> Option<&SpiffeId> {
        self.expected.as_ref()
    }

    /// Re-reads the files; returns what changed since the last call.
    pub fn poll(&self, seen: &mut Seen, provider: &Arc<CryptoProvider>) -> Vec<Change> {
        let mut changes = Vec::new();
        if let Some(r) = self.poll_svid(seen, provider) {
            changes.push(Change::Svid(r));
        }
        if let Some((b, problems)) = self.poll_bundles(seen) {
            changes.push(Change::Bundles(b, problems));
        }
        changes
    }

    fn poll_svid(
        &self,
        seen: &mut Seen,
        provider: &Arc<CryptoProvider>,
    ) -> Option<Result<LocalIdentity, FileProblem>> {
        let (cert_path, key_path) = self.svid.as_ref()?;
        let cert = read(cert_path);
        let key = read(key_path);
        let (cert, key) = match (cert, key) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                // A missing file mid-rotation: report once, keep serving.
                let marker = (e.to_string().into_bytes(), Vec::new());
                if seen.svid.as_ref() == Some(&marker) {
                    return None;
                }
                seen.svid = Some(marker);
                return Some(Err(e));
            }
        };
        if seen
            .svid
            .as_ref()
            .is_some_and(|(c, k)| *c == cert && *k == key)
        {
            return None;
        }
        let result = LocalIdentity::from_pem(
            &cert,
            &key,
            UnixTime::now(),
            self.expected.as_ref(),
            provider,
        )
        .map_err(|error| FileProblem::Svid {
            cert: cert_path.clone(),
            key: key_path.clone(),
            error,
        })
        .and_then(|identity| match &self.pinned {
            Some(pinned) if identity.id() != pinned => Err(FileProblem::NotPinned {
                cert: cert_path.clone(),
                id: identity.id().clone(),
                pinned: pinned.clone(),
            }),
            _ => Ok(identity),
        });
        seen.svid = Some((cert, key));
        Some(result)
    }

    /// Rebuilds the bundle set if any file in the directory changed, appeared or went away.
    fn poll_bundles(
        &self,
        seen: &mut Seen,
    ) -> Option<(Option<Arc<TrustBundles>>, Vec<FileProblem>)> {
        let mut now: HashMap<PathBuf, Vec<u8>> = HashMap::new();
        let mut problems = Vec::new();
        match std::fs::read_dir(&self.bundle_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    // Skip editor temp files and Kubernetes' ..data plumbing.
                    if name.starts_with('.') || !name.ends_with(".pem") {
                        continue;
                    }
                    match std::fs::read(&path) {
                        Ok(b) => {
                            now.insert(path, b);
                        }
                        Err(e) => problems.push(FileProblem::Unreadable(path, e)),
                    }
                }
            }
            Err(e) => problems.push(FileProblem::Unreadable(self.bundle_dir.clone(), e)),
        }
        if now == seen.bundles && !seen.bundles.is_empty() {
            return None;
        }
        let mut bundles = TrustBundles::new();
        let mut good = HashMap::new();
        for (path, bytes) in &now {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let td = match TrustDomain::parse(&stem) {
                Ok(td) => td,
                Err(e) => {
                    problems.push(FileProblem::BundleName(path.clone(), e));
                    continue;
                }
            };
            match bundles.insert_pem(&td, bytes) {
                Ok(()) => {
                    good.insert(td, bytes.clone());
                }
                Err(e) => {
                    problems.push(FileProblem::Bundle(path.clone(), e));
                    // Keep trusting what this domain's file said when it was last valid.
                    if let Some(prev) = seen.good_bundles.get(&td) {
                        if bundles.insert_pem(&td, prev).is_ok() {
                            good.insert(td, prev.clone());
                        }
                    }
                }
            }
        }
        // A vanished file is more likely a rotation in progress than a decision: keep its
        // last good content. Distrusting a domain is done with an empty file.
        for (td, prev) in &seen.good_bundles {
            if !good.contains_key(td) && bundles.get(td.as_str()).is_none() {
                problems.push(FileProblem::BundleGone(self.bundle_dir.clone(), td.clone()));
                if bundles.insert_pem(td, prev).is_ok() {
                    good.insert(td.clone(), prev.clone());
                }
            }
        }
        let changed = good != seen.good_bundles;
        seen.bundles = now;
        seen.good_bundles = good;
        if !changed && problems.is_empty() {
            return None;
        }
        Some((changed.then(|| Arc::new(bundles)), problems))
    }
}

fn read(p: &Path) -> Result<Vec<u8>, FileProblem> {
    std::fs::read(p).map_err(|e| FileProblem::Unreadable(p.to_path_buf(), e))
}

/// The current TLS state, swapped whole on rotation.
pub struct Current(RwLock<Arc<TlsState>>);

impl Current {
    pub fn new(s: TlsState) -> Self {
        Self(RwLock::new(Arc::new(s)))
    }

    pub fn get(&self) -> Arc<TlsState> {
        self.0.read().expect("tls state lock").clone()
    }

    /// Applies a new SVID, keeping the bundles.
    pub fn set_identity(&self, identity: LocalIdentity) {
        let mut cur = self.0.write().expect("tls state lock");
        let provider = cur.provider.clone();
        *cur = Arc::new(TlsState {
            bundle_version: cur.bundle_version,
            ..TlsState::new(
                identity,
                cur.bundles.clone(),
                cur.revocations.clone(),
                provider,
            )
        });
    }

    /// Applies new bundles (of snapshot `version`), keeping the SVID.
    pub fn set_bundles(&self, bundles: Arc<TrustBundles>, version: u64) {
        let mut cur = self.0.write().expect("tls state lock");
        let provider = cur.provider.clone();
        *cur = Arc::new(TlsState {
            bundle_version: version,
            ..TlsState::new(
                cur.identity.clone(),
                bundles,
                cur.revocations.clone(),
                provider,
            )
        });
    }

    /// Applies a new set of revocations, keeping SVID and bundles.
    pub fn set_revocations(&self, revocations: Arc<Revocations>) {
        let mut cur = self.0.write().expect("tls state lock");
        let provider = cur.provider.clone();
        *cur = Arc::new(TlsState {
            bundle_version: cur.bundle_version,
            ..TlsState::new(
                cur.identity.clone(),
                cur.bundles.clone(),
                revocations,
                provider,
            )
        });
    }
}
