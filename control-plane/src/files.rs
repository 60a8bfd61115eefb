//! Resource files named on the command line: files, or directories of `*.yaml` / `*.yml`
//! (hidden files skipped), read in name order. Every problem is reported, each with file:line.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use sigil_config::{ConfigError, Resource};
use sigil_filters::BundleError;

/// One problem with the resource files; each names the file (and line, where there is one).
#[derive(Debug)]
pub enum FileProblem {
    /// A path named on the command line does not exist.
    NotFound(PathBuf),
    /// A directory named on the command line could not be listed.
    ReadDir { dir: PathBuf, source: io::Error },
    /// A file that does not load: file:line and why.
    Invalid(ConfigError),
    /// A TrustBundle whose certificates a sidecar could not use as trust anchors.
    Bundle {
        file: PathBuf,
        name: String,
        source: BundleError,
    },
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound(path) => write!(f, "{}: no such file or directory", path.display()),
            Self::ReadDir { dir, source } => write!(f, "{}: {source}", dir.display()),
            Self::Invalid(e) => write!(f, "{e}"),
            Self::Bundle { file, name, source } => {
                write!(f, "{}: TrustBundle/{name}: {source}", file.display())
            }
        }
    }
}

impl std::error::Error for FileProblem {}

/// Every resource in `paths`, or every problem found in them.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Resource>, Vec<FileProblem>> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for p in paths {
        match expand(p) {
            Ok(mut f) => files.append(&mut f),
            Err(e) => problems.push(e),
        }
    }
    let mut out = Vec::new();
    for f in &files {
        match Resource::load_all(f) {
            Ok(mut rs) => {
                problems.extend(check_certificates(f, &rs));
                out.append(&mut rs);
            }
            Err(e) => problems.push(FileProblem::Invalid(e)),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// What the YAML loader cannot check: that every TrustBundle's certificates are usable trust
/// anchors, as a sidecar will require. One problem per bad bundle, naming file and resource.
pub fn check_certificates(file: &Path, resources: &[Resource]) -> Vec<FileProblem> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::TrustBundle(b) => sigil_filters::TrustBundles::new()
                .insert_pem(&b.spec.trust_domain, b.spec.pem.as_bytes())
                .err()
                .map(|source| FileProblem::Bundle {
                    file: file.to_path_buf(),
                    name: b.metadata.name.clone(),
                    source,
                }),
            _ => None,
        })
        .collect()
}

/// The files `paths` name, directories expanded (unreadable entries left out; `load`
/// reports them).
pub fn expand_all(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths
        .iter()
        .flat_map(|p| expand(p).unwrap_or_default())
        .collect()
}

fn expand(p: &Path) -> Result<Vec<PathBuf>, FileProblem> {
    if !p.is_dir() {
        return if p.exists() {
            Ok(vec![p.to_path_buf()])
        } else {
            Err(FileProblem::NotFound(p.to_path_buf()))
        };
    }
    let entries = std::fs::read_dir(p).map_err(|source| FileProblem::ReadDir {
        dir: p.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            name.is_some_and(|n| {
                !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml"))
            })
        })
        .collect();
    files.sort();
    Ok(files)
}
