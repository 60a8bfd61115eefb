//! The test stand: the backends, the sigil pairs and the nginx pairs, started once and shared
//! by every measurement.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_e2e::{wait_for_port, Proc};
use sigil_perf::procfs::Group;

use crate::identity::SERVER_ID;
use crate::net::addr;
use crate::nginx::{self, T_BACKEND, T_L4_CLIENT, T_L4_SERVER, T_L7_CLIENT, T_L7_SERVER};
use crate::opts::Opts;
use crate::paths::{PathPorts, Ports, Via};
use crate::progress::log;
use crate::sigil;

/// What the report says about the set-up, besides the measurements.
#[derive(Default)]
pub struct Setup {
    /// (documents, files, documents targeting the server) in the L7 server's policyDir.
    pub policies: Option<(usize, usize, usize)>,
    /// Time from spawn to `/ready` of the L4 and of the L7 server-side sidecars.
    pub ready: Vec<(&'static str, Duration)>,
    /// Findings of the sanity checks, one line each.
    pub sanity: Vec<String>,
}

pub struct Stand {
    pub ports: Ports,
    /// Every process started, in start order.
    pub procs: Vec<Proc>,
    /// The proxies, one group per side of each pair.
    pub groups: Vec<Group>,
    /// The backends, shared by every path.
    pub backend_groups: Vec<Group>,
    /// The direct path first, then the path through each pair.
    pub paths: Vec<PathPorts>,
    pub setup: Setup,
}

impl Stand {
    /// Starts the backends, then (unless skipped) the sigil pairs and the nginx pairs.
    /// `toy` is the sigil-toy-workload binary.
    pub fn start(o: &Opts, dir: &Path, toy: &Path) -> Result<Self, String> {
        let ports = Ports::allocate();
        let (procs, backend_groups) = start_backends(o, dir, toy, &ports)?;
        let mut stand = Self {
            paths: vec![PathPorts {
                via: Via::Direct,
                echo: Some(ports.echo_backend),
                http: ports.http_backend,
                h2: Some(ports.http_backend_h2),
            }],
            ports,
            procs,
            groups: Vec::new(),
            backend_groups,
            setup: Setup::default(),
        };
        if !o.skip_sigil {
            stand.start_sigil_pairs(o, dir)?;
        }
        if !o.skip_nginx {
            stand.start_nginx_pairs(o, dir)?;
        }
        Ok(stand)
    }

    /// Ends every process by PID, the last started first.
    pub fn stop(self) {
        for mut p in self.procs.into_iter().rev() {
            p.terminate(Duration::from_secs(5));
        }
    }

    /// The L4 pair, then the L7 pair with its generated policyDir.
    fn start_sigil_pairs(&mut self, o: &Opts, dir: &Path) -> Result<(), String> {
        let ports = &self.ports;
        log("starting the sigil-proxy L4 pair");
        let (server, client, ready) = sigil::start_pair(
            o,
            dir,
            "sigil",
            (ports.sigil_admin_server, ports.sigil_admin_client),
            sigil::l4_bodies(ports),
        )?;
        self.setup
            .ready
            .push(("sigil server-side (L4, no policies)", ready));
        self.groups
            .push(Group::new("sigil client-side", client.pid(), false));
        self.groups
            .push(Group::new("sigil server-side", server.pid(), false));
        self.procs.push(server);
        self.procs.push(client);
        self.paths.push(PathPorts {
            via: Via::Sigil,
            echo: Some(ports.sigil_client_echo),
            http: ports.sigil_client_http,
            h2: None,
        });

        let (docs, files, own) = sigil::write_policies(dir, o.policies, ports.http_backend)?;
        self.setup.policies = Some((docs, files, own));
        log(format!(
            "starting the sigil-proxy L7 pair: {docs} policies in {files} files, {own} targeting {SERVER_ID}"
        ));
        let (server, client, ready) = sigil::start_pair(
            o,
            dir,
            "sigil-l7",
            (ports.sigil_l7_admin_server, ports.sigil_l7_admin_client),
            sigil::l7_bodies(ports),
        )?;
        self.setup
            .ready
            .push(("sigil-l7 server-side (policyDir loaded)", ready));
        self.groups
            .push(Group::new("sigil-l7 client-side", client.pid(), false));
        self.groups
            .push(Group::new("sigil-l7 server-side", server.pid(), false));
        self.procs.push(server);
        self.procs.push(client);
        // h2c goes through the client side's L4 relay; the server side serves HTTP/2 itself
        // and forwards to the workload's HTTP/1.1 port.
        self.paths.push(PathPorts {
            via: Via::SigilL7,
            echo: None,
            http: ports.sigil_l7_client_http,
            h2: Some(ports.sigil_l7_client_http),
        });
        Ok(())
    }

