//! The control plane's certificate authority: a root made by `sigil ca init` (an ECDSA P-256
//! key and a self-signed certificate for one trust domain), loaded by `sigil-control`, which
//! signs X.509-SVIDs from checked CSRs (`sigil_filters::issuance`). The CA takes only the
//! CSR's public key; every field of the SVID is set here, per the X.509-SVID profile: one URI
//! SAN, a random 128-bit serial, digitalSignature, serverAuth and clientAuth, not a CA.
//!
//! Rotation (`sigil ca rotate`) makes the next CA beside the active one (`next.crt`,
//! `next.key`); `sigil-control` publishes it in its trust domain's bundle, makes it active once
//! every sidecar has that bundle, and keeps the previous certificate in the bundle
//! (`retired.crt`, until `retired.until`) for as long as SVIDs it signed may be valid. The
//! previous key is deleted when the next one becomes active.
//!
//! The private key stays in its file (mode 0600, in a 0700 directory) and in this process; it
//! is never logged, and a key file others can read is refused at load.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sigil_config::{SpiffeId, TrustDomain};
use sigil_filters::issuance::{CheckedCsr, Validity};

const CERT_FILE: &str = "ca.crt";
const KEY_FILE: &str = "ca.key";
const NEXT_CERT_FILE: &str = "next.crt";
const NEXT_KEY_FILE: &str = "next.key";
const RETIRED_CERT_FILE: &str = "retired.crt";
/// When the retired CA leaves the bundle: one RFC 3339 time.
const RETIRED_UNTIL_FILE: &str = "retired.until";
/// Chains of retired CAs, kept for the audit trail.
const FORMER_DIR: &str = "former";

/// Why the CA could not be made, loaded or used.
#[derive(Debug)]
pub enum CaError {
    /// `sigil ca init` into a directory that already holds a CA: it is never overwritten.
    Exists(PathBuf),
    Io(PathBuf, std::io::Error),
    /// A key file that others than its owner can read (its mode).
    KeyReadable(PathBuf, u32),
    /// An existing directory for a new CA that others can enter (its mode).
    DirOpen(PathBuf, u32),
    /// The CA certificate is not valid now (expired, or not yet valid): its bounds.
    NotValidNow(PathBuf, i64, i64),
    /// A file that is not what it should be (a PEM certificate, a P-256 key, the key of the
    /// certificate, a CA certificate).
    Invalid(PathBuf, String),
    /// Signing failed (rcgen's words).
    Sign(String),
    /// `sigil ca rotate` while a rotation is under way: the file that says so.
    Rotating(PathBuf),
}

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists(p) => write!(
                f,
                "{}: a CA is already there; it is never overwritten (move it away first)",
                p.display()
            ),
            Self::Io(p, e) => write!(f, "{}: {e}", p.display()),
            Self::KeyReadable(p, mode) => write!(
                f,
                "{}: the CA key is readable by others (mode {mode:o}); chmod 600 it",
                p.display()
            ),
            Self::DirOpen(p, mode) => write!(
                f,
                "{}: others can enter this directory (mode {mode:o}); give the CA a directory of its own (it is made with mode 0700)",
                p.display()
            ),
            Self::NotValidNow(p, from, to) => write!(
                f,
                "{}: the CA certificate is valid from {} to {}, not now; make a new CA (sigil ca init) and put it in the trust bundles",
                p.display(),
                sigil_config::policy::Timestamp(*from),
                sigil_config::policy::Timestamp(*to)
            ),
            Self::Invalid(p, why) => write!(f, "{}: {why}", p.display()),
            Self::Sign(e) => write!(f, "signing: {e}"),
            Self::Rotating(p) => write!(
                f,
                "{}: a rotation is under way; the next one can start once it has finished (sigil-control moves or removes this file; remove next.crt and next.key yourself to cancel one not yet active)",
                p.display()
            ),
        }
    }
}

impl std::error::Error for CaError {}

/// Where a CA directory keeps its certificate (public: the trust bundle) and key.
#[derive(Debug)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The active CA.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    /// The next CA, made by `rotate`.
    pub fn next_in(dir: &Path) -> Self {
        Self {
            cert: dir.join(NEXT_CERT_FILE),
            key: dir.join(NEXT_KEY_FILE),
        }
    }
}

