//! Resources from directories of YAML files (`spec.policyDir`, `spec.revocationDir`), polled
//! like the identity files. A set with any invalid file is refused whole (each problem logged
//! with file:line) and the last good set stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sigil_config::{ConfigError, Policy, ProxyConfig, Revocation, SpiffeId};
use sigil_filters::PolicyIndex;

type Parse<T> = fn(&Path, &str) -> Result<Vec<T>, ConfigError>;

pub struct ResourceDir<T> {
    dir: Option<PathBuf>,
    parse: Parse<T>,
    seen: BTreeMap<PathBuf, Vec<u8>>,
    /// The last good set (policies: kept to recompile when our own SPIFFE ID changes).
    pub current: Vec<T>,
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
            seen: BTreeMap::new(),
            current: Vec::new(),
        }
    }

    pub fn is_configured(&self) -> bool {
        self.dir.is_some()
    }

    /// Re-reads the directory. None: nothing changed. Some(Err): the new set is refused, with
    /// every problem found. Some(Ok): `current` now holds the new set.
    pub fn poll(&mut self) -> Option<Result<usize, Vec<String>>> {
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
        if now == self.seen && problems.is_empty() {
            return None;
        }
        self.seen = now;
        let mut resources = Vec::new();
        for (path, bytes) in &self.seen {
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
        self.current = resources;
        Some(Ok(self.current.len()))
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