    /// The nginx stream (L4) pair and the nginx http (L7) pair, server sides first.
    fn start_nginx_pairs(&mut self, o: &Opts, dir: &Path) -> Result<(), String> {
        let ports = &self.ports;
        log("starting the nginx pairs");
        let w = o.nginx_workers;
        let l4s = nginx::start(
            o,
            dir,
            "nginx-l4-server",
            T_L4_SERVER,
            w,
            &[
                ("ECHO_LISTEN", ports.l4_server_echo.to_string()),
                ("ECHO_UPSTREAM", ports.echo_backend.to_string()),
                ("HTTP_LISTEN", ports.l4_server_http.to_string()),
                ("HTTP_UPSTREAM", ports.http_backend.to_string()),
            ],
            &[ports.l4_server_echo, ports.l4_server_http],
        )?;
        let l4c = nginx::start(
            o,
            dir,
            "nginx-l4-client",
            T_L4_CLIENT,
            w,
            &[
                ("ECHO_LISTEN", ports.l4_client_echo.to_string()),
                ("ECHO_UPSTREAM", ports.l4_server_echo.to_string()),
                ("HTTP_LISTEN", ports.l4_client_http.to_string()),
                ("HTTP_UPSTREAM", ports.l4_server_http.to_string()),
            ],
            &[ports.l4_client_echo, ports.l4_client_http],
        )?;
        let l7s = nginx::start(
            o,
            dir,
            "nginx-l7-server",
            T_L7_SERVER,
            w,
            &[
                ("HTTP_LISTEN", ports.l7_server_http.to_string()),
                ("HTTP_UPSTREAM", ports.http_backend.to_string()),
            ],
            &[ports.l7_server_http],
        )?;
        let l7c = nginx::start(
            o,
            dir,
            "nginx-l7-client",
            T_L7_CLIENT,
            w,
            &[
                ("HTTP_LISTEN", ports.l7_client_http.to_string()),
                ("H2_LISTEN", ports.l7_client_h2.to_string()),
                ("HTTP_UPSTREAM", ports.l7_server_http.to_string()),
            ],
            &[ports.l7_client_http, ports.l7_client_h2],
        )?;
        self.groups.extend([
            Group::new("nginx-l4 client-side", l4c.pid(), true),
            Group::new("nginx-l4 server-side", l4s.pid(), true),
            Group::new("nginx-l7 client-side", l7c.pid(), true),
            Group::new("nginx-l7 server-side", l7s.pid(), true),
        ]);
        self.procs.extend([l4s, l4c, l7s, l7c]);
        self.paths.push(PathPorts {
            via: Via::NginxL4,
            echo: Some(ports.l4_client_echo),
            http: ports.l4_client_http,
            h2: None,
        });
        self.paths.push(PathPorts {
            via: Via::NginxL7,
            echo: None,
            http: ports.l7_client_http,
            h2: Some(ports.l7_client_h2),
        });
        Ok(())
    }
}

/// Backends: the toy workload echoes (thread per connection); one nginx worker serves the
/// HTTP page (HTTP/1.1 on one port, h2c on another). Both are shared by every path, so their
/// cost is the same for all. Returns the processes and their groups.
fn start_backends(
    o: &Opts,
    dir: &Path,
    toy: &Path,
    ports: &Ports,
) -> Result<(Vec<Proc>, Vec<Group>), String> {
    let echo = Proc::spawn(
        "echo-backend",
        Command::new(toy).args([
            "--listen",
            &format!("127.0.0.1:{}", ports.echo_backend),
            "--name",
            "echo",
            "--echo",
        ]),
    );
    wait_for_port(addr(ports.echo_backend), Duration::from_secs(10));
    let http_backend = nginx::start(
        o,
        dir,
        "backend",
        T_BACKEND,
        1,
        &[
            ("HTTP_LISTEN", ports.http_backend.to_string()),
            ("H2_LISTEN", ports.http_backend_h2.to_string()),
        ],
        &[ports.http_backend, ports.http_backend_h2],
    )?;
    let groups = vec![
        Group::new("backend: echo (toy workload)", echo.pid(), false),
        Group::new("backend: http (nginx, 1 worker)", http_backend.pid(), true),
    ];
    Ok((vec![echo, http_backend], groups))
}
