//! TLS towards clients: several certificates, chosen by SNI; HTTP/2 offered via ALPN.
//! A client that sends no SNI, or a name no certificate covers, gets the first
//! certificate (like nginx's default server).

use rampart_config::Certificate;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn covers(ck: &CertifiedKey, name: &ServerName<'_>) -> bool {
        let Ok(der) = ck.end_entity_cert() else { return false };
        match webpki::EndEntityCert::try_from(der) {
            Ok(ee) => ee.verify_is_valid_for_subject_name(name).is_ok(),
            Err(_) => false,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name()
            && let Ok(name) = ServerName::try_from(sni)
            && let Some(ck) = self.certs.iter().find(|ck| Self::covers(ck, &name))
        {
            return Some(ck.clone());
        }
        self.certs.first().cloned()
    }
}

/// Load one certificate chain and key; errors name the field.
fn load_pair(
    c: &Certificate,
    at: &str,
    base: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, (String, String)> {
    let resolve = |p: &str| {
        if Path::new(p).is_absolute() {
            Path::new(p).to_path_buf()
        } else {
            base.join(p)
        }
    };
    let cert_path = resolve(&c.cert);
    let key_path = resolve(&c.key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                format!("{at}.cert"),
                format!("cannot load {}: {e}", cert_path.display()),
            )
        })?;
    if chain.is_empty() {
        return Err((
            format!("{at}.cert"),
            format!("no certificate in {}", cert_path.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        (
            format!("{at}.key"),
            format!("cannot load a private key from {}: {e}", key_path.display()),
        )
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| (format!("{at}.key"), format!("unsupported private key: {e}")))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| (format!("{at}.key"), format!("does not match the certificate: {e}")))?;
    Ok(ck)
}

/// The server's crypto provider: rustls' defaults, with AES-128-GCM suites first.
/// With `ignore_client_order` the server's order wins, as Go's crypto/tls and
/// Cloudflare do: AES-128-GCM is as safe in practice as AES-256-GCM and cheaper
/// (a full TLS 1.3 handshake measured 125 → 113 µs of server CPU; see
/// docs/architecture.md), and every suite rustls offers stays available to
/// clients that lack it.
fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as S;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        _ => 1,
    });
    provider
}

/// Build the rustls server config for the TLS listeners.
pub fn server_config(
    certs: &[Certificate],
    http2: bool,
    base: &Path,
) -> Result<Arc<rustls::ServerConfig>, Vec<(String, String)>> {
    let provider = Arc::new(server_provider());
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for (i, c) in certs.iter().enumerate() {
        match load_pair(c, &format!("server.tls.certificates[{i}]"), base, &provider) {
            Ok(ck) => loaded.push(Arc::new(ck)),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![("server.tls".to_string(), e.to_string())])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs: loaded }));
    cfg.ignore_client_order = true;
    cfg.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cfg))
}
