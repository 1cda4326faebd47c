//! Mutual TLS between the partner banks and their adapters, and between our own services (rustls on
//! ring, through tonic). Every peer proves who it is with a certificate signed by the deployment's CA;
//! the identity is the certificate's SAN URI, `spiffe://socialcard/bank/<code>` for a bank's core system
//! and `spiffe://socialcard/service/<name>` for one of our services.
//!
//! A certificate that does not chain to the CA (self-signed, another CA) or is out of its validity
//! period fails the TLS handshake. A connection without a client certificate is let through the
//! handshake so that health checks work, and [`RequirePeer`] answers its calls UNAUTHENTICATED; a valid
//! certificate naming someone not allowed (another bank's) gets PERMISSION_DENIED, logged on the
//! `socialcard::audit` target.

#[cfg(feature = "dev-ca")]
pub mod dev_ca;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::ERROR_DOMAIN;

/// The SPIFFE trust domain of every socialcard identity.
pub const TRUST_DOMAIN: &str = "socialcard";

/// DNS suffix of the names our servers' certificates carry (clients set it as the TLS server name).
pub const DNS_SUFFIX: &str = "socialcard.internal";

/// Who is at the other end of a mutually authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A partner bank's core system, by bank code.
    Bank(String),
    /// One of our services (`registry`, `bank-adapter-icbc`, `loss-coordinator`, `cli`...).
    Service(String),
}

impl PeerIdentity {
    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Self::Bank(code) => format!("spiffe://{TRUST_DOMAIN}/bank/{code}"),
            Self::Service(name) => format!("spiffe://{TRUST_DOMAIN}/service/{name}"),
        }
    }

    /// Reads an identity URI; anything else (another trust domain, a path we do not issue, odd
    /// characters) is not an identity.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let path = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?.strip_prefix('/')?;
        let (kind, name) = path.split_once('/')?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid {
            return None;
        }
        match kind {
            "bank" => Some(Self::Bank(name.to_string())),
            "service" => Some(Self::Service(name.to_string())),
            _ => None,
        }
    }

    /// The identity a certificate (DER) names in its subject alternative names. Only call this on a
    /// certificate the TLS layer has verified: it checks no signature.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparsable)?;
        let san = cert.subject_alternative_name().map_err(|_| IdentityError::Unparsable)?;
        let mut found = san
            .iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .filter(|uri| uri.starts_with("spiffe://"));
        let uri = found.next().ok_or(IdentityError::NoIdentity)?;
        // One identity per certificate: a certificate claiming two is not trusted with either.
        if found.next().is_some() {
            return Err(IdentityError::Ambiguous);
        }
        Self::from_uri(uri).ok_or(IdentityError::NoIdentity)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Why a verified certificate names no usable identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate names no socialcard identity")]
    NoIdentity,
    #[error("the certificate names more than one socialcard identity")]
    Ambiguous,
}

/// What loading TLS material can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// The DNS name in the server certificate of `service` (e.g. `registry.socialcard.internal`).
pub fn server_dns_name(service: &str) -> String {
    format!("{service}.{DNS_SUFFIX}")
}

/// The service name of a bank's adapter, as its server and client certificates name it.
pub fn adapter_service_name(bank_code: &str) -> String {
    format!("bank-adapter-{bank_code}")
}

/// A certificate and its private key, PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPaths {
    fn under(dir: PathBuf, name: &str) -> Self {
        Self { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }

    /// Reads both files as a TLS identity.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        Ok(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

/// A TLS directory as `socialcard certs` writes it:
///
/// ```text
/// ca.pem  ca.key                       the development CA
/// banks/<code>.pem|.key                each bank core's client certificate
/// servers/<service>.pem|.key           server certificates (registry, bank-adapter-<code>)
/// services/<service>.pem|.key          our services' client certificates
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsDir {
    root: PathBuf,
}

impl TlsDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    pub fn bank_client(&self, bank_code: &str) -> CertPaths {
        CertPaths::under(self.root.join("banks"), bank_code)
    }

    pub fn server(&self, service: &str) -> CertPaths {
        CertPaths::under(self.root.join("servers"), service)
    }

    pub fn service_client(&self, service: &str) -> CertPaths {
        CertPaths::under(self.root.join("services"), service)
    }

    /// The CA every peer must chain to.
    pub fn ca_certificate(&self) -> Result<Certificate, TlsError> {
        Ok(Certificate::from_pem(read(&self.ca())?))
    }

    /// Server side of `service`: its own certificate, and client certificates checked against the CA.
    pub fn server_config(&self, service: &str) -> Result<ServerTlsConfig, TlsError> {
        Ok(server_config(self.ca_certificate()?, self.server(service).identity()?))
    }

    /// Client side: presents `identity` and expects the server certificate of `service`.
    pub fn client_config(&self, identity: &CertPaths, service: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(client_config(self.ca_certificate()?, identity.identity()?, service))
    }
}

/// A server presenting `identity` and verifying client certificates against `ca`. Clients without a
/// certificate complete the handshake (health probes) and are refused per call by [`RequirePeer`].
pub fn server_config(ca: Certificate, identity: Identity) -> ServerTlsConfig {
    ServerTlsConfig::new().identity(identity).client_ca_root(ca).client_auth_optional(true)
}

