//! Resource files named on the command line: files, or directories of `*.yaml` / `*.yml`
//! (hidden files skipped), read in name order. Every problem is reported, each with file:line.

use std::path::{Path, PathBuf};

use sigil_config::{ConfigError, Resource};

/// Every resource in `paths`, or every problem found in them.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Resource>, Vec<String>> {
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
            Err(e) => problems.push(e.to_string()),
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
pub fn check_certificates(file: &Path, resources: &[Resource]) -> Vec<String> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::TrustBundle(b) => sigil_filters::TrustBundles::new()
                .insert_pem(&b.spec.trust_domain, b.spec.pem.as_bytes())
                .err()
                .map(|e| format!("{}: TrustBundle/{}: {e}", file.display(), b.metadata.name)),
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

fn expand(p: &Path) -> Result<Vec<PathBuf>, String> {
    if !p.is_dir() {
        return if p.exists() {
            Ok(vec![p.to_path_buf()])
        } else {
            Err(ConfigError::new(p, None, "no such file or directory").to_string())
        };
    }
    let entries = std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))?;
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
