//! Who a local caller of the sidecar's SPIFFE Workload API is: the caller's Unix peer
//! credentials, as the kernel reports them for the socket (`SO_PEERCRED`), and its binary,
//! matched against the selectors of the Workloads the sidecar serves (`workloadApi` on the
//! Workload record). Every selector a Workload gives must match; one without any matches no
//! one (the config loader refuses it too).

use std::path::PathBuf;

use sigil_config::SpiffeId;

/// A caller as the kernel names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// `/proc/<pid>/exe`, where it could be read.
    pub path: Option<PathBuf>,
}

/// A workload this sidecar's Workload API serves, as its Workload record names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub workload: String,
    pub id: SpiffeId,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub path: Option<PathBuf>,
}

impl Served {
    /// Every selector given matches the caller, and there is at least one.
    pub fn admits(&self, c: &Caller) -> bool {
        let any = self.uid.is_some() || self.gid.is_some() || self.path.is_some();
        any && self.uid.is_none_or(|u| u == c.uid)
            && self.gid.is_none_or(|g| g == c.gid)
            && self
                .path
                .as_ref()
                .is_none_or(|p| c.path.as_ref() == Some(p))
    }
}

/// The workloads `caller` is, in the order served: the first is its default SVID.
pub fn select<'a>(served: &'a [Served], caller: &Caller) -> Vec<&'a Served> {
    served.iter().filter(|s| s.admits(caller)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(name: &str, uid: Option<u32>, gid: Option<u32>, path: Option<&str>) -> Served {
        Served {
            workload: name.into(),
            id: SpiffeId::parse(&format!("spiffe://example.org/{name}")).unwrap(),
            uid,
            gid,
            path: path.map(PathBuf::from),
        }
    }

    fn caller(uid: u32, gid: u32, path: Option<&str>) -> Caller {
        Caller {
            uid,
            gid,
            pid: Some(42),
            path: path.map(PathBuf::from),
        }
    }

    #[test]
    fn every_selector_given_must_match() {
        let all = [
            served("by-uid", Some(1000), None, None),
            served("by-uid-and-binary", Some(1000), None, Some("/usr/bin/pay")),
            served("by-gid", None, Some(50), None),
            served("no-selector", None, None, None),
        ];
        let names = |c: &Caller| -> Vec<String> {
            select(&all, c).iter().map(|s| s.workload.clone()).collect()
        };
        assert_eq!(
            names(&caller(1000, 50, Some("/usr/bin/pay"))),
            ["by-uid", "by-uid-and-binary", "by-gid"]
        );
        assert_eq!(names(&caller(1000, 1, Some("/usr/bin/other"))), ["by-uid"]);
        // A binary the kernel would not name matches no path selector.
        assert_eq!(names(&caller(1000, 1, None)), ["by-uid"]);
        assert!(names(&caller(0, 0, Some("/usr/bin/pay"))).is_empty());
    }
}