/// Makes a root CA for `td` in `dir` (created 0700 if missing), valid from `now` (Unix
/// seconds) for `lifetime`. Refuses a directory that already holds one.
pub fn init(
    dir: &Path,
    td: &TrustDomain,
    now: i64,
    lifetime: Duration,
    upstream: Option<&Upstream>,
) -> Result<CaFiles, CaError> {
    let files = CaFiles::in_dir(dir);
    for p in [&files.cert, &files.key] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    match std::fs::metadata(dir) {
        // A directory of the operator's: used as it is if only its owner can enter it.
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            return Err(CaError::DirOpen(
                dir.to_path_buf(),
                m.permissions().mode() & 0o777,
            ))
        }
        Ok(_) => {}
        Err(_) => {
            std::fs::create_dir_all(dir).map_err(|e| CaError::Io(dir.to_path_buf(), e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| CaError::Io(dir.to_path_buf(), e))?;
        }
    }
    make_ca(&files, td, now, lifetime, upstream)?;
    Ok(files)
}

/// Makes the next CA of `dir` (`next.crt`, `next.key`), for the active CA's trust domain,
/// valid from `now` for `lifetime`, signed by `upstream` if the active one is. Refuses while a
/// rotation is under way.
pub fn rotate(
    dir: &Path,
    now: i64,
    lifetime: Duration,
    upstream: Option<&Upstream>,
) -> Result<CaFiles, CaError> {
    let active = Authority::load(dir)?;
    let files = CaFiles::in_dir(dir);
    match (active.above.is_empty(), upstream) {
        (true, Some(_)) => {
            return Err(CaError::Invalid(
                files.cert,
                "is a root of its own; the next CA is one too (no upstream CA)".into(),
            ))
        }
        (false, None) => {
            return Err(CaError::Invalid(
                files.cert,
                "is signed by an upstream CA; the next one must be too (give the upstream CA)"
                    .into(),
            ))
        }
        _ => {}
    }
    let next = CaFiles::next_in(dir);
    for p in [&next.cert, &next.key, &dir.join(RETIRED_CERT_FILE)] {
        if p.exists() {
            return Err(CaError::Rotating(p.clone()));
        }
    }
    make_ca(&next, active.trust_domain(), now, lifetime, upstream)?;
    Ok(next)
}

/// An operator's CA that signs this one (as SPIRE's disk UpstreamAuthority): its chain (its
/// own certificate first, up to its root) and its key. Read by `sigil ca init` and `rotate`
/// only: `sigil-control` never holds it.
pub struct Upstream {
    chain: Vec<CertificateDer<'static>>,
    key: KeyPair,
    not_after: i64,
}

impl Upstream {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let key_pem =
            std::fs::read_to_string(key).map_err(|e| CaError::Io(key.to_path_buf(), e))?;
        let key_pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Invalid(key.to_path_buf(), format!("not a private key: {e}")))?;
        let chain = read_chain(cert)?;
        let parsed = parse_all(cert, &chain)?;
        if !parsed[0].is_ca() {
            return Err(CaError::Invalid(
                cert.to_path_buf(),
                "not a CA certificate".into(),
            ));
        }
        if parsed[0].public_key().raw != key_pair.subject_public_key_info().as_slice() {
            return Err(CaError::Invalid(
                key.to_path_buf(),
                format!("not the key of {}", cert.display()),
            ));
        }
        let not_after = check_chain(cert, &parsed)?;
        Ok(Self {
            chain,
            key: key_pair,
            not_after,
        })
    }
}

/// The certificates of a PEM file, at least one.
/// The chains kept in `former/` (none if it is missing).
fn read_former(dir: &Path) -> Result<Vec<Vec<CertificateDer<'static>>>, CaError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CaError::Io(dir.to_path_buf(), e)),
    };
    let mut chains = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| CaError::Io(dir.to_path_buf(), e))?.path();
        if path.extension().is_some_and(|e| e == "crt") {
            chains.push(read_chain(&path)?);
        }
    }
    Ok(chains)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| CaError::Invalid(path.to_path_buf(), format!("no PEM certificate: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Invalid(path.to_path_buf(), format!("bad PEM: {e}")))?;
    if chain.is_empty() {
        return Err(CaError::Invalid(
            path.to_path_buf(),
            "no PEM certificate".into(),
        ));
    }
    Ok(chain)
}

fn parse_all<'a>(
    path: &Path,
    chain: &'a [CertificateDer<'static>],
) -> Result<Vec<x509_parser::certificate::X509Certificate<'a>>, CaError> {
    chain
        .iter()
        .enumerate()
        .map(|(i, c)| {
            x509_parser::parse_x509_certificate(c)
                .map(|(_, parsed)| parsed)
                .map_err(|e| {
                    CaError::Invalid(path.to_path_buf(), format!("certificate #{}: {e}", i + 1))
                })
        })
        .collect()
}

