//! A throwaway certificate authority for tests, benchmarks and the quickstart: it mints
//! X.509-SVIDs at run time, well-formed ones and each kind of malformed one the verifier
//! must refuse. Nothing here is for production: keys live in memory and in test dirs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use rcgen;

pub mod http;

/// A CA for one trust domain (root or intermediate).
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Intermediates between a leaf this CA signs and the root, this CA's own cert first.
    chain: Vec<CertificateDer<'static>>,
}

impl Ca {
    /// A self-signed root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let params = ca_params(trust_domain, "root");
        let key = KeyPair::generate().expect("generate CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
            chain: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one (same trust domain).
    pub fn intermediate(&self) -> Self {
        let params = ca_params(&self.trust_domain, "intermediate");
        let key = KeyPair::generate().expect("generate intermediate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Self {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            cert: cert.der().clone(),
            chain,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The trust bundle to publish for this CA: its certificate, PEM.
    pub fn bundle_pem(&self) -> String {
        pem("CERTIFICATE", &self.cert)
    }

    /// A well-formed SVID for `id`, valid for an hour.
    pub fn svid(&self, id: &str) -> Svid {
        self.issue(&SvidSpec::new(id))
    }

    pub fn issue(&self, spec: &SvidSpec) -> Svid {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if !spec.empty_subject {
            dn.push(DnType::OrganizationName, "sigil test");
        }
        params.distinguished_name = dn;
        match spec.san_critical {
            // rcgen's own extension: critical exactly when the Subject is empty.
            None => {
                params.subject_alt_names = spec
                    .uris
                    .iter()
                    .map(|u| SanType::URI(u.as_str().try_into().expect("URI SAN is IA5")))
                    .chain(
                        spec.dns
                            .iter()
                            .map(|d| SanType::DnsName(d.as_str().try_into().expect("dns"))),
                    )
                    .chain(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)))
                    .collect();
            }
            Some(critical) => {
                assert!(
                    spec.ips.is_empty(),
                    "IP SANs only in rcgen's own SAN extension"
                );
                let mut ext = CustomExtension::from_oid_content(
                    &[2, 5, 29, 17],
                    san_der(&spec.uris, &spec.dns),
                );
                ext.set_criticality(critical);
                params.custom_extensions.push(ext);
            }
        }
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.ext_key_usages.clone();
        params.not_before = to_offset(spec.not_before);
        params.not_after = to_offset(spec.not_after);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Svid {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

fn ca_params(trust_domain: &str, role: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sigil test");
    dn.push(DnType::CommonName, format!("{trust_domain} {role} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = to_offset(now - Duration::from_secs(3600));
    params.not_after = to_offset(now + Duration::from_secs(30 * 24 * 3600));
    params.serial_number = Some(random_serial());
    params
}

/// A subjectAltName extension's value: URIs ([6]) and DNS names ([2]), DER.
fn san_der(uris: &[String], dns: &[String]) -> Vec<u8> {
    let mut names = Vec::new();
    for (tag, name) in uris
        .iter()
        .map(|u| (0x86, u))
        .chain(dns.iter().map(|d| (0x82, d)))
    {
        names.push(tag);
        der_len(&mut names, name.len());
        names.extend_from_slice(name.as_bytes());
    }
    let mut out = vec![0x30];
    der_len(&mut out, names.len());
    out.extend(names);
    out
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
}

/// What to put in a leaf. `new` gives a correct SVID; the setters break one rule each.
#[derive(Clone, Debug)]
pub struct SvidSpec {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    /// IP address SANs (a server certificate for a TLS service on loopback, say etcd's).
    pub ips: Vec<std::net::IpAddr>,
    pub is_ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub ext_key_usages: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// No Subject at all: the SAN alone names the certificate.
    pub empty_subject: bool,
    /// The SAN extension's criticality, when set by hand; None: rcgen's (critical exactly
    /// when the Subject is empty, as RFC 5280 asks).
    pub san_critical: Option<bool>,
}

impl SvidSpec {
    pub fn new(id: &str) -> Self {
        let now = SystemTime::now();
        Self {
            uris: vec![id.to_string()],
            dns: Vec::new(),
            ips: Vec::new(),
            is_ca: false,
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            ext_key_usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
            empty_subject: false,
            san_critical: None,
        }
    }

    /// No Subject: the SAN alone names the certificate.
    pub fn empty_subject(mut self) -> Self {
        self.empty_subject = true;
        self
    }

    /// Marks the SAN extension critical or not, whatever the Subject.
    pub fn san_critical(mut self, critical: bool) -> Self {
        self.san_critical = Some(critical);
        self
    }

    pub fn ips(mut self, ips: &[std::net::IpAddr]) -> Self {
        self.ips = ips.to_vec();
        self
    }

    pub fn uris(mut self, uris: &[&str]) -> Self {
        self.uris = uris.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn ca(mut self) -> Self {
        self.is_ca = true;
        self.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        self
    }

    pub fn key_usages(mut self, ku: Vec<KeyUsagePurpose>) -> Self {
        self.key_usages = ku;
        self
    }

    pub fn ext_key_usages(mut self, eku: Vec<ExtendedKeyUsagePurpose>) -> Self {
        self.ext_key_usages = eku;
        self
    }

    /// Valid from `from_now` (negative: in the past) for `lifetime`.
    pub fn validity(mut self, from_now: i64, lifetime: Duration) -> Self {
        let now = SystemTime::now();
        self.not_before = if from_now >= 0 {
            now + Duration::from_secs(from_now as u64)
        } else {
            now - Duration::from_secs(from_now.unsigned_abs())
        };
        self.not_after = self.not_before + lifetime;
        self
    }

    /// Expired an hour ago.
    pub fn expired(self) -> Self {
        self.validity(-7200, Duration::from_secs(3600))
    }
}

/// A leaf certificate chain and its private key.
pub struct Svid {
    /// Leaf first, then intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Svid {
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| pem("CERTIFICATE", c)).collect()
    }

    pub fn key_pem(&self) -> String {
        pem("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Writes `<name>.crt` and `<name>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&crt, self.chain_pem()).expect("write cert");
        write_private(&key, self.key_pem().as_bytes());
        (crt, key)
    }
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("open key file");
    f.write_all(bytes).expect("write key file");
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system randomness");
    bytes[0] &= 0x7f; // keep the DER INTEGER positive
    SerialNumber::from(bytes.to_vec())
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).expect("representable time")
}

/// What a sidecar asking for an SVID makes: a key of `alg` (PKCS#8 PEM, to keep) and a CSR
/// over it naming `uris` (DER, to send).
pub fn key_and_csr(alg: &'static rcgen::SignatureAlgorithm, uris: &[&str]) -> (String, Vec<u8>) {
    let key = KeyPair::generate_for(alg).expect("generate key");
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("URI SAN is IA5")))
        .collect();
    let csr = params.serialize_request(&key).expect("make a CSR");
    (key.serialize_pem(), csr.der().to_vec())
}
