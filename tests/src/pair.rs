//! The setup most tests share: sidecar B in front of workloads, sidecar A calling each of them
//! through an explicit outbound listener, both with SVIDs for A and B from one CA made at
//! test time. A test adjusts the two `Sidecar` configs between `PairSetup::new` and `start`.

use std::path::Path;

use sigil_testkit::Ca;

use crate::{
    free_port, get_once, start_workload, write_identity, IdentityFiles, Proc, Sidecar, TempDir,
};
use crate::{A, B};

/// The ports of one workload behind the pair: the workload's own, B's inbound listener in
/// front of it, and A's outbound listener leading there.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub workload: u16,
    pub b_in: u16,
    pub a_out: u16,
}

/// A pair not started yet. Fields drop in order: processes first, the directory last.
pub struct PairSetup {
    pub workloads: Vec<Proc>,
    /// Sidecar A (`sidecar-a`, ID `A`), calling B.
    pub a: Sidecar,
    /// Sidecar B (`sidecar-b`, ID `B`), in front of the workloads.
    pub b: Sidecar,
    pub fa: IdentityFiles,
    pub fb: IdentityFiles,
    /// The CA of both SVIDs and of both sidecars' bundles (trust domain example.org).
    pub ca: Ca,
    pub dir: TempDir,
}

impl PairSetup {
    /// SVIDs for A and B in a new temporary directory named after `tag`; no workload yet.
    pub fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let ca = Ca::new("example.org");
        let fa = write_identity(dir.path(), "a", &ca, A, &[&ca]);
        let fb = write_identity(dir.path(), "b", &ca, B, &[&ca]);
        Self {
            workloads: Vec::new(),
            a: Sidecar::new("sidecar-a", A),
            b: Sidecar::new("sidecar-b", B),
            fa,
            fb,
            ca,
            dir,
        }
    }

    /// `new` with the toy workload `b` behind B: the pair most tests need.
    pub fn web(tag: &str) -> (Self, Ports) {
        let mut s = Self::new(tag);
        let web = s.workload("b", false);
        (s, web)
    }

    /// `web`, and the toy echo workload `b-echo` behind B too: a byte stream beside HTTP.
    pub fn web_and_echo(tag: &str) -> (Self, Ports, Ports) {
        let (mut s, web) = Self::web(tag);
        let echo = s.workload("b-echo", true);
        (s, web, echo)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts the toy workload `name` (an echo server if `echo`) and puts it behind the pair.
    pub fn workload(&mut self, name: &str, echo: bool) -> Ports {
        let (proc, port) = start_workload(name, echo);
        self.workloads.push(proc);
        self.serve(port)
    }

    /// Puts a workload already listening on `workload` (an in-test server, or one served twice)
    /// behind the pair: a new inbound listener on B, and an outbound listener on A expecting B.
    pub fn serve(&mut self, workload: u16) -> Ports {
        let (b_in, a_out) = (free_port(), free_port());
        self.b.inbound.push((b_in, workload));
        self.a.outbound.push((a_out, b_in, B.into()));
        Ports {
            workload,
            b_in,
            a_out,
        }
    }

    /// Starts B, then A, each waited for until ready.
    pub fn start(self) -> Pair {
        let pb = self.b.start(self.path(), &self.fb);
        let pa = self.a.start(self.path(), &self.fa);
        Pair {
            pa,
            pb,
            setup: self,
        }
    }
}

/// A started pair: its processes, and through `Deref` the setup it was started from (the
/// configs, the files, the CA, the workloads). Dropping it ends the sidecars, then the
/// workloads, then removes the files.
pub struct Pair {
    pub pa: Proc,
    pub pb: Proc,
    setup: PairSetup,
}

impl std::ops::Deref for Pair {
    type Target = PairSetup;

    fn deref(&self) -> &PairSetup {
        &self.setup
    }
}

impl std::ops::DerefMut for Pair {
    fn deref_mut(&mut self) -> &mut PairSetup {
        &mut self.setup
    }
}

impl Pair {
    /// One call through A to `path` on `web`: it must be answered 200.
    pub fn assert_reaches(&self, web: Ports, path: &str) {
        assert_eq!(
            get_once(web.a_out, path),
            Some(200),
            "A:\n{}\nB:\n{}",
            self.pa.log(),
            self.pb.log()
        );
    }

    /// Starts a third sidecar `sidecar-<name>` with an SVID for `id` from the pair's CA and an
    /// outbound listener to each of B's inbound listeners, expecting B, in their order; `tune`
    /// adjusts it before it starts.
    pub fn caller(&self, name: &str, id: &str, tune: impl FnOnce(&mut Sidecar)) -> Caller {
        let files = write_identity(self.path(), name, &self.ca, id, &[&self.ca]);
        let mut sidecar = Sidecar::new(&format!("sidecar-{name}"), id);
        let ports: Vec<u16> = self.b.inbound.iter().map(|_| free_port()).collect();
        sidecar.outbound = ports
            .iter()
            .zip(&self.b.inbound)
            .map(|(&listen, &(b_in, _))| (listen, b_in, B.to_string()))
            .collect();
        tune(&mut sidecar);
        let proc = sidecar.start(self.path(), &files);
        Caller {
            proc,
            sidecar,
            files,
            ports,
        }
    }
}

/// A third sidecar calling B (`Pair::caller`).
pub struct Caller {
    pub proc: Proc,
    pub sidecar: Sidecar,
    pub files: IdentityFiles,
    /// Its outbound listener per B inbound listener, in B's order.
    pub ports: Vec<u16>,
}
