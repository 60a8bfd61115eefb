//! Resources from directories of YAML files (`spec.policyDir`, `spec.revocationDir`), polled
//! like the identity files. A set with any invalid file is refused whole (each problem logged
//! with file:line) and the last good set stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sigil_config::{ConfigError, Policy, ProxyConfig, Revocation, SpiffeId};
use sigil_filters::PolicyIndex;

type Parse<T> = fn(&Path, &str) -> Result<Vec<T>, ConfigError>;

/// The files of a directory as read, by path.
pub type Texts = BTreeMap<PathBuf, Vec<u8>>;

/// A set of files that parsed without a problem, and what they hold.
pub struct Good<T> {
    pub texts: Arc<Texts>,
    pub resources: Vec<T>,
}

pub struct ResourceDir<T> {
    dir: Option<PathBuf>,
    parse: Parse<T>,
    /// The files last read, good or not: a refused set is reported once, not every poll.
    seen: Arc<Texts>,
}

pub fn policy_files(cfg: &ProxyConfig) -> ResourceDir<Policy> {
    ResourceDir::new(
        cfg.spec.policy_dir.as_ref().map(|d| cfg.resolve(d)),
        Policy::parse_all,
    )
}

pub fn revocation_files(cfg: &ProxyConfig) -> ResourceDir<Revocation> {
    ResourceDir::new(
        cfg.spec.revocation_dir.as_ref().map(|d| cfg.resolve(d)),
        Revocation::parse_all,
    )
}

impl<T> ResourceDir<T> {
    fn new(dir: Option<PathBuf>, parse: Parse<T>) -> Self {
        Self {
            dir,
            parse,
            seen: Arc::default(),
        }
    }

    pub fn is_configured(&self) -> bool {
        self.dir.is_some()
    }

    /// Re-reads the directory. None: nothing changed. Some(Err): the new set is refused, with
    /// every problem found. Some(Ok): the new set.
    pub fn poll(&mut self) -> Option<Result<Good<T>, Vec<String>>> {
        let dir = self.dir.as_ref()?;
        let mut now = BTreeMap::new();
        let mut problems = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let path = e.path();
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml"))
                    {
                        continue;
                    }
                    match std::fs::read(&path) {
                        Ok(b) => {
                            now.insert(path, b);
                        }
                        Err(e) => problems.push(format!("{}: {e}", path.display())),
                    }
                }
            }
            Err(e) => problems.push(format!("{}: {e}", dir.display())),
        }
        if now == *self.seen && problems.is_empty() {
            return None;
        }
        self.seen = Arc::new(now);
        let mut resources = Vec::new();
        for (path, bytes) in self.seen.iter() {
            let parsed = std::str::from_utf8(bytes)
                .map_err(|e| format!("{}: not UTF-8: {e}", path.display()))
                .and_then(|text| (self.parse)(path, text).map_err(|e| e.to_string()));
            match parsed {
                Ok(rs) => resources.extend(rs),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Some(Err(problems));
        }
        Some(Ok(Good {
            texts: self.seen.clone(),
            resources,
        }))
    }
}

/// The policy directory's last good set as the proxy keeps it: the files' text, and parsed
/// only the policies that target our own ID, which are all that `compile_policies` uses. A
/// directory shared by many workloads is mostly other workloads' policies, and parsed they
/// take about four times their text (1,200 policies: 3.7 MiB parsed, 0.85 MiB of YAML). If
/// our ID changes, the text is parsed again for the new one.
#[derive(Default)]
pub struct FilePolicies {
    texts: Arc<Texts>,
    /// The ID `kept` was chosen for; None before any set was loaded.
    target: Option<SpiffeId>,
    kept: Vec<Policy>,
    /// How many policies the set holds, kept or not.
    total: usize,
}

impl FilePolicies {
    pub fn new(set: Good<Policy>, local: &SpiffeId) -> Self {
        let total = set.resources.len();
        let kept = set
            .resources
            .into_iter()
            .filter(|p| p.spec.target == *local)
            .collect();
        Self {
            texts: set.texts,
            target: Some(local.clone()),
            kept,
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// The policies of the set that target `local`; the text is parsed again when they were
    /// chosen for another ID. It parsed before, so an error here means the files cannot be
    /// trusted (the caller keeps the index it has).
    pub fn targeting(&mut self, local: &SpiffeId) -> Result<&[Policy], String> {
        if self.target.is_some() && self.target.as_ref() != Some(local) {
            let mut resources = Vec::new();
            for (path, bytes) in self.texts.iter() {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| format!("{}: not UTF-8: {e}", path.display()))?;
                resources.extend(Policy::parse_all(path, text).map_err(|e| e.to_string())?);
            }
            let set = Good {
                texts: self.texts.clone(),
                resources,
            };
            *self = Self::new(set, local);
        }
        Ok(&self.kept)
    }
}

/// The index for `local`: the given policies plus `inbound.ports` of the config.
pub fn compile_policies<'p>(
    cfg: &ProxyConfig,
    policies: impl Iterator<Item = &'p Policy>,
    local: &SpiffeId,
) -> PolicyIndex {
    let from_config = Policy::from_inbound_ports(cfg, local);
    let mut all: Vec<&Policy> = policies.collect();
    all.extend(&from_config);
    PolicyIndex::compile(all, local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, target: &str) -> String {
        format!(
            "apiVersion: sigil.dev/v1
kind: Policy
metadata: {{name: {name}, owner: team, purpose: resources test}}
spec:
  target: {target}
  ports:
    - port: 8080
      routes:
        - {{name: r, match: {{path: {{prefix: /}}}}, allow: [spiffe://example.org/caller]}}
"
        )
    }

    fn names(policies: &[Policy]) -> Vec<&str> {
        policies.iter().map(|p| p.metadata.name.as_str()).collect()
    }

    #[test]
    fn file_policies_keep_their_targets_and_parse_again_for_a_new_id() {
        let dir = std::env::temp_dir().join(format!("sigil-resources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = ("spiffe://example.org/a", "spiffe://example.org/b");
        let text = format!("{}---\n{}", policy("for-a", a), policy("other-a", a));
        std::fs::write(dir.join("a.yaml"), text).unwrap();
        std::fs::write(dir.join("b.yaml"), policy("for-b", b)).unwrap();
        let mut files = ResourceDir::new(Some(dir.clone()), Policy::parse_all);
        let set = match files.poll() {
            Some(Ok(set)) => set,
            Some(Err(problems)) => panic!("{problems:?}"),
            None => panic!("a new directory counts as a change"),
        };
        let (a, b): (SpiffeId, SpiffeId) = (a.parse().unwrap(), b.parse().unwrap());
        let mut kept = FilePolicies::new(set, &a);
        assert_eq!(kept.total(), 3);
        assert_eq!(kept.kept.len(), 2, "only a's policies stay parsed");
        assert_eq!(names(kept.targeting(&a).unwrap()), ["for-a", "other-a"]);
        // The files changed on disk meanwhile: b's policies come from the text of the set
        // that was loaded, not from the directory.
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(names(kept.targeting(&b).unwrap()), ["for-b"]);
        assert_eq!(kept.total(), 3);
        assert_eq!(names(kept.targeting(&a).unwrap()), ["for-a", "other-a"]);
        assert!(files.poll().is_some(), "the removal is a change");
        assert!(files.poll().is_none(), "and only once");
        std::fs::remove_dir_all(&dir).unwrap();
        // Before any set was loaded there is nothing to parse.
        assert!(FilePolicies::default().targeting(&a).unwrap().is_empty());
    }
}
