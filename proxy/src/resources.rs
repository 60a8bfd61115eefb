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

/// Why a resource file, or the set, is refused; `Display` names the file.
#[derive(Debug)]
pub enum ResourceProblem {
    /// Over `sigil_config::MAX_FILE_BYTES`: not read at all.
    TooLarge(PathBuf, u64),
    Unreadable(PathBuf, std::io::Error),
    NotUtf8(PathBuf, std::str::Utf8Error),
    /// A document that does not parse or validate (file:line).
    Invalid(ConfigError),
}

impl std::fmt::Display for ResourceProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge(path, len) => write!(
                f,
                "{}: file is {len} bytes; the limit is {}",
                path.display(),
                sigil_config::MAX_FILE_BYTES
            ),
            Self::Unreadable(path, e) => write!(f, "{}: {e}", path.display()),
            Self::NotUtf8(path, e) => write!(f, "{}: not UTF-8: {e}", path.display()),
            Self::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// The same problem is the same message: a refused set is reported again only when what is
/// wrong with it changed (`io::Error` has no equality of its own).
impl PartialEq for ResourceProblem {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

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
    /// The problems last reported with `seen`, for the same reason.
    reported: Vec<ResourceProblem>,
    /// Whether `reported` names a file too large to read, which is not in `seen`: its
    /// going away must be noticed although `seen` still matches the directory.
    oversize: bool,
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
            reported: Vec::new(),
            oversize: false,
        }
    }

    pub fn is_configured(&self) -> bool {
        self.dir.is_some()
    }

    /// Re-reads the directory. None: nothing changed. Some(Err): the new set is refused, with
    /// every problem found. Some(Ok): the new set.
    pub fn poll(&mut self) -> Option<Result<Good<T>, Vec<ResourceProblem>>> {
        let dir = self.dir.as_ref()?;
        if !self.oversize && unchanged(dir, &self.seen) {
            return None;
        }
        let mut now = BTreeMap::new();
        let mut problems = Vec::new();
        let mut oversize = false;
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for path in entries.flatten().filter_map(resource_file) {
                    // Not read at all when too large: a huge file would be held whole.
                    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                    if len > sigil_config::MAX_FILE_BYTES as u64 {
                        oversize = true;
                        problems.push(ResourceProblem::TooLarge(path, len));
                        continue;
                    }
                    match std::fs::read(&path) {
                        Ok(b) => {
                            now.insert(path, b);
                        }
                        Err(e) => problems.push(ResourceProblem::Unreadable(path, e)),
                    }
                }
            }
            Err(e) => problems.push(ResourceProblem::Unreadable(dir.clone(), e)),
        }
        if now == *self.seen && problems == self.reported {
            return None;
        }
        self.oversize = oversize;
        self.seen = Arc::new(now);
        let mut resources = Vec::new();
        for (path, bytes) in self.seen.iter() {
            let parsed = std::str::from_utf8(bytes)
                .map_err(|e| ResourceProblem::NotUtf8(path.clone(), e))
                .and_then(|text| (self.parse)(path, text).map_err(ResourceProblem::Invalid));
            match parsed {
                Ok(rs) => resources.extend(rs),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            // Kept to compare the next poll with; the caller gets the same list.
            self.reported = problems;
            let again = self.reported.iter().map(copy).collect();
            return Some(Err(again));
        }
        self.reported = Vec::new();
        Some(Ok(Good {
            texts: self.seen.clone(),
            resources,
        }))
    }
}

/// A problem for the caller, the original kept to compare the next poll with.
fn copy(p: &ResourceProblem) -> ResourceProblem {
    match p {
        ResourceProblem::TooLarge(path, len) => ResourceProblem::TooLarge(path.clone(), *len),
        ResourceProblem::Unreadable(path, e) => {
            ResourceProblem::Unreadable(path.clone(), std::io::Error::new(e.kind(), e.to_string()))
        }
        ResourceProblem::NotUtf8(path, e) => ResourceProblem::NotUtf8(path.clone(), *e),
        ResourceProblem::Invalid(e) => ResourceProblem::Invalid(e.clone()),
    }
}

/// The path of a directory entry that is a resource file: `*.yaml` or `*.yml`, not hidden.
fn resource_file(e: std::fs::DirEntry) -> Option<PathBuf> {
    let name = e.file_name();
    let name = name.to_string_lossy();
    let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
    (yaml && !name.starts_with('.')).then(|| e.path())
}

