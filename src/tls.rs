//! TLS on the public listener: the certificate chain and private key (PEM files
//! named by the `tls` section) read and checked against each other, and the
//! rustls server configuration (ALPN `h2` then `http/1.1`) whose certificate
//! resolver hands each new handshake the pair of the current snapshot, so a
//! reload that read a new pair serves it from the next handshake on.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate chain with its private key, read and checked.
#[derive(Clone)]
pub struct Pair(pub Arc<CertifiedKey>);

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key; the chain's length is enough to tell pairs apart in a log.
        write!(f, "Pair({} certificates)", self.0.cert.len())
    }
}

/// The crypto the listener uses (ring, as the upstream client does).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads `cert` (PEM, the server certificate first, then its intermediates) and
/// `key` (PEM: PKCS#8, PKCS#1 or SEC1) and checks that the key is the
/// certificate's. A problem is returned as (field, message): `tls.cert` or
/// `tls.key`.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Pair, (&'static str, String)> {
    let cert_pem = std::fs::read(cert)
        .map_err(|e| ("tls.cert", format!("cannot read `{}`: {e}", cert.display())))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                "tls.cert",
                format!("`{}` is not valid PEM: {e}", cert.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            "tls.cert",
            format!(
                "no certificate in `{}` (expected PEM `CERTIFICATE` blocks)",
                cert.display()
            ),
        ));
    }
    let key_pem = std::fs::read(key)
        .map_err(|e| ("tls.key", format!("cannot read `{}`: {e}", key.display())))?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        (
            "tls.key",
            format!(
                "no private key in `{}` (expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block): {e}",
                key.display()
            ),
        )
    })?;
    let signing = provider().key_provider.load_private_key(der).map_err(|e| {
        (
            "tls.key",
            format!("`{}` is not a usable private key: {e}", key.display()),
        )
    })?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Pair(Arc::new(pair)))
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err((
            "tls.key",
            format!(
                "`{}` is not the private key of the certificate in `{}`",
                key.display(),
                cert.display()
            ),
        )),
        Err(e) => Err((
            "tls.cert",
            format!("`{}`: the certificate cannot be read: {e}", cert.display()),
        )),
    }
}

/// Hands each handshake the pair of the current snapshot; the pair read at
/// start when a reload dropped the `tls` section (TLS is switched on or off at
/// start only).
struct Resolver {
    gw: Arc<crate::Gateway>,
    start: Pair,
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.gw.snapshot();
        Some(match &snap.config.tls {
            Some(t) => t.pair.0.clone(),
            None => self.start.0.clone(),
        })
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// The listener's TLS acceptor: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, the
/// certificate of the gateway's current snapshot.
pub fn acceptor(
    gw: Arc<crate::Gateway>,
    start: Pair,
) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver { gw, start }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
