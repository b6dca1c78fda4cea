//! Mutual TLS for every meshkit server and balanced channel, with rustls.
//!
//! A process's certificate, key and CA bundle come from files (`tls.*`) and
//! are read again when they change: new connections use the new certificate,
//! connections already open go on. A server asks every client for a
//! certificate signed by the CA; the caller's identity (the `spiffe://` URI
//! SAN, or the subject CN) travels with each request as a [`PeerIdentity`]
//! extension. A client checks the server's chain against the CA; it accepts a
//! certificate whose names do not include the address it dialled when the
//! certificate carries a SPIFFE identity (instances are dialled by IP, and
//! SPIFFE authenticates workloads by identity, not by host name).
//!
//! [`authz`] decides who may call what by that identity.
#![forbid(unsafe_code)]

pub mod authz;
pub mod error;
pub mod settings;

pub use error::{Error, Result};
pub use settings::{AuthzSettings, TlsSettings};

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity in a certificate: its first `spiffe://` URI SAN, else any
/// URI SAN, else the subject's common name.
pub fn identity_of(der: &[u8]) -> Option<String> {
    let cert = der::Cert::parse(der)?;
    let uris = cert.san_uris();
    if let Some(spiffe) = uris.iter().find(|u| u.starts_with("spiffe://")) {
        return Some(spiffe.clone());
    }
    if let Some(uri) = uris.into_iter().next() {
        return Some(uri);
    }
    cert.common_name()
}

/// Seconds since the epoch when a certificate stops being valid.
fn not_after(der: &[u8]) -> Option<i64> {
    der::Cert::parse(der)?.not_after()
}

/// Just enough DER to read a certificate's subject alternative names, common
/// name and expiry (the chain itself is verified by rustls/webpki).
mod der {
    /// One TLV: its tag and contents.
    fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }

    fn children(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
        std::iter::from_fn(move || {
            let (tag, value, rest) = next(input)?;
            input = rest;
            Some((tag, value))
        })
    }

    const SEQUENCE: u8 = 0x30;
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    const CN: &[u8] = &[0x55, 0x04, 0x03];

    pub(super) struct Cert<'a> {
        validity: &'a [u8],
        subject: &'a [u8],
        extensions: Option<&'a [u8]>,
    }

    impl<'a> Cert<'a> {
        pub(super) fn parse(der: &'a [u8]) -> Option<Self> {
            let (SEQUENCE, cert, _) = next(der)? else { return None };
            let (SEQUENCE, tbs, _) = next(cert)? else { return None };
            let mut fields = children(tbs).peekable();
            if fields.peek()?.0 == 0xa0 {
                fields.next(); // version
            }
            let _serial = fields.next()?;
            let _signature = fields.next()?;
            let _issuer = fields.next()?;
            let (_, validity) = fields.next()?;
            let (_, subject) = fields.next()?;
            let _key = fields.next()?;
            let extensions = fields.find(|(tag, _)| *tag == 0xa3).and_then(|(_, v)| next(v)).map(|(_, v, _)| v);
            Some(Self { validity, subject, extensions })
        }

        /// URI names of the subject alternative name extension.
        pub(super) fn san_uris(&self) -> Vec<String> {
            let Some(extensions) = self.extensions else { return Vec::new() };
            for (_, extension) in children(extensions) {
                let mut parts = children(extension);
                let Some((0x06, oid)) = parts.next() else { continue };
                if oid != SAN {
                    continue;
                }
                // An optional `critical` BOOLEAN, then the OCTET STRING holding the names.
                let Some((_, names)) = parts.find(|(tag, _)| *tag == 0x04) else { return Vec::new() };
                let Some((SEQUENCE, names, _)) = next(names) else { return Vec::new() };
                return children(names)
                    .filter(|(tag, _)| *tag == 0x86)
                    .filter_map(|(_, uri)| std::str::from_utf8(uri).ok().map(str::to_owned))
                    .collect();
            }
            Vec::new()
        }

        /// The subject's first common name.
        pub(super) fn common_name(&self) -> Option<String> {
            for (_, set) in children(self.subject) {
                for (_, attribute) in children(set) {
                    let mut parts = children(attribute);
                    if parts.next() == Some((0x06, CN)) {
                        let (_, value) = parts.next()?;
                        return std::str::from_utf8(value).ok().map(str::to_owned);
                    }
                }
            }
            None
        }

        /// `notAfter` in seconds since the epoch.
        pub(super) fn not_after(&self) -> Option<i64> {
            let (tag, time) = children(self.validity).nth(1)?;
            let text = std::str::from_utf8(time).ok()?;
            let (format, text) = match tag {
                0x17 => {
                    // UTCTime: YYMMDDHHMMSSZ, years 50-99 are 19xx.
                    let century = if text.get(..2)?.parse::<u32>().ok()? >= 50 { "19" } else { "20" };
                    ("%Y%m%d%H%M%SZ", format!("{century}{text}"))
                }
                0x18 => ("%Y%m%d%H%M%SZ", text.to_owned()),
                _ => return None,
            };
            chrono::NaiveDateTime::parse_from_str(&text, format).ok().map(|t| t.and_utc().timestamp())
        }
    }
}