/// Whether `dir` holds exactly the files of `seen`, byte for byte. Compared a chunk at a time:
/// the directory is checked every poll, and reading it whole each time kept a second copy of
/// its text resident (0.85 MiB for 1,200 policies).
fn unchanged(dir: &Path, seen: &Texts) -> bool {
    use std::io::Read;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut files = 0;
    let mut buf = [0u8; 16 * 1024];
    for path in entries.flatten().filter_map(resource_file) {
        files += 1;
        let Some(expected) = seen.get(&path) else {
            return false;
        };
        let Ok(mut f) = std::fs::File::open(&path) else {
            return false;
        };
        let mut at = 0;
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if expected.get(at..at + n) == Some(&buf[..n]) => at += n,
                Ok(_) | Err(_) => return false,
            }
        }
        if at != expected.len() {
            return false;
        }
    }
    files == seen.len()
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
    pub fn targeting(&mut self, local: &SpiffeId) -> Result<&[Policy], ResourceProblem> {
        if self.target.is_some() && self.target.as_ref() != Some(local) {
            let mut resources = Vec::new();
            for (path, bytes) in self.texts.iter() {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| ResourceProblem::NotUtf8(path.clone(), e))?;
                resources.extend(Policy::parse_all(path, text).map_err(ResourceProblem::Invalid)?);
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
    fn a_change_of_one_byte_in_a_long_file_is_noticed() {
        let dir = std::env::temp_dir().join(format!("sigil-resources-long-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Several of `unchanged`'s chunks long, so that the change is in a later one.
        let docs: Vec<String> = (0..250)
            .map(|i| policy(&format!("p{i:03}"), "spiffe://example.org/a"))
            .collect();
        let text = docs.join("---\n");
        assert!(text.len() > 3 * 16 * 1024, "{}", text.len());
        let path = dir.join("many.yaml");
        std::fs::write(&path, &text).unwrap();
        let mut files = ResourceDir::new(Some(dir.clone()), Policy::parse_all);
        assert!(matches!(files.poll(), Some(Ok(set)) if set.resources.len() == 250));
        assert!(files.poll().is_none());
        // Same length, one byte different, near the end: the last policy's name.
        std::fs::write(&path, text.replace("p249", "p24x")).unwrap();
        match files.poll() {
            Some(Ok(set)) => {
                assert_eq!(set.resources.len(), 250);
                assert_eq!(set.resources[249].metadata.name, "p24x");
            }
            _ => panic!("the change went unnoticed"),
        }
        // A file added to the directory, and a hidden one, which does not count.
        std::fs::write(dir.join(".editor.yaml.swp.yaml"), "not: a policy").unwrap();
        assert!(files.poll().is_none(), "hidden files are not resources");
        std::fs::write(
            dir.join("more.yaml"),
            policy("more", "spiffe://example.org/a"),
        )
        .unwrap();
        assert!(matches!(files.poll(), Some(Ok(set)) if set.resources.len() == 251));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_over_the_size_cap_is_not_read_and_reported_once() {
        let dir = std::env::temp_dir().join(format!("sigil-resources-huge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.yaml"),
            policy("for-a", "spiffe://example.org/a"),
        )
        .unwrap();
        let huge = dir.join("huge.yaml");
        let f = std::fs::File::create(&huge).unwrap();
        f.set_len(sigil_config::MAX_FILE_BYTES as u64 + 1).unwrap();
        let mut files = ResourceDir::new(Some(dir.clone()), Policy::parse_all);
        match files.poll() {
            Some(Err(problems)) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert!(
                    problems[0]
                        .to_string()
                        .ends_with("huge.yaml: file is 4194305 bytes; the limit is 4194304"),
                    "{problems:?}"
                );
            }
            _ => panic!("a huge file must be refused"),
        }
        assert!(files.poll().is_none(), "reported once, not every poll");
        std::fs::remove_file(&huge).unwrap();
        assert!(matches!(files.poll(), Some(Ok(set)) if set.resources.len() == 1));
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert!(files.poll().is_none(), "nothing changed");
        // The files changed on disk meanwhile: b's policies come from the text of the set
        // that was loaded, not from the directory.
        std::fs::remove_file(dir.join("b.yaml")).unwrap();
        assert_eq!(names(kept.targeting(&b).unwrap()), ["for-b"]);
        assert_eq!(kept.total(), 3);
        assert_eq!(names(kept.targeting(&a).unwrap()), ["for-a", "other-a"]);
        assert!(files.poll().is_some(), "the removal is a change");
        assert!(files.poll().is_none(), "and only once");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            matches!(files.poll(), Some(Err(_))),
            "a vanished directory is a problem"
        );
        // Before any set was loaded there is nothing to parse.
        assert!(FilePolicies::default().targeting(&a).unwrap().is_empty());
    }
}
