//! `sigil policy test`: the verdict a sidecar would give, from the same decision code
//! (`sigil_filters::PolicyIndex`, after the same request normalization).

use std::fmt::{self, Write as _};

use sigil_config::{Policy, SpiffeId};
use sigil_filters::normalize::{normalize_path, TargetError};
use sigil_filters::{HttpRequest, PolicyIndex};

/// One question: may `from` reach `to` on `port` (with this request, on an HTTP port)?
pub struct Question {
    pub from: SpiffeId,
    pub to: SpiffeId,
    pub port: u16,
    pub method: String,
    /// Path and query as the client sends them; normalized here as the sidecar would.
    pub path: String,
    pub host: String,
    /// (lowercase name, value)
    pub headers: Vec<(String, String)>,
    /// Unix seconds (expiry is judged at this instant).
    pub at: i64,
}

pub struct Answer {
    pub allowed: bool,
    /// What to print: the verdict, the deciding rule, and any dry-run finding.
    pub text: String,
}

/// Why a question gets no verdict.
#[derive(Debug)]
pub enum QuestionError {
    /// The sidecar would answer 400 before consulting any policy.
    InvalidRequest(TargetError),
}

impl fmt::Display for QuestionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidRequest(e) => {
                write!(f, "the sidecar would refuse this request with 400: {e}")
            }
        }
    }
}

impl std::error::Error for QuestionError {}

pub fn decide(policies: &[Policy], q: &Question) -> Result<Answer, QuestionError> {
    let index = PolicyIndex::compile(policies, &q.to);
    let mut text = String::new();
    let decision = if index.is_http(q.port) {
        let (path, _query) = normalize_path(&q.path).map_err(QuestionError::InvalidRequest)?;
        let _ = writeln!(
            text,
            "port {} is http: {} {} (normalized: {path}), host {}",
            q.port, q.method, q.path, q.host
        );
        index.decide_http(&HttpRequest {
            peer: &q.from,
            port: q.port,
            method: &q.method,
            host: &q.host,
            path: &path,
            header: |name: &str| {
                q.headers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
            },
            now: q.at,
        })
    } else {
        let _ = writeln!(text, "port {} is decided per connection", q.port);
        index.decide_tcp(&q.from, q.port, q.at)
    };
    let verdict = if decision.allowed { "ALLOW" } else { "DENY" };
    let _ = writeln!(text, "{verdict}: {}", decision.rule);
    if let Some(w) = decision.would_deny {
        let _ = writeln!(text, "dry-run: would be denied by {w}");
    }
    Ok(Answer {
        allowed: decision.allowed,
        text,
    })
}
