//! Issuing SVIDs (`sigil.v1.Identity/Issue`): who the caller is, whether it may have an SVID
//! now, and the SVID. The caller is authenticated by the SVID it presented (a renewal: the
//! same identity again) or, without one, by a one-time join token bound to one Workload
//! (first contact). Then the Workload must exist (and so have an owner and a purpose, which
//! its loader requires), its identity must not be revoked (a renewal also not with an SVID
//! issued before an `issuedBefore` cut-off), and the CSR must pass
//! `sigil_filters::issuance::check_csr` for that identity. The SVID lives exactly the
//! Workload's `svidTtl` (1 h by default).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use sigil_api::{Bundle, IssueRequest, IssueResponse};
use sigil_config::SpiffeId;
use sigil_filters::issuance::{check_csr, validity, CsrRefusal, LifetimeRefusal, DEFAULT_TTL};
use tokio::sync::watch;

use crate::ca::{CaError, CaSet};
use crate::snapshot::Catalog;
use crate::store::Store;
use crate::stored::{StoreError, TokenRecord, TokenUse};

/// A join token's length in bytes (hex on the wire): 256 bits, not guessable.
const TOKEN_BYTES: usize = 32;
/// How long an issuance waits for this replica's catalog to learn of a token's Workload.
const CATALOG_LAG: Duration = Duration::from_secs(2);

pub struct Issuer {
    /// The CAs in force (`rotation::follow`): the active one signs.
    pub cas: watch::Receiver<Arc<CaSet>>,
    pub store: Arc<Store>,
    /// The catalog in force (`Hub::catalog`): Workloads and revocations.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Identities no Workload may be issued: the control plane's own, and what `--operator`
    /// admits. A Workload carrying one would make a join token worth the control plane's
    /// identity, or operator access.
    pub reserved: Vec<sigil_config::IdPattern>,
    /// Where every decision goes, for the audit stream.
    pub records: crate::records::Recorder<crate::stored::IssuanceRecord>,
    /// The latest expiry signed by the active CA (Unix seconds), for its retirement.
    pub issued_until: Arc<std::sync::atomic::AtomicI64>,
}

/// How the caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// It presented a verified SVID (the leaf, for the revocation check).
    Svid(SpiffeId, CertificateDer<'static>),
    /// It presented none: only a join token can say who it is.
    Anonymous,
}

/// An SVID issued: for whom, under which Workload, its serial (hex) and validity.
#[derive(Debug, Clone)]
pub struct Issued {
    pub id: SpiffeId,
    pub workload: String,
    pub serial: String,
    pub not_after: i64,
    /// How the caller came by it.
    pub basis: Basis,
    pub response: IssueResponse,
}

/// What an issuance rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// First contact: a join token bound to this Workload.
    Token(String),
    /// A renewal: the caller's own SVID, for its own identity.
    Renewal,
    /// For a workload the caller's Workload API serves (its `workloadApi.sidecar`): this one.
    WorkloadApi(String),
}

impl Basis {
    /// The metric's `result` for an SVID issued on this basis.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Token(_) => "first",
            Self::Renewal => "renewal",
            Self::WorkloadApi(_) => "workload_api",
        }
    }
}

/// Why no SVID was issued. `label()` is the metric's reason; `Display` goes to the caller
/// and the log.
#[derive(Debug)]
pub enum Refused {
    /// No SVID presented and no join token.
    NoCredential,
    /// A join token and an SVID both: one or the other.
    TokenWithSvid,
    Token(TokenUse),
    /// A token bound to a Workload that is no longer stored.
    UnknownWorkload(String),
    /// An SVID whose identity no Workload has.
    NoWorkloadFor(SpiffeId),
    /// A Workload the caller's Workload API does not serve (or none of that name).
    NotServedBy {
        workload: String,
        caller: SpiffeId,
    },
    /// A renewal by a Workload that a sidecar's Workload API serves: only that sidecar asks.
    ServedByWorkloadApi {
        id: SpiffeId,
        sidecar: SpiffeId,
    },
    /// An identity of another trust domain than the CA's.
    OtherDomain(SpiffeId),
    /// The SVID presented for a renewal has expired (its connection outlived it).
    ExpiredSvid(SpiffeId),
    /// The control plane's own identity, or one the operator API admits.
    Reserved(SpiffeId),
    Revoked {
        id: SpiffeId,
        revocation: String,
        reason: String,
    },
    Csr(CsrRefusal),
    Lifetime(LifetimeRefusal),
    Store(StoreError),
    Sign(CaError),
}