/// A client presenting `identity`, trusting only `ca`, expecting the server certificate of `service`.
pub fn client_config(ca: Certificate, identity: Identity, service: &str) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(ca).identity(identity).domain_name(server_dns_name(service))
}

/// The identity of the caller, from the certificate it presented in the TLS handshake (already
/// verified against the CA by rustls). UNAUTHENTICATED without one.
pub fn peer_identity<T>(request: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = request.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
        unauthenticated("CLIENT_CERTIFICATE_REQUIRED", "a client certificate signed by the socialcard CA is required")
    })?;
    PeerIdentity::from_certificate(certs[0].as_ref())
        .map_err(|e| unauthenticated("CLIENT_IDENTITY_UNKNOWN", &format!("client certificate refused: {e}")))
}

fn unauthenticated(reason: &str, message: &str) -> Status {
    let details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new());
    Status::with_error_details(Code::Unauthenticated, message, details)
}

/// Who a service accepts calls from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// The one bank whose core system may call (a bank adapter's own bank).
    pub bank: Option<String>,
    /// Our services that may call.
    pub services: Vec<String>,
    /// Any of our services may call (the registry).
    pub any_service: bool,
}

impl Allow {
    /// Only `bank`'s core system, plus the named services.
    pub fn bank(code: impl Into<String>, services: &[&str]) -> Self {
        Self {
            bank: Some(code.into()),
            services: services.iter().map(|s| (*s).to_string()).collect(),
            any_service: false,
        }
    }

    /// Any of our services, no bank.
    pub fn services() -> Self {
        Self { bank: None, services: Vec::new(), any_service: true }
    }

    pub fn permits(&self, peer: &PeerIdentity) -> bool {
        match peer {
            PeerIdentity::Bank(code) => self.bank.as_deref() == Some(code.as_str()),
            PeerIdentity::Service(name) => self.any_service || self.services.iter().any(|s| s == name),
        }
    }
}

/// An interceptor admitting only the peers [`Allow`] names; the caller's identity is put in the
/// request's extensions for the handler. Wrap the business service with it, not health or reflection.
#[derive(Clone, Debug)]
pub struct RequirePeer {
    allow: Arc<Allow>,
    /// The service guarded, for the audit line.
    guarding: Arc<str>,
}

impl RequirePeer {
    pub fn new(guarding: &str, allow: Allow) -> Self {
        Self { allow: Arc::new(allow), guarding: Arc::from(guarding) }
    }

    /// Checks one request's caller.
    pub fn check<T>(&self, request: &Request<T>) -> Result<PeerIdentity, Status> {
        let peer = peer_identity(request).inspect_err(|s| {
            tracing::warn!(target: "socialcard::audit", service = %self.guarding, code = ?s.code(), "unauthenticated call refused");
        })?;
        if !self.allow.permits(&peer) {
            tracing::warn!(
                target: "socialcard::audit",
                service = %self.guarding,
                peer = %peer,
                "call refused: the certificate names a peer this service does not serve"
            );
            let details = ErrorDetails::with_error_info("WRONG_PEER_IDENTITY", ERROR_DOMAIN, HashMap::new());
            return Err(Status::with_error_details(
                Code::PermissionDenied,
                format!("{peer} may not call this service"),
                details,
            ));
        }
        Ok(peer)
    }
}

impl Interceptor for RequirePeer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let peer = self.check(&request)?;
        request.extensions_mut().insert(peer);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_round_trip_and_strangers_are_refused() {
        for id in [PeerIdentity::Bank("icbc".into()), PeerIdentity::Service("bank-adapter-icbc".into())] {
            assert_eq!(PeerIdentity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "spiffe://other/bank/icbc",
            "spiffe://socialcard/bank/",
            "spiffe://socialcard/bank/ICBC",
            "spiffe://socialcard/bank/icbc/x",
            "spiffe://socialcard/teller/icbc",
            "https://socialcard/bank/icbc",
            "spiffe://socialcardx/bank/icbc",
        ] {
            assert_eq!(PeerIdentity::from_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn allow_names_one_bank_and_chosen_services() {
        let allow = Allow::bank("icbc", &["loss-coordinator"]);
        assert!(allow.permits(&PeerIdentity::Bank("icbc".into())));
        assert!(!allow.permits(&PeerIdentity::Bank("ccb".into())));
        assert!(allow.permits(&PeerIdentity::Service("loss-coordinator".into())));
        assert!(!allow.permits(&PeerIdentity::Service("postal".into())));
        let services = Allow::services();
        assert!(services.permits(&PeerIdentity::Service("bank-adapter-icbc".into())));
        assert!(!services.permits(&PeerIdentity::Bank("icbc".into())));
    }

    #[test]
    fn a_request_without_a_certificate_is_unauthenticated() {
        let guard = RequirePeer::new("test", Allow::services());
        let status = guard.check(&Request::new(())).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(crate::error::reason_of(&status).as_deref(), Some("CLIENT_CERTIFICATE_REQUIRED"));
    }
}