/// Each certificate of `chain` is signed by the next, the last by itself (a root), and all
/// are valid now; the earliest end of validity.
fn check_chain(
    path: &Path,
    chain: &[x509_parser::certificate::X509Certificate<'_>],
) -> Result<i64, CaError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut not_after = i64::MAX;
    for (i, c) in chain.iter().enumerate() {
        let signer = chain.get(i + 1).unwrap_or(c);
        if c.verify_signature(Some(signer.public_key())).is_err() {
            let why = if i + 1 == chain.len() {
                "is not self-signed: the chain must end with its root".to_string()
            } else {
                format!("is not signed by certificate #{}", i + 2)
            };
            return Err(CaError::Invalid(
                path.to_path_buf(),
                format!("certificate #{} {why}", i + 1),
            ));
        }
        let (from, to) = (
            c.validity().not_before.timestamp(),
            c.validity().not_after.timestamp(),
        );
        if now < from || now >= to {
            return Err(CaError::NotValidNow(path.to_path_buf(), from, to));
        }
        not_after = not_after.min(to);
    }
    Ok(not_after)
}

/// A CA for `td` in `files` (neither may exist yet): a self-signed root, or an intermediate
/// that `upstream` signs, whose certificate file then carries the upstream chain after it.
fn make_ca(
    files: &CaFiles,
    td: &TrustDomain,
    now: i64,
    lifetime: Duration,
    upstream: Option<&Upstream>,
) -> Result<(), CaError> {
    let until = now.saturating_add(secs(lifetime));
    if let Some(up) = upstream {
        if until > up.not_after {
            return Err(CaError::Sign(format!(
                "the upstream CA is valid until {}, before the end of the requested lifetime ({}); ask for a shorter --lifetime",
                sigil_config::policy::Timestamp(up.not_after),
                sigil_config::policy::Timestamp(until)
            )));
        }
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Sigil");
    let kind = if upstream.is_some() {
        "intermediate CA"
    } else {
        "root CA"
    };
    dn.push(DnType::CommonName, format!("{td} {kind}"));
    params.distinguished_name = dn;
    // The trust domain's own SPIFFE ID, as the X.509-SVID profile allows on signing
    // certificates: `load` reads which domain this CA signs for from it.
    let td_id = format!("spiffe://{td}")
        .try_into()
        .map_err(|_| CaError::Sign(format!("{td} is not an IA5 string")))?;
    params.subject_alt_names = vec![SanType::URI(td_id)];
    // It signs SVIDs directly: no CA below it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = offset(now)?;
    params.not_after = offset(until)?;
    let cert = match upstream {
        None => params.self_signed(&key),
        Some(up) => {
            params.use_authority_key_identifier_extension = true;
            let issuer = Issuer::from_ca_cert_der(&up.chain[0], &up.key)
                .map_err(|e| CaError::Sign(format!("the upstream CA: {e}")))?;
            params.signed_by(&key, &issuer)
        }
    }
    .map_err(|e| CaError::Sign(e.to_string()))?;
    if let Some(up) = upstream {
        check_under_upstream(td, cert.der(), &key, up, now)?;
    }
    let mut pem = cert.pem();
    for c in upstream.map_or(&[][..], |up| &up.chain[..]) {
        pem += &sigil_testkit::pem("CERTIFICATE", c);
    }
    // The key first, so that a failure leaves no certificate without its key.
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&files.cert, pem.as_bytes(), 0o644)
}

/// An SVID the new intermediate `cert` would sign must verify, with the sidecars' own
/// checks, against the upstream root alone: an upstream whose constraints (path length, key
/// usage) forbid it is refused here rather than after the rotation that would bring it in.
fn check_under_upstream(
    td: &TrustDomain,
    cert: &CertificateDer<'static>,
    key: &KeyPair,
    up: &Upstream,
    now: i64,
) -> Result<(), CaError> {
    use rustls::pki_types::UnixTime;
    let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
    let issuer = Issuer::from_ca_cert_der(cert, key).map_err(sign)?;
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign)?;
    let mut params = CertificateParams::default();
    let id = format!("spiffe://{td}/sigil/ca-check")
        .try_into()
        .map_err(|_| CaError::Sign(format!("{td} is not an IA5 string")))?;
    params.subject_alt_names = vec![SanType::URI(id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = offset(now)?;
    params.not_after = offset(now + 60)?;
    let leaf = params.signed_by(&leaf_key, &issuer).map_err(sign)?;
    let root = up.chain.last().expect("at least one");
    let mut rest = vec![cert.clone()];
    rest.extend(up.chain[..up.chain.len() - 1].iter().cloned());
    let mut bundles = sigil_filters::TrustBundles::new();
    bundles
        .insert_der(td, vec![root.clone()])
        .map_err(|e| CaError::Sign(format!("the upstream root: {e}")))?;
    let provider = sigil_filters::tls::provider();
    sigil_filters::svid::verify_svid(
        &bundles,
        &provider.signature_verification_algorithms,
        leaf.der(),
        &rest,
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64 + 1)),
        sigil_filters::svid::Usage::Client,
    )
    .map(|_| ())
    .map_err(|e| {
        CaError::Sign(format!(
            "an SVID this CA would sign does not verify against the upstream root: {e}"
        ))
    })
}

