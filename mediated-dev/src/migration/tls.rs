//! Mutual TLS for the migration stream, from rustls: each end presents a
//! certificate signed by the CA and verifies the other's, so device state goes
//! only between hosts of the same PKI, encrypted. The files follow libvirt's layout
//! ([`Files::libvirt`]): one CA, a server identity that the destination presents,
//! a client identity that the source presents.
//!
//! Or per migration ([`Tls::one_time`]): the destination makes a CA for this one
//! migration, issues one identity for itself and one for the source, and forgets
//! the CA's key. The source's identity goes back to the orchestrator (D-Bus
//! `PrepareIncomingOnce`), which hands it to the source (`MigrateOutWith`); only
//! its holder can send, and only to this destination.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Error, Result};
use vfio_manager_api::ids::IdError;

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
    /// The name the destination's certificate carries, if not the endpoint's host
    /// (one-time credentials name the migration, not a host).
    name: Option<ServerName<'static>>,
}

/// The name in a one-time destination certificate (`.invalid`: never a real host).
const ONE_TIME_NAME: &str = "migration.vfio-manager.invalid";
/// What a one-time bundle is called in errors.
const ONE_TIME: &str = "one-time migration credentials";
/// A bundle is three PEM blocks of a few hundred bytes each.
pub const MAX_BUNDLE: usize = 16 << 10;

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
            name: None,
        })
    }

    /// Credentials for one migration, made by its destination: its own TLS
    /// configuration, and the source's bundle (PEM: the migration's CA, the
    /// source's certificate and key) for [`Tls::from_one_time`].
    pub fn one_time() -> Result<(Tls, String)> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let fail = |e: rcgen::Error| bad(Path::new(ONE_TIME), e);
        let ca_key = KeyPair::generate().map_err(fail)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).map_err(fail)?;
        let issue = |names: Vec<String>| {
            let key = KeyPair::generate().map_err(fail)?;
            let cert = CertificateParams::new(names)
                .and_then(|p| p.signed_by(&key, &ca, &ca_key))
                .map_err(fail)?;
            Ok::<_, Error>((cert, key))
        };
        let (server, server_key) = issue(vec![ONE_TIME_NAME.into()])?;
        let (client, client_key) = issue(Vec::new())?;
        let bundle = format!("{}{}{}", ca.pem(), client.pem(), client_key.serialize_pem());
        // The CA's key goes out of scope here: no third certificate can ever be made.
        let key = PrivateKeyDer::try_from(server_key.serialize_der())
            .map_err(|e| bad(Path::new(ONE_TIME), e))?;
        let id = || (vec![server.der().clone()], key.clone_key());
        let mut tls = Tls::new(vec![ca.der().clone()], id(), id())
            .map_err(|e| bad(Path::new(ONE_TIME), e))?;
        tls.name = ServerName::try_from(ONE_TIME_NAME).ok();
        Ok((tls, bundle))
    }

    /// The source's side of one-time credentials, from the bundle its destination
    /// made: exactly the CA, then the source's certificate, then its key.
    pub fn from_one_time(bundle: &str) -> Result<Tls> {
        // Bad input, not a PKI problem; and never quoted: it holds a private key.
        let bad = |why: String| {
            let size = format!("{} bytes", bundle.len());
            let fix = "give the file `vfctl migrate receive --credentials-out` wrote";
            Error::Id(IdError::new(ONE_TIME, &size, format!("{why}; {fix}")))
        };
        if bundle.len() > MAX_BUNDLE {
            return Err(bad(format!("over {MAX_BUNDLE} bytes")));
        }
        let certs = CertificateDer::pem_slice_iter(bundle.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let [ca, cert] = <[_; 2]>::try_from(certs).map_err(|c| {
            bad(format!(
                "{} certificates, expected the CA and the source's",
                c.len()
            ))
        })?;
        let key =
            PrivateKeyDer::from_pem_slice(bundle.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let id = || (vec![cert.clone()], key.clone_key());
        let mut tls = Tls::new(vec![ca], id(), id()).map_err(|e| bad(e.to_string()))?;
        tls.name = ServerName::try_from(ONE_TIME_NAME).ok();
        Ok(tls)
    }

    /// The name the destination must prove: the one in one-time credentials, or
    /// the host of `HOST:PORT`.
    pub(super) fn server_name(&self, endpoint: &str) -> Option<ServerName<'static>> {
        self.name.clone().or_else(|| server_name(endpoint))
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
fn server_name(endpoint: &str) -> Option<ServerName<'static>> {
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