impl Refused {
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoCredential => "no_credential",
            Self::TokenWithSvid => "token_with_svid",
            Self::Token(TokenUse::Unknown) => "token_unknown",
            Self::Token(TokenUse::Reused(_)) => "token_reused",
            Self::Token(TokenUse::Expired(_)) => "token_expired",
            Self::Token(TokenUse::Taken(_)) => "token_taken",
            Self::UnknownWorkload(_) | Self::NoWorkloadFor(_) => "unknown_workload",
            Self::NotServedBy { .. } => "not_served_by_caller",
            Self::ServedByWorkloadApi { .. } => "served_by_workload_api",
            Self::OtherDomain(_) => "other_trust_domain",
            Self::ExpiredSvid(_) => "expired_svid",
            Self::Reserved(_) => "reserved_identity",
            Self::Revoked { .. } => "revoked",
            Self::Csr(e) => e.label(),
            Self::Lifetime(_) => "lifetime",
            Self::Store(_) => "store_error",
            Self::Sign(_) => "sign_error",
        }
    }

    /// The gRPC status code: the caller's fault, or ours (worth a retry).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Store(_) | Self::Sign(_) => tonic::Code::Unavailable,
            Self::Csr(_) => tonic::Code::InvalidArgument,
            Self::Lifetime(_) => tonic::Code::FailedPrecondition,
            Self::NoCredential => tonic::Code::Unauthenticated,
            _ => tonic::Code::PermissionDenied,
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCredential => f.write_str(
                "no SVID presented and no join token: first contact needs a token (sigil token create)",
            ),
            Self::TokenWithSvid => {
                f.write_str("a join token with an SVID: renewals are authenticated by the SVID alone")
            }
            Self::Token(TokenUse::Unknown) => f.write_str("the join token is not known"),
            Self::Token(TokenUse::Reused(at)) => write!(
                f,
                "the join token was already used, at {}; make a new one (sigil token create)",
                rfc3339(*at)
            ),
            Self::Token(TokenUse::Expired(at)) => write!(
                f,
                "the join token expired at {}; make a new one (sigil token create)",
                rfc3339(*at)
            ),
            Self::Token(TokenUse::Taken(w)) => write!(f, "the join token for {w} was taken"),
            Self::UnknownWorkload(name) => write!(
                f,
                "the join token is for Workload {name:?}, which is not stored (any more)"
            ),
            Self::NoWorkloadFor(id) => write!(f, "no Workload has the identity {id}"),
            Self::ServedByWorkloadApi { id, sidecar } => write!(
                f,
                "{id} gets its SVIDs from the Workload API of {sidecar} only; it does not renew them itself"
            ),
            Self::NotServedBy { workload, caller } => write!(
                f,
                "no Workload {workload:?} is served by the Workload API of {caller} (its spec.workloadApi.sidecar)"
            ),
            Self::OtherDomain(id) => {
                write!(f, "{id} is not of the trust domain this CA signs for")
            }
            Self::Reserved(id) => write!(
                f,
                "{id} is the control plane's own identity or an operator's: no Workload may be issued it"
            ),
            Self::ExpiredSvid(id) => write!(
                f,
                "the SVID presented for {id} has expired; a new join token is needed"
            ),
            Self::Revoked {
                id,
                revocation,
                reason,
            } => write!(f, "{id} is revoked (Revocation {revocation}: {reason})"),
            Self::Csr(e) => write!(f, "{e}"),
            Self::Lifetime(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "{e}"),
            Self::Sign(e) => write!(f, "{e}"),
        }
    }
}

/// A new join token: the token (shown once, to the operator) and the hash the store keeps.
pub fn new_token() -> (String, String) {
    let token = crate::stored::random_hex(TOKEN_BYTES);
    let hash = token_hash(&token);
    (token, hash)
}