/// The caller's identity on a request that came over mTLS (a request
/// extension; absent on plaintext connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);

/// The identity of the caller of `request`, when it came over mTLS.
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.extensions().get::<ConnectInfo>().and_then(|c| c.identity.as_ref()).map(|p| &*p.0)
}

/// What a server connection knows about its peer (tonic puts it in every
/// request's extensions).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    pub remote: Option<SocketAddr>,
    pub identity: Option<PeerIdentity>,
}

struct Current {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Arc<str>,
    not_after: i64,
    files: Files,
}

/// A process's TLS material, kept current from its files.
pub struct Tls {
    settings: TlsSettings,
    current: RwLock<Arc<Current>>,
    reloads: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("identity", &self.identity()).field("cert_file", &self.settings.cert_file).finish()
    }
}

/// The certificate, key and CA files' contents, read once per check.
type Files = [Vec<u8>; 3];

fn read_files(settings: &TlsSettings) -> Result<Files> {
    Ok([
        read_file("tls.cert_file", &settings.cert_file)?,
        read_file("tls.key_file", &settings.key_file)?,
        read_file("tls.ca_file", &settings.ca_file)?,
    ])
}

/// Reads `path` for `setting`; the error names both.
pub fn read_file(setting: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::ReadFile { setting: setting.to_owned(), path: path.to_owned(), source })
}

/// A PEM certificate chain (leaf first) from `pem`, the contents of `path`.
pub fn pem_chain(setting: &str, path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config(format!("{setting}: {path:?} is not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(Error::Config(format!("{setting}: {path:?} holds no certificate")));
    }
    Ok(chain)
}

/// A PEM private key from `pem`; the error names the file, never its contents.
pub fn pem_key(setting: &str, path: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| Error::Config(format!("{setting}: {path:?} holds no PEM private key")))
}