/// A loaded CA, ready to sign.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// What follows the leaf in an SVID's chain: this CA's certificate and the upstream
    /// intermediates, when an upstream CA signed it; empty for a root.
    above: Vec<CertificateDer<'static>>,
    /// The root of its chain (itself, or the upstream's): what trust bundles hold.
    anchor: CertificateDer<'static>,
    /// Unix seconds.
    not_after: i64,
    /// The domain whose SVIDs it signs.
    trust_domain: TrustDomain,
}

impl Authority {
    /// Loads the active CA of `dir` (see `init`).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        Self::load_files(&CaFiles::in_dir(dir))
    }

    /// Loads the CA of `files`.
    pub fn load_files(files: &CaFiles) -> Result<Self, CaError> {
        let mode = std::fs::metadata(&files.key)
            .map_err(|e| CaError::Io(files.key.clone(), e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyReadable(files.key.clone(), mode & 0o777));
        }
        let key_pem =
            std::fs::read_to_string(&files.key).map_err(|e| CaError::Io(files.key.clone(), e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Invalid(files.key.clone(), format!("not a private key: {e}")))?;
        if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Invalid(
                files.key.clone(),
                "not an ECDSA P-256 key".into(),
            ));
        }
        // Its own certificate, then (signed by an upstream CA) the chain up to the root.
        let chain = read_chain(&files.cert)?;
        let all = parse_all(&files.cert, &chain)?;
        let parsed = &all[0];
        if !parsed.is_ca() {
            return Err(CaError::Invalid(
                files.cert.clone(),
                "not a CA certificate".into(),
            ));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Invalid(
                files.key.clone(),
                format!("not the key of {}", files.cert.display()),
            ));
        }
        let not_after = check_chain(&files.cert, &all)?;
        let trust_domain = ca_trust_domain(parsed).ok_or_else(|| {
            CaError::Invalid(
                files.cert.clone(),
                "no URI SAN naming its trust domain (spiffe://<trust domain>)".into(),
            )
        })?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| CaError::Invalid(files.cert.clone(), e.to_string()))?;
        drop(all);
        let anchor = chain.last().expect("at least one").clone();
        // Sent after the leaf: every certificate but the root, which peers have in their
        // bundle (nothing for a CA that is its own root).
        let above = if chain.len() > 1 {
            chain[..chain.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        Ok(Self {
            issuer,
            cert: chain[0].clone(),
            above,
            anchor,
            not_after,
            trust_domain,
        })
    }

    /// The domain whose SVIDs this CA signs.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Unix seconds after which the CA signs nothing valid.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The CA's own certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The certificates sent after an SVID it signs: itself and upstream intermediates, not
    /// the root.
    pub fn above(&self) -> &[CertificateDer<'static>] {
        &self.above
    }

    /// The root its SVIDs chain to: what trust bundles of its domain must hold.
    pub fn anchor(&self) -> &CertificateDer<'static> {
        &self.anchor
    }

    /// Signs an X.509-SVID for `id` over `csr`'s key, valid over `v`. Returns the chain, leaf
    /// first, then the CA and upstream intermediates if any (the root is not part of it:
    /// peers have it in their bundle).
    pub fn issue(
        &self,
        csr: &CheckedCsr,
        id: &SpiffeId,
        v: Validity,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&csr.public_key_der)
            .map_err(|e| CaError::Sign(format!("the CSR's key: {e}")))?;
        let mut params = CertificateParams::default();
        // A Subject, so that the SAN need not be critical (RFC 5280 §4.2.1.6).
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sigil");
        params.distinguished_name = dn;
        let uri = id
            .as_str()
            .try_into()
            .map_err(|_| CaError::Sign(format!("{id} is not an IA5 string")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = offset(v.not_before)?;
        params.not_after = offset(v.not_after)?;
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.above.iter().cloned());
        Ok(chain)
    }
}

/// The root of a CA that signs no more, kept in the bundle until `until` (Unix seconds),
/// when the last SVID it signed has expired.
pub struct Retired {
    pub cert: CertificateDer<'static>,
    pub until: i64,
}

/// The CAs of a directory: the active one signs; the next one (after `sigil ca rotate`) and
/// the retired one are only in the trust bundle.
pub struct CaSet {
    pub active: Authority,
    pub next: Option<Authority>,
    pub retired: Option<Retired>,
    /// The chains of every CA this directory retired (`former/`), kept for the audit trail.
    pub former: Vec<Vec<CertificateDer<'static>>>,
}

