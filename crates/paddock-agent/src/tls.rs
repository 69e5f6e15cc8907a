//! TLS client configuration: the web PKI roots plus an optional private CA bundle
//! (`PADDOCK_AGENT_TLS_CA_FILE`), for `wss://` and `https://` gateways.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

/// Builds a rustls client config (ring provider).
///
/// # Errors
/// Unreadable or invalid CA file.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in load_pem(path)? {
            roots
                .add(cert)
                .with_context(|| format!("{}: invalid CA certificate", path.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

fn load_pem(path: &Path) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate bundle", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificates found",
        path.display()
    );
    Ok(certs)
}

/// An HTTP client trusting the same roots.
///
/// # Errors
/// Unreadable or invalid CA file.
pub fn http_client(ca_file: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(30));
    if let Some(path) = ca_file {
        for cert in load_pem(path)? {
            b = b.add_root_certificate(
                reqwest::Certificate::from_der(cert.as_ref()).context("CA certificate")?,
            );
        }
    }
    Ok(b.build()?)
}
