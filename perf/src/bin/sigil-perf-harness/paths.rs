//! The paths under test (direct, the sigil pairs, the nginx pairs) and the loopback ports of
//! every listener the harness starts.

use sigil_e2e::free_port;

pub struct Ports {
    pub echo_backend: u16,
    pub http_backend: u16,
    pub http_backend_h2: u16,
    pub sigil_admin_client: u16,
    pub sigil_admin_server: u16,
    pub sigil_client_echo: u16,
    pub sigil_client_http: u16,
    pub sigil_server_echo: u16,
    pub sigil_server_http: u16,
    pub sigil_l7_admin_client: u16,
    pub sigil_l7_admin_server: u16,
    pub sigil_l7_client_http: u16,
    pub sigil_l7_server_http: u16,
    pub l4_client_echo: u16,
    pub l4_client_http: u16,
    pub l4_server_echo: u16,
    pub l4_server_http: u16,
    pub l7_client_http: u16,
    pub l7_client_h2: u16,
    pub l7_server_http: u16,
}

impl Ports {
    pub fn allocate() -> Self {
        let mut used = std::collections::HashSet::new();
        let mut next = || loop {
            let p = free_port();
            if used.insert(p) {
                return p;
            }
        };
        Self {
            echo_backend: next(),
            http_backend: next(),
            http_backend_h2: next(),
            sigil_admin_client: next(),
            sigil_admin_server: next(),
            sigil_client_echo: next(),
            sigil_client_http: next(),
            sigil_server_echo: next(),
            sigil_server_http: next(),
            sigil_l7_admin_client: next(),
            sigil_l7_admin_server: next(),
            sigil_l7_client_http: next(),
            sigil_l7_server_http: next(),
            l4_client_echo: next(),
            l4_client_http: next(),
            l4_server_echo: next(),
            l4_server_http: next(),
            l7_client_http: next(),
            l7_client_h2: next(),
            l7_server_http: next(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Via {
    Direct,
    Sigil,
    SigilL7,
    NginxL4,
    NginxL7,
}

impl Via {
    pub const ALL: [Via; 5] = [
        Via::Direct,
        Via::Sigil,
        Via::SigilL7,
        Via::NginxL4,
        Via::NginxL7,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (no proxy)",
            Self::Sigil => "sigil-proxy pair (L4 mTLS)",
            Self::SigilL7 => "sigil-proxy pair (L7 server side, policies)",
            Self::NginxL4 => "nginx stream pair (L4 mTLS)",
            Self::NginxL7 => "nginx http pair (L7 mTLS, keep-alive upstreams)",
        }
    }

    /// Names of the process groups that make up this path's proxies.
    pub fn groups(self) -> &'static [&'static str] {
        match self {
            Self::Direct => &[],
            Self::Sigil => &["sigil client-side", "sigil server-side"],
            Self::SigilL7 => &["sigil-l7 client-side", "sigil-l7 server-side"],
            Self::NginxL4 => &["nginx-l4 client-side", "nginx-l4 server-side"],
            Self::NginxL7 => &["nginx-l7 client-side", "nginx-l7 server-side"],
        }
    }
}

/// One path under test and its entry ports: echo (bulk), HTTP/1.1, HTTP/2 with prior knowledge.
#[derive(Clone, Copy)]
pub struct PathPorts {
    pub via: Via,
    pub echo: Option<u16>,
    pub http: u16,
    pub h2: Option<u16>,
}