impl CaSet {
    /// Loads every CA of `dir`, first finishing an activation that a crash interrupted.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let next_files = CaFiles::next_in(dir);
        let active_files = CaFiles::in_dir(dir);
        // `activate` moves the next key before the next certificate: `next.crt` alone, with
        // `ca.key` its key, means the move stopped half-way. Alone otherwise, it is a copy in
        // progress or a removed key: refused (the set loaded before stays in force).
        if next_files.cert.exists() && !next_files.key.exists() {
            if key_matches(&active_files.key, &next_files.cert) {
                rename(&next_files.cert, &active_files.cert)?;
            } else {
                return Err(CaError::Invalid(
                    next_files.cert,
                    format!(
                        "has no {} beside it (a copy still under way, or a removed key); copy both, or remove both to cancel the rotation",
                        next_files.key.display()
                    ),
                ));
            }
        }
        let active = Authority::load_files(&active_files)?;
        let next = if next_files.cert.exists() {
            let next = Authority::load_files(&next_files)?;
            if next.trust_domain() != active.trust_domain() {
                return Err(CaError::Invalid(
                    next_files.cert,
                    format!(
                        "signs for {}, not for {} as {} does",
                        next.trust_domain(),
                        active.trust_domain(),
                        active_files.cert.display()
                    ),
                ));
            }
            Some(next)
        } else {
            None
        };
        let retired_cert = dir.join(RETIRED_CERT_FILE);
        let retired = if retired_cert.exists() {
            let cert = CertificateDer::from_pem_file(&retired_cert).map_err(|e| {
                CaError::Invalid(retired_cert.clone(), format!("no PEM certificate: {e}"))
            })?;
            let until_file = dir.join(RETIRED_UNTIL_FILE);
            let text = std::fs::read_to_string(&until_file)
                .map_err(|e| CaError::Io(until_file.clone(), e))?;
            let until = sigil_config::policy::Timestamp::parse(text.trim())
                .map_err(|e| CaError::Invalid(until_file, e))?
                .0;
            Some(Retired { cert, until })
        } else {
            None
        };
        let former = read_former(&dir.join(FORMER_DIR))?;
        Ok(Self {
            active,
            next,
            retired,
            former,
        })
    }

    /// What SVIDs of this domain, past and present, verify against: every root the directory
    /// has held (the set's anchors and the former CAs' roots) and the intermediates between
    /// them and the SVIDs. For the audit trail, never for a trust bundle: a former root must
    /// not admit anyone today.
    pub fn ever(&self) -> (Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>) {
        let mut roots = self.anchors();
        let mut intermediates: Vec<CertificateDer<'static>> = self.active.above().to_vec();
        intermediates.extend(self.next.iter().flat_map(|n| n.above().iter().cloned()));
        for chain in &self.former {
            if let Some((root, above)) = chain.split_last() {
                if !roots.contains(root) {
                    roots.push(root.clone());
                }
                intermediates.extend(above.iter().cloned());
            }
        }
        (roots, intermediates)
    }

    /// The CAs' own certificates (active, next) and the retired anchor: what tells one set
    /// from another.
    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        let mut certs = vec![self.active.cert().clone()];
        certs.extend(self.next.iter().map(|n| n.cert().clone()));
        certs.extend(self.retired.iter().map(|r| r.cert.clone()));
        certs
    }

    /// The roots the set's SVIDs chain to (active, next, retired), each once: the trust
    /// bundle's share of it. CAs an upstream CA signs share its root.
    pub fn anchors(&self) -> Vec<CertificateDer<'static>> {
        let mut anchors: Vec<CertificateDer<'static>> = Vec::new();
        let all = std::iter::once(self.active.anchor())
            .chain(self.next.iter().map(|n| n.anchor()))
            .chain(self.retired.iter().map(|r| &r.cert));
        for a in all {
            if !anchors.contains(a) {
                anchors.push(a.clone());
            }
        }
        anchors
    }
}

/// Makes the next CA of `dir` the active one; the active one is retired, its certificate kept
/// until `until` (Unix seconds) and its key deleted.
pub fn activate(dir: &Path, until: i64) -> Result<(), CaError> {
    let active = CaFiles::in_dir(dir);
    let next = CaFiles::next_in(dir);
    let until_file = dir.join(RETIRED_UNTIL_FILE);
    let retired_cert = dir.join(RETIRED_CERT_FILE);
    let until_text = format!("{}\n", sigil_config::policy::Timestamp(until));
    replace(&until_file, until_text.as_bytes(), 0o644)?;
    // Its root is what stays in the bundle (its own certificate, or the upstream's root).
    let chain = read_chain(&active.cert)?;
    let root = chain.last().expect("at least one");
    replace(
        &retired_cert,
        sigil_testkit::pem("CERTIFICATE", root).as_bytes(),
        0o644,
    )?;
    // Its whole chain is kept for good in `former/`: the audit trail's checkpoints signed
    // with SVIDs it issued verify against it long after it left the bundle.
    let former = dir.join(FORMER_DIR);
    std::fs::create_dir_all(&former).map_err(|e| CaError::Io(former.clone(), e))?;
    let name = ring::digest::digest(&ring::digest::SHA256, &chain[0]);
    let name: String = name.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let pem: String = chain
        .iter()
        .map(|c| sigil_testkit::pem("CERTIFICATE", c))
        .collect();
    replace(&former.join(format!("{name}.crt")), pem.as_bytes(), 0o644)?;
    // The key first (it replaces the old one, which is gone from here on), then the
    // certificate; `CaSet::load` finishes the second move if a crash stopped between them.
    rename(&next.key, &active.key)?;
    rename(&next.cert, &active.cert)
}

