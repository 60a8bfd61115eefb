//! The `sigil` CLI's side of the operator API: one HTTPS request over mutual TLS, the control
//! plane's SVID pinned to the expected ID as a sidecar pins its peers.

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
    ) -> Result<(StatusCode, String), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(self.send_async(method, path, headers, body))
    }

    async fn send_async(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: String,
    ) -> Result<(StatusCode, String), String> {
        let server = self.server;
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(server),
        )
        .await
        .map_err(|_| format!("{server}: connect timed out"))?
        .map_err(|e| format!("{server}: {e}"))?;
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
            .map_err(|e| format!("{server}: TLS with the control plane failed: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
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
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{server}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