/// What the store keeps of a token: its SHA-256, hex. A stolen store copy gives no token.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes a join token for the Workload `workload`, valid for `ttl` from `now`.
pub async fn create_token(
    store: &Store,
    catalog: &Catalog,
    workload: &str,
    ttl: Duration,
    now: i64,
) -> Result<String, Refused> {
    if catalog.workload_named(workload).is_none() {
        return Err(Refused::UnknownWorkload(workload.to_string()));
    }
    let (token, hash) = new_token();
    let record = TokenRecord {
        workload: workload.to_string(),
        expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        used_at: None,
    };
    store
        .create_token(&hash, &record, now)
        .await
        .map_err(Refused::Store)?;
    Ok(token)
}

impl Issuer {
    /// Decides and, if allowed, signs. `now`: Unix seconds.
    pub async fn issue(
        &self,
        caller: &Caller,
        req: &IssueRequest,
        now: i64,
    ) -> Result<Issued, Refused> {
        // A token is only looked at here; it is spent once everything else is known to be
        // in order, so that a refused CSR or a misconfigured sidecar does not burn it.
        let basis = self.authenticate(caller, req, now).await?;
        let catalog = match &basis {
            Basis::Token(name) | Basis::WorkloadApi(name) => self.catalog_knowing(name).await,
            Basis::Renewal => self.catalog.borrow().clone(),
        };
        let workload = match (&basis, caller) {
            (Basis::Token(name), _) => catalog
                .workload_named(name)
                .ok_or_else(|| Refused::UnknownWorkload(name.clone()))?,
            (Basis::WorkloadApi(name), Caller::Svid(sidecar, _)) => catalog
                .workload_named(name)
                .filter(|w| w.spec.workload_api.as_ref().map(|s| &s.sidecar) == Some(sidecar))
                .ok_or_else(|| Refused::NotServedBy {
                    workload: name.clone(),
                    caller: sidecar.clone(),
                })?,
            (Basis::Renewal, Caller::Svid(id, _)) => {
                let w = catalog
                    .workload_for(id)
                    .ok_or_else(|| Refused::NoWorkloadFor(id.clone()))?;
                // Its SVIDs go through its sidecar's Workload API alone, so that moving it to
                // another sidecar or changing its selectors takes effect.
                if let Some(served) = &w.spec.workload_api {
                    return Err(Refused::ServedByWorkloadApi {
                        id: id.clone(),
                        sidecar: served.sidecar.clone(),
                    });
                }
                w
            }
            (_, Caller::Anonymous) => return Err(Refused::NoCredential),
        };
        let id = &workload.spec.spiffe_id;
        let cas = self.cas.borrow().clone();
        let ca = &cas.active;
        if id.trust_domain_name() != ca.trust_domain().as_str() {
            return Err(Refused::OtherDomain(id.clone()));
        }
        if self.reserved.iter().any(|p| p.matches(id)) {
            return Err(Refused::Reserved(id.clone()));
        }
        let csr = check_csr(&req.csr, id).map_err(Refused::Csr)?;
        let ttl = workload.spec.svid_ttl.unwrap_or(DEFAULT_TTL);
        let v = validity(now, ttl, ca.not_after()).map_err(Refused::Lifetime)?;
        check_revoked(&catalog, caller, id, v.not_before, now)?;
        if let Basis::Token(name) = &basis {
            // Spent now, at most once across replicas; another caller may have been faster.
            match self
                .store
                .use_token(&token_hash(req.join_token.trim()), now)
                .await
                .map_err(Refused::Store)?
            {
                TokenUse::Taken(w) if w == *name => {}
                TokenUse::Taken(w) => return Err(Refused::UnknownWorkload(w)),
                other => return Err(Refused::Token(other)),
            }
        }
        let chain = ca.issue(&csr, id, v).map_err(Refused::Sign)?;
        self.issued_until
            .fetch_max(v.not_after, std::sync::atomic::Ordering::Relaxed);
        let serial = x509_parser::parse_x509_certificate(&chain[0])
            .map(|(_, c)| c.raw_serial_as_string())
            .unwrap_or_default();
        let bundle = Bundle {
            trust_domain: ca.trust_domain().to_string(),
            pem: cas
                .anchors()
                .iter()
                .map(|c| sigil_testkit::pem("CERTIFICATE", c))
                .collect(),
        };
        Ok(Issued {
            id: id.clone(),
            workload: workload.metadata.name.clone(),
            serial,
            not_after: v.not_after,
            basis,
            response: IssueResponse {
                chain: chain.iter().map(|c| c.to_vec()).collect(),
                bundles: vec![bundle],
            },
        })
    }