/// Drops the retired CA of `dir` from the set.
pub fn drop_retired(dir: &Path) -> Result<(), CaError> {
    for f in [RETIRED_CERT_FILE, RETIRED_UNTIL_FILE] {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CaError::Io(p, e)),
        }
    }
    Ok(())
}

/// Whether the key in `key` is the key of the (first) certificate in `cert`.
fn key_matches(key: &Path, cert: &Path) -> bool {
    let Ok(pem) = std::fs::read_to_string(key) else {
        return false;
    };
    let Ok(key) = KeyPair::from_pem(&pem) else {
        return false;
    };
    let Ok(chain) = read_chain(cert) else {
        return false;
    };
    x509_parser::parse_x509_certificate(&chain[0])
        .is_ok_and(|(_, c)| c.public_key().raw == key.subject_public_key_info().as_slice())
}

fn rename(from: &Path, to: &Path) -> Result<(), CaError> {
    std::fs::rename(from, to).map_err(|e| CaError::Io(from.to_path_buf(), e))?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CaError::Io(dir.to_path_buf(), e))?;
    }
    Ok(())
}

/// Writes `path` whole through a temporary file beside it.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    rename(&tmp, path)
}

/// The trust domain a CA certificate names in its URI SAN.
fn ca_trust_domain(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<TrustDomain> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(uri) => TrustDomain::parse(uri).ok(),
        _ => None,
    })
}

/// A random positive 128-bit serial, as the SPIFFE X.509-SVID profile and RFC 5280 ask.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Sign("no system randomness".into()))?;
    // Keep the DER INTEGER positive, and never zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from(bytes.to_vec()))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn offset(unix: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| CaError::Sign(format!("time {unix}: {e}")))
}