/// The CA certificates in `pem` as trust roots (at least one).
pub fn pem_roots(setting: &str, path: &str, pem: &[u8]) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pem) {
        let ca = ca.map_err(|e| Error::Config(format!("{setting}: {path:?} is not PEM certificates: {e}")))?;
        roots.add(ca).map_err(|e| Error::Config(format!("{setting}: a CA certificate in {path:?}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(format!("{setting}: {path:?} holds no CA certificate")));
    }
    Ok(roots)
}

fn build(settings: &TlsSettings, files: Files) -> Result<Current> {
    let bad = |setting: &str, problem: String| Error::Config(format!("{setting}: {problem}"));
    let [cert, key, ca] = &files;
    let chain = pem_chain("tls.cert_file", &settings.cert_file, cert)?;
    let leaf = &chain[0];
    let key = pem_key("tls.key_file", &settings.key_file, key)?;
    let roots = pem_roots("tls.ca_file", &settings.ca_file, ca)?;
    let identity = identity_of(leaf).unwrap_or_default();
    let not_after = not_after(leaf).unwrap_or(0);
    let roots = Arc::new(roots);

    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    let client_verifier =
        if settings.client_auth == "optional" { client_verifier.allow_unauthenticated() } else { client_verifier };
    let client_verifier = client_verifier.build().map_err(|e| bad("tls.ca_file", e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| bad("tls.key_file", format!("does not match tls.cert_file: {e}")))?;
    server.alpn_protocols = vec![b"h2".to_vec()];

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| bad("tls.ca_file", e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MeshVerifier(server_verifier)))
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("tls.key_file", format!("does not match tls.cert_file: {e}")))?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Current { server: Arc::new(server), client: Arc::new(client), identity: identity.into(), not_after, files })
}

impl Tls {
    /// Reads the files named by `settings`; the error names the setting and
    /// the file, never a key's contents.
    pub fn load(settings: &TlsSettings) -> Result<Arc<Self>> {
        let files = read_files(settings)?;
        let current = build(settings, files)?;
        tracing::info!(identity = %current.identity, cert = settings.cert_file, "TLS certificate loaded");
        Ok(Arc::new(Self {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(current)),
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }))
    }

    /// `Some` when `settings.enabled`, loaded and reloading in the background.
    pub fn from_settings(settings: &TlsSettings) -> Result<Option<Arc<Self>>> {
        if !settings.enabled {
            return Ok(None);
        }
        let tls = Self::load(settings)?;
        tls.spawn_reloader();
        Ok(Some(tls))
    }

    fn now(&self) -> Arc<Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// For accepting connections now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.now().server.clone()
    }

    /// For dialling connections now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.now().client.clone()
    }

    /// This process's own identity (from its certificate).
    pub fn identity(&self) -> Arc<str> {
        self.now().identity.clone()
    }

    /// Reads the files again; swaps the configuration in when they changed
    /// and are good. Returns whether it changed; a bad set keeps the old one.
    pub fn reload(&self) -> Result<bool> {
        let outcome = read_files(&self.settings).and_then(|files| {
            if files == self.now().files {
                return Ok(None);
            }
            build(&self.settings, files).map(Some)
        });
        match outcome {
            Ok(None) => Ok(false),
            Ok(Some(current)) => {
                tracing::info!(identity = %current.identity, "TLS certificate reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(current);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(true)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let message = e.to_string();
                let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "TLS files changed but cannot be used; keeping the loaded ones");
                }
                *last = Some(message);
                Err(e)
            }
        }
    }

    /// Polls the files every `tls.reload_ms` while this `Tls` lives.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = Duration::from_millis(self.settings.reload_ms.max(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(tls) = weak.upgrade() else { return };
                // Files half written by a rotation fail to parse; the next poll sees them whole.
                let _ = tls.reload();
            }
        });
    }

    /// For `/reports`.
    pub fn report(&self) -> serde_json::Value {
        let current = self.now();
        serde_json::json!({
            "identity": &*current.identity,
            "cert_file": self.settings.cert_file,
            "not_after": current.not_after,
            "reloads": self.reloads.load(Ordering::Relaxed),
            "failed_reloads": self.failures.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }

    /// Server side of a TCP connection: the handshake, then a stream tonic
    /// serves that knows its peer's identity.
    pub async fn accept(&self, tcp: tokio::net::TcpStream) -> io::Result<MeshTlsStream> {
        let remote = tcp.peer_addr().ok();
        let stream = TlsAcceptor::from(self.server_config()).accept(tcp).await?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| identity_of(leaf))
            .map(|id| PeerIdentity(id.into()));
        Ok(MeshTlsStream { inner: stream, info: ConnectInfo { remote, identity } })
    }

    /// Client side: the handshake over `tcp` to `host` (a name or an IP).
    pub async fn connect(
        &self,
        host: &str,
        tcp: tokio::net::TcpStream,
    ) -> io::Result<client::TlsStream<tokio::net::TcpStream>> {
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?} is not a server name: {e}")))?;
        TlsConnector::from(self.client_config()).connect(name, tcp).await
    }
}