    /// The catalog in force, once it knows the Workload `name`, waiting up to `CATALOG_LAG`:
    /// a token made at another replica just after its Workload was applied may arrive before
    /// this replica's catalog has that Workload, and the token is already spent.
    async fn catalog_knowing(&self, name: &str) -> Arc<Catalog> {
        let mut rx = self.catalog.clone();
        let deadline = tokio::time::Instant::now() + CATALOG_LAG;
        loop {
            let catalog = rx.borrow_and_update().clone();
            if catalog.workload_named(name).is_some() {
                return catalog;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return catalog,
            }
        }
    }

    /// What the caller may be issued on: a usable join token's Workload (not spent: `issue`
    /// spends it last), its own identity again (an SVID), or a Workload its Workload API
    /// serves (an SVID and `for_workload`).
    async fn authenticate(
        &self,
        caller: &Caller,
        req: &IssueRequest,
        now: i64,
    ) -> Result<Basis, Refused> {
        let served = req.for_workload.trim();
        match (caller, req.join_token.is_empty()) {
            (Caller::Svid(..), true) if served.is_empty() => Ok(Basis::Renewal),
            (Caller::Svid(..), true) => Ok(Basis::WorkloadApi(served.to_string())),
            (Caller::Svid(..), false) => Err(Refused::TokenWithSvid),
            // Only a sidecar with an SVID serves other workloads.
            (Caller::Anonymous, true) => Err(Refused::NoCredential),
            (Caller::Anonymous, false) if !served.is_empty() => Err(Refused::NoCredential),
            (Caller::Anonymous, false) => {
                let used = self
                    .store
                    .peek_token(&token_hash(req.join_token.trim()), now)
                    .await
                    .map_err(Refused::Store)?;
                match used {
                    TokenUse::Taken(workload) => Ok(Basis::Token(workload)),
                    other => Err(Refused::Token(other)),
                }
            }
        }
    }
}

/// No SVID for a revoked identity: none that a revocation would cover from the moment it
/// starts (`not_before`; a cut-off in the future covers it too). A revocation with
/// `issuedBefore` in the past refuses renewals by an SVID issued before the cut-off, and lets
/// a new SVID be issued (that is how a compromised key is replaced); one without refuses
/// every issuance until `sigil unrevoke`. A presented SVID that has expired (a long-lived
/// connection outliving it) renews nothing.
fn check_revoked(
    catalog: &Catalog,
    caller: &Caller,
    id: &SpiffeId,
    not_before: i64,
    now: i64,
) -> Result<(), Refused> {
    let revoked = catalog.revoked();
    let refused = |r: &sigil_config::Revocation| Refused::Revoked {
        id: id.clone(),
        revocation: r.metadata.name.clone(),
        reason: r.spec.reason.clone(),
    };
    if let Some(r) = revoked.covering(id, not_before) {
        return Err(refused(r));
    }
    if let Caller::Svid(presented, leaf) = caller {
        let validity = x509_parser::parse_x509_certificate(leaf)
            .map(|(_, c)| {
                (
                    c.validity().not_before.timestamp(),
                    c.validity().not_after.timestamp(),
                )
            })
            .unwrap_or((i64::MIN, i64::MIN));
        if validity.1 <= now {
            return Err(Refused::ExpiredSvid(presented.clone()));
        }
        if let Some(r) = revoked.covering(presented, validity.0) {
            return Err(refused(r));
        }
    }
    Ok(())
}

/// Unix seconds as RFC 3339 (UTC), for messages.
pub fn rfc3339(unix: i64) -> String {
    sigil_config::policy::Timestamp(unix).to_string()
}