/// Creates `path` with `mode`, failing if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CaError::Io(path.to_path_buf(), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| CaError::Io(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use sigil_filters::issuance::{check_csr, validity};
    use sigil_filters::svid::{verify_svid, Usage};
    use sigil_filters::{LocalIdentity, TrustBundles};
    use sigil_testkit::pem;

    const API: &str = "spiffe://example.org/api";

    /// A directory of this test's own, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("sigil-ca-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Self(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn now() -> i64 {
        UnixTime::now().as_secs() as i64
    }

    /// A sidecar's side: a P-256 key made here and a CSR for `id` over it.
    fn key_and_csr(id: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().der().to_vec();
        (key, csr)
    }

    #[test]
    fn an_issued_svid_passes_the_strict_checks_with_the_callers_own_key() {
        let dir = Dir::new("issue");
        let td = TrustDomain::parse("example.org").unwrap();
        let files = init(&dir.0, &td, now(), Duration::from_secs(86_400), None).unwrap();
        let key_mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let ca = Authority::load(&dir.0).unwrap();
        assert_eq!(ca.trust_domain(), &td);

        let id = SpiffeId::parse(API).unwrap();
        let (key, csr) = key_and_csr(API);
        let checked = check_csr(&csr, &id).unwrap();
        let v = validity(now(), Duration::from_secs(3600), ca.not_after()).unwrap();
        let chain = ca.issue(&checked, &id, v).unwrap();

        let mut bundles = TrustBundles::new();
        bundles
            .insert_pem(&td, pem("CERTIFICATE", ca.cert()).as_bytes())
            .unwrap();
        let provider = sigil_filters::tls::provider();
        let algs = &provider.signature_verification_algorithms;
        for usage in [Usage::Client, Usage::Server] {
            let verified = verify_svid(&bundles, algs, &chain[0], &[], UnixTime::now(), usage);
            assert_eq!(verified.unwrap(), id, "{usage:?}");
        }
        // The sidecar's own check of what it will present: the chain with its own key.
        let chain_pem: String = chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
        let local = LocalIdentity::from_pem(
            chain_pem.as_bytes(),
            key.serialize_pem().as_bytes(),
            UnixTime::now(),
            Some(&id),
            &provider,
        )
        .unwrap();
        assert_eq!(local.not_after() as i64, v.not_after);

        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let lifetime =
            leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600, "exactly the configured lifetime");
        let other = ca.issue(&checked, &id, v).unwrap();
        let (_, second) = x509_parser::parse_x509_certificate(&other[0]).unwrap();
        assert_ne!(leaf.raw_serial(), second.raw_serial(), "random serials");
        assert!(leaf.raw_serial().len() >= 16);
    }

    #[test]
    fn a_ca_is_never_overwritten_and_a_readable_key_is_refused() {
        let dir = Dir::new("guard");
        let td = TrustDomain::parse("example.org").unwrap();
        init(&dir.0, &td, now(), Duration::from_secs(86_400), None).unwrap();
        let again = init(&dir.0, &td, now(), Duration::from_secs(86_400), None).unwrap_err();
        assert!(matches!(again, CaError::Exists(_)), "{again}");
        let key = CaFiles::in_dir(&dir.0).key;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Authority::load(&dir.0).err().expect("refused");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: the CA key is readable by others (mode 644); chmod 600 it",
                key.display()
            )
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let (a, b) = (Dir::new("mix-a"), Dir::new("mix-b"));
        let td = TrustDomain::parse("example.org").unwrap();
        init(&a.0, &td, now(), Duration::from_secs(86_400), None).unwrap();
        init(&b.0, &td, now(), Duration::from_secs(86_400), None).unwrap();
        let (ka, kb) = (CaFiles::in_dir(&a.0).key, CaFiles::in_dir(&b.0).key);
        std::fs::remove_file(&ka).unwrap();
        std::fs::copy(&kb, &ka).unwrap();
        std::fs::set_permissions(&ka, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Authority::load(&a.0).err().expect("refused");
        assert!(e.to_string().contains("not the key of"), "{e}");
    }

    #[test]
    fn a_rotation_brings_the_next_ca_in_and_keeps_the_old_certificate_until_its_time() {
        let dir = Dir::new("rotate");
        let d = &dir.0;
        let td = TrustDomain::parse("example.org").unwrap();
        let hour = Duration::from_secs(3600);
        assert!(
            matches!(rotate(d, now(), hour, None), Err(CaError::Io(..))),
            "no CA to rotate"
        );
        init(d, &td, now(), hour, None).unwrap();
        let old = CaSet::load(d).unwrap().active.cert().clone();
        let next = rotate(d, now(), hour, None).unwrap();
        assert!(
            matches!(rotate(d, now(), hour, None), Err(CaError::Rotating(p)) if p == next.cert),
            "one rotation at a time"
        );
        let set = CaSet::load(d).unwrap();
        let new = set.next.as_ref().expect("the next CA").cert().clone();
        assert_eq!(set.certs(), [old.clone(), new.clone()]);
        assert_eq!(set.active.cert(), &old, "the old CA signs until activation");

        let until = now() + 70;
        activate(d, until).unwrap();
        let set = CaSet::load(d).unwrap();
        assert_eq!(set.active.cert(), &new);
        assert!(set.next.is_none());
        let retired = set.retired.as_ref().expect("the retired CA");
        assert_eq!((&retired.cert, retired.until), (&old, until));
        assert_eq!(set.certs(), [new.clone(), old.clone()]);
        assert!(
            matches!(rotate(d, now(), hour, None), Err(CaError::Rotating(p)) if p.ends_with(RETIRED_CERT_FILE)),
            "not while the retired CA is in the bundle"
        );
        drop_retired(d).unwrap();
        assert_eq!(CaSet::load(d).unwrap().certs(), std::slice::from_ref(&new));
        // Out of the bundle, but kept for the audit trail's signers.
        let (roots, _) = CaSet::load(d).unwrap().ever();
        assert!(
            roots.contains(&old) && roots.contains(&new),
            "{}",
            roots.len()
        );

        // `next.crt` copied before `next.key`: refused, nothing moved.
        let copying = rotate(d, now(), hour, None).unwrap();
        std::fs::remove_file(&copying.key).unwrap();
        let e = CaSet::load(d).err().expect("refused");
        assert!(e.to_string().contains("a copy still under way"), "{e}");
        assert!(copying.cert.exists());
        assert_eq!(Authority::load(d).unwrap().cert(), &new);
        std::fs::remove_file(&copying.cert).unwrap();

        // An activation stopped between moving the key and the certificate is finished at
        // load, with the key and the certificate of the next CA together.
        let third = rotate(d, now(), hour, None).unwrap();
        let third_cert = CaSet::load(d).unwrap().next.unwrap().cert().clone();
        std::fs::rename(&third.key, d.join(KEY_FILE)).unwrap();
        let set = CaSet::load(d).unwrap();
        assert_eq!(set.active.cert(), &third_cert);
        assert!(set.next.is_none() && !third.cert.exists());
    }

    /// An operator's root (no SPIFFE URI SAN, as an enterprise PKI's would be) in `dir`:
    /// its certificate and key files.
    /// An operator's intermediate with path length 0 under a root: its chain (itself, then
    /// the root) and its key.
    fn upstream_intermediate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (root_cert, root_key) = upstream_root(dir, &format!("{name}-root"));
        let root_der = read_chain(&root_cert).unwrap().remove(0);
        let root_key = KeyPair::from_pem(&std::fs::read_to_string(root_key).unwrap()).unwrap();
        let issuer = Issuer::from_ca_cert_der(&root_der, root_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} issuing CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(now() - 60).unwrap();
        params.not_after = offset(now() + 9 * 86_400).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem() + &pem("CERTIFICATE", &root_der)).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn upstream_root(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} corporate root"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(now() - 60).unwrap();
        params.not_after = offset(now() + 10 * 86_400).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn an_intermediate_signed_by_an_upstream_ca_issues_svids_that_chain_to_its_root() {
        let up = Dir::new("upstream");
        let dir = Dir::new("intermediate");
        let d = &dir.0;
        let td = TrustDomain::parse("example.org").unwrap();
        let (up_cert, up_key) = upstream_root(&up.0, "corp");
        let upstream = Upstream::load(&up_cert, &up_key).unwrap();
        let day = Duration::from_secs(86_400);
        let e = init(d, &td, now(), 20 * day, Some(&upstream)).unwrap_err();
        assert!(e.to_string().contains("shorter --lifetime"), "{e}");
        // An upstream intermediate that allows no CA below it: refused at init, nothing
        // written (peers would refuse every SVID of such a CA).
        let (tight_cert, tight_key) = upstream_intermediate(&up.0, "tight");
        let tight = Upstream::load(&tight_cert, &tight_key).unwrap();
        let e = init(d, &td, now(), day, Some(&tight)).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not verify against the upstream root"),
            "{e}"
        );
        assert!(!d.join(CERT_FILE).exists() && !d.join(KEY_FILE).exists());
        init(d, &td, now(), day, Some(&upstream)).unwrap();
        let ca = Authority::load(d).unwrap();
        let root = read_chain(&up_cert).unwrap().remove(0);
        assert_eq!(ca.anchor(), &root);
        assert_ne!(ca.cert(), &root);

        let id = SpiffeId::parse(API).unwrap();
        let (_key, csr) = key_and_csr(API);
        let checked = check_csr(&csr, &id).unwrap();
        let v = validity(now(), Duration::from_secs(3600), ca.not_after()).unwrap();
        let chain = ca.issue(&checked, &id, v).unwrap();
        assert_eq!(
            chain.len(),
            2,
            "the leaf and the intermediate; not the root"
        );
        assert_eq!(&chain[1], ca.cert());
        // Peers trust the upstream root alone.
        let mut bundles = TrustBundles::new();
        bundles
            .insert_pem(&td, pem("CERTIFICATE", &root).as_bytes())
            .unwrap();
        let provider = sigil_filters::tls::provider();
        let algs = &provider.signature_verification_algorithms;
        let verified = verify_svid(
            &bundles,
            algs,
            &chain[0],
            &chain[1..],
            UnixTime::now(),
            Usage::Client,
        );
        assert_eq!(verified.unwrap(), id);

        // The next CA must come from the upstream too; both share its root in the bundle.
        let e = rotate(d, now(), day, None).unwrap_err();
        assert!(e.to_string().contains("signed by an upstream CA"), "{e}");
        rotate(d, now(), day, Some(&upstream)).unwrap();
        let set = CaSet::load(d).unwrap();
        assert_eq!(set.anchors(), std::slice::from_ref(&root));
        assert_eq!(set.certs().len(), 2);
        activate(d, now() + 60).unwrap();
        let set = CaSet::load(d).unwrap();
        assert_eq!(set.retired.as_ref().unwrap().cert, root, "the retired root");
        assert_eq!(set.anchors(), [root]);

        // A key that is not the upstream certificate's; a chain that stops short of its root.
        let (other_cert, _) = upstream_root(&up.0, "other");
        let e = Upstream::load(&other_cert, &up_key).err().expect("refused");
        assert!(e.to_string().contains("not the key of"), "{e}");
        let inter = CaSet::load(d).unwrap().active.cert().clone();
        let inter_file = up.0.join("inter.crt");
        std::fs::write(&inter_file, pem("CERTIFICATE", &inter)).unwrap();
        std::fs::copy(d.join(KEY_FILE), up.0.join("inter.key")).unwrap();
        let e = Upstream::load(&inter_file, &up.0.join("inter.key"))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("must end with its root"), "{e}");
    }
}