/// Accepts a certificate whose chain the CA signed but whose names do not
/// include the dialled address, when it carries a SPIFFE identity. The chain
/// is verified first (rustls checks the chain before the name).
#[derive(Debug)]
struct MeshVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if identity_of(end_entity).is_some_and(|id| id.starts_with("spiffe://")) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A server-side TLS connection that tells tonic who the peer is.
pub struct MeshTlsStream {
    inner: server::TlsStream<tokio::net::TcpStream>,
    info: ConnectInfo,
}

impl tonic::transport::server::Connected for MeshTlsStream {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshTlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshTlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections and hands out those whose handshake succeeded,
/// each handshake on its own task (a slow client holds up nobody), bounded
/// by 10 s.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<Tls>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<MeshTlsStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = tcp.peer_addr().ok();
                match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        handshake_failed("server");
                        tracing::debug!(?peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        handshake_failed("server");
                        tracing::debug!(?peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Counts a failed handshake (`side` = server or client).
pub fn handshake_failed(side: &str) {
    HANDSHAKE_FAILURES.get_or_create(&SideLabels { side: side.to_owned() }).inc();
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SideLabels {
    side: String,
}

/// `meshkit_tls_handshake_failures_total{side}`.
static HANDSHAKE_FAILURES: std::sync::LazyLock<meshkit_telemetry::metrics::CounterFamily<SideLabels>> =
    std::sync::LazyLock::new(|| {
        meshkit_telemetry::metrics::counters(
            "meshkit_tls_handshake_failures",
            "TLS handshakes that failed: no or a bad client certificate, another CA, a timeout.",
        )
    });

/// A tonic channel to one address, over mTLS when `tls` is given (for calls
/// to a particular instance rather than through a balanced channel); it
/// connects on first use.
pub fn channel(addr: &str, tls: Option<Arc<Tls>>) -> Result<tonic::transport::Channel> {
    let endpoint = endpoint(addr)?;
    Ok(match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(connector(tls)),
    })
}

/// As [`channel`], connected now: an unreachable address is an error here.
pub async fn connect(addr: &str, tls: Option<Arc<Tls>>) -> Result<tonic::transport::Channel> {
    let endpoint = endpoint(addr)?;
    Ok(match tls {
        None => endpoint.connect().await?,
        Some(tls) => endpoint.connect_with_connector(connector(tls)).await?,
    })
}

/// Flow-control window of each call on a channel's connection.
pub const STREAM_WINDOW: u32 = 512 * 1024;

fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Config(format!("address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        // Each call is held to its own window, and the connection's is no
        // limit: with hyper's 2 MiB / 5 MiB, three calls whose reader has
        // stalled (a slow client behind the gateway) would hold the whole
        // connection window and stall every other call sharing it.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(i32::MAX as u32))
}

type Connected = hyper_util::rt::TokioIo<client::TlsStream<tokio::net::TcpStream>>;

fn connector(
    tls: Arc<Tls>,
) -> impl tower::Service<
    http::Uri,
    Response = Connected,
    Error = io::Error,
    Future = Pin<Box<dyn std::future::Future<Output = io::Result<Connected>> + Send>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: http::Uri| {
        let tls = tls.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp =
                tokio::net::TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(&host, tcp).await.inspect_err(|_| handshake_failed("client"))?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }) as Pin<Box<dyn std::future::Future<Output = io::Result<Connected>> + Send>>
    })
}

