//! Mutual TLS for the migration stream, from rustls: each end presents a
//! certificate signed by the CA and verifies the other's, so device state goes
//! only between hosts of the same PKI, encrypted. The files follow libvirt's layout
//! ([`Files::libvirt`]): one CA, a server identity that the destination presents,
//! a client identity that the source presents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Files {
    /// libvirt's PKI paths (what `virsh migrate --tls` uses).
    pub fn libvirt() -> Files {
        Files {
            ca: "/etc/pki/CA/cacert.pem".into(),
            server_cert: "/etc/pki/libvirt/servercert.pem".into(),
            server_key: "/etc/pki/libvirt/private/serverkey.pem".into(),
            client_cert: "/etc/pki/libvirt/clientcert.pem".into(),
            client_key: "/etc/pki/libvirt/private/clientkey.pem".into(),
        }
    }
}

/// Both ends' TLS configurations.
#[derive(Clone)]
pub struct Tls {
    pub(super) client: Arc<ClientConfig>,
    pub(super) server: Arc<ServerConfig>,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Tls {
        path: path.to_path_buf(),
        reason: what.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, e))?;
    if certs.is_empty() {
        return Err(bad(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(path, e))
}

impl Tls {
    /// Reads the CA and both identities.
    pub fn from_files(f: &Files) -> Result<Tls> {
        Tls::new(
            certs(&f.ca)?,
            (certs(&f.server_cert)?, key(&f.server_key)?),
            (certs(&f.client_cert)?, key(&f.client_key)?),
        )
        .map_err(|e| bad(&f.ca, e))
    }

    /// From certificates in memory: the CAs to trust, then the server's and the
    /// client's chain and key.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        client: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ) -> std::result::Result<Tls, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(server.0, server.1)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(client.0, client.1)?;
        Ok(Tls {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}

impl Tls {
    /// The source's side (for a benchmark's bare TLS floor).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The destination's side.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }
}

/// The name the destination's certificate must carry: the host of `HOST:PORT`.
pub(super) fn server_name(endpoint: &str) -> Option<ServerName<'static>> {
    let host = endpoint.rsplit_once(':')?.0;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).ok()
}

/// Credentials for tests and benchmarks: a fresh CA, and one identity for both
/// roles valid for `127.0.0.1` and `localhost`.
#[cfg(feature = "test-credentials")]
pub fn test_credentials() -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).expect("a CA");
    let key = KeyPair::generate().expect("a key");
    let leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("a certificate");
    let der = PrivateKeyDer::try_from(key.serialize_der()).expect("a key");
    let id = || (vec![leaf.der().clone()], der.clone_key());
    Tls::new(vec![ca.der().clone()], id(), id()).expect("TLS configurations")
}
