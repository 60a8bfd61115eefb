//! The `sigil` CLI's side of the operator API: one HTTPS request over mutual TLS, the control
//! plane's SVID pinned to the expected ID as a sidecar pins its peers.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use sigil_config::SpiffeId;
use sigil_filters::tls::{client_config, Carries};
use tokio_rustls::TlsConnector;

use crate::identity::Identity;

/// Why a request got no answer from the control plane; each names the server.
#[derive(Debug)]
pub enum ClientError {
    /// The runtime that carries the request could not be started.
    Runtime(io::Error),
    ConnectTimeout(SocketAddr),
    Connect {
        server: SocketAddr,
        source: io::Error,
    },
    /// The handshake failed: often the server is not the pinned control-plane ID, or does
    /// not accept this SVID.
    Tls {
        server: SocketAddr,
        source: io::Error,
    },
    Http {
        server: SocketAddr,
        source: hyper::Error,
    },
    /// The request could not be built (a header value HTTP cannot carry).
    Request(hyper::http::Error),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Runtime(e) => write!(f, "cannot start the client runtime: {e}"),
            Self::ConnectTimeout(server) => write!(f, "{server}: connect timed out"),
            Self::Connect { server, source } => write!(f, "{server}: {source}"),
            Self::Tls { server, source } => {
                write!(f, "{server}: TLS with the control plane failed: {source}")
            }
            Self::Http { server, source } => write!(f, "{server}: {source}"),
            Self::Request(e) => write!(f, "invalid request: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

pub struct Client {
    pub server: SocketAddr,
    pub control_id: SpiffeId,
    pub identity: Identity,
}

impl Client {
    /// Sends one request; (status, body text).
    pub fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<(StatusCode, String), ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        rt.block_on(self.send_async(method, path, headers, body))
    }

    async fn send_async(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<(StatusCode, String), ClientError> {
        let server = self.server;
        let http = |source| ClientError::Http { server, source };
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(server),
        )
        .await
        .map_err(|_| ClientError::ConnectTimeout(server))?
        .map_err(|source| ClientError::Connect { server, source })?;
        let id = &self.identity;
        let config = client_config(
            &id.local,
            id.bundles.clone(),
            Arc::default(),
            id.provider.clone(),
            self.control_id.clone(),
            Carries::Http1,
        );
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(server.ip().into()), tcp)
            .await
            .map_err(|source| ClientError::Tls { server, source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", server.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(ClientError::Request)?;
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
