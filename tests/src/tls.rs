//! The sidecar's own TLS configs and an HTTP/2 server, for in-test stand-ins of sidecars and
//! control planes.

use std::sync::Arc;

use sigil_testkit::Ca;

/// The TLS configs a sidecar with `id`'s SVID from `ca` would use (the sidecar's own code,
/// `sigil_filters::tls`), trusting `ca` alone: for in-test stand-ins of sidecars and control
/// planes, and for clients that must speak to a sidecar as a peer sidecar does.
pub struct SidecarTls {
    identity: sigil_filters::LocalIdentity,
    bundles: Arc<sigil_filters::TrustBundles>,
}

impl SidecarTls {
    pub fn new(ca: &Ca, id: &str) -> Self {
        let svid = ca.svid(id);
        let identity = sigil_filters::LocalIdentity::from_pem(
            svid.chain_pem().as_bytes(),
            svid.key_pem().as_bytes(),
            rustls::pki_types::UnixTime::now(),
            None,
            &sigil_filters::tls::provider(),
        )
        .expect("a fresh SVID is valid");
        let mut bundles = sigil_filters::TrustBundles::new();
        let td = sigil_config::TrustDomain::parse(ca.trust_domain()).expect("a trust domain");
        bundles
            .insert_pem(&td, ca.bundle_pem().as_bytes())
            .expect("the CA's bundle");
        Self {
            identity,
            bundles: Arc::new(bundles),
        }
    }

    /// The inbound side: presents the SVID, verifies the client's.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        sigil_filters::tls::server_config(
            &self.identity,
            self.bundles.clone(),
            Arc::default(),
            sigil_filters::tls::provider(),
        )
    }

    /// The outbound side towards `expected`, offering `carries` by ALPN.
    pub fn client(
        &self,
        expected: &str,
        carries: sigil_filters::tls::Carries,
    ) -> Arc<rustls::ClientConfig> {
        sigil_filters::tls::client_config(
            &self.identity,
            self.bundles.clone(),
            Arc::default(),
            sigil_filters::tls::provider(),
            sigil_config::SpiffeId::parse(expected).expect("a SPIFFE ID"),
            carries,
        )
    }
}

/// Serves HTTP/2 over TLS with `config` on a free loopback port, each request answered by
/// `handler`, on `rt` until it is dropped: the server of the in-test stand-ins for a peer
/// sidecar or a control plane. Returns the port.
pub fn serve_http2_tls<H, Fut, B>(
    rt: &tokio::runtime::Runtime,
    config: Arc<rustls::ServerConfig>,
    handler: H,
) -> u16
where
    H: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a loopback port");
    let port = listener.local_addr().expect("bound").port();
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
            });
        }
    });
    port
}