/// TLS for a public listener (the gateway's HTTPS): a certificate and key
/// from files, read again when they change; no client certificate asked for.
pub struct EdgeTls {
    /// The settings' section, named in errors (`gateway`, `console`).
    section: String,
    cert_file: String,
    key_file: String,
    alpn: Vec<Vec<u8>>,
    current: RwLock<(Arc<ServerConfig>, Vec<u8>)>,
}

impl EdgeTls {
    /// `section`: whose `tls_cert_file` and `tls_key_file` these are, as
    /// errors name them; `alpn`: the protocols offered, preferred first
    /// (`h2`, `http/1.1`).
    pub fn load(section: &str, cert_file: &str, key_file: &str, alpn: &[&[u8]]) -> Result<Arc<Self>> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let (config, files) = Self::build(section, cert_file, key_file, &alpn)?;
        let edge = Arc::new(Self {
            section: section.to_owned(),
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            alpn,
            current: RwLock::new((config, files)),
        });
        let weak = Arc::downgrade(&edge);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(edge) = weak.upgrade() else { return };
                edge.reload();
            }
        });
        Ok(edge)
    }

    fn build(section: &str, cert_file: &str, key_file: &str, alpn: &[Vec<u8>]) -> Result<(Arc<ServerConfig>, Vec<u8>)> {
        let (cert_setting, key_setting) = (format!("{section}.tls_cert_file"), format!("{section}.tls_key_file"));
        let cert = read_file(&cert_setting, cert_file)?;
        let key = read_file(&key_setting, key_file)?;
        let chain = pem_chain(&cert_setting, cert_file, &cert)?;
        let private = pem_key(&key_setting, key_file, &key)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("{section}.tls: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| Error::Config(format!("{key_setting}: does not match {cert_setting}: {e}")))?;
        config.alpn_protocols = alpn.to_vec();
        let mut files = cert;
        files.extend_from_slice(&key);
        Ok((Arc::new(config), files))
    }

    fn reload(&self) {
        let (Ok(cert), Ok(key)) = (std::fs::read(&self.cert_file), std::fs::read(&self.key_file)) else { return };
        let mut files = cert;
        files.extend_from_slice(&key);
        if files == self.current.read().unwrap_or_else(|p| p.into_inner()).1 {
            return;
        }
        match Self::build(&self.section, &self.cert_file, &self.key_file, &self.alpn) {
            Ok(next) => {
                tracing::info!(cert = self.cert_file, "edge TLS certificate reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
            }
            Err(e) => tracing::warn!(error = %e, "edge TLS files changed but cannot be used; keeping the loaded ones"),
        }
    }

    /// The handshake of one accepted connection.
    pub async fn accept(&self, tcp: tokio::net::TcpStream) -> io::Result<server::TlsStream<tokio::net::TcpStream>> {
        let config = self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        TlsAcceptor::from(config).accept(tcp).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn identities_and_expiry_come_out_of_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "order-service");
        params.not_after = rcgen::date_time_ymd(2031, 5, 6);
        let with_cn = params.self_signed(&key).unwrap();
        assert_eq!(super::identity_of(with_cn.der()).as_deref(), Some("order-service"), "the CN without a URI SAN");
        assert_eq!(super::not_after(with_cn.der()), Some(1_935_792_000));
        params.subject_alt_names.push(rcgen::SanType::URI("https://example.com/x".try_into().unwrap()));
        params.subject_alt_names.push(rcgen::SanType::URI("spiffe://meshkit/order-service".try_into().unwrap()));
        let with_uri = params.self_signed(&key).unwrap();
        assert_eq!(super::identity_of(with_uri.der()).as_deref(), Some("spiffe://meshkit/order-service"));
        assert_eq!(super::identity_of(b"\x30\x03\x02\x01"), None, "garbage is no identity");
        assert_eq!(super::identity_of(&[]), None);
    }
}
