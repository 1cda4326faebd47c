//! A development CA and the certificates a deployment needs (`socialcard certs`), and the odd
//! certificates the TLS tests present (self-signed, another CA's, expired). A production deployment
//! takes its certificates from its own PKI; nothing here runs inside a service.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use super::{CertPaths, PeerIdentity, TlsDir, adapter_service_name, server_dns_name};

/// What generating or writing certificates can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write { path: std::path::PathBuf, source: std::io::Error },
}

/// A certificate and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key never reaches a log.
        f.debug_struct("IssuedCert").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// As a tonic TLS identity.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Writes the certificate and its key (the key readable by its owner only).
    pub fn write(&self, paths: &CertPaths) -> Result<(), DevCaError> {
        write_file(&paths.cert, &self.cert_pem, false)?;
        write_file(&paths.key, &self.key_pem, true)
    }
}

/// What a leaf certificate is for and whom it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    pub common_name: String,
    /// The SAN URI identity (client certificates).
    pub identity: Option<PeerIdentity>,
    /// DNS names (server certificates).
    pub dns_names: Vec<String>,
    pub client_auth: bool,
    pub server_auth: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Development certificates are valid for two years from yesterday (a little clock skew is fine).
fn default_validity() -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::days(1), now + Duration::days(730))
}

impl LeafSpec {
    /// A bank core's client certificate (`spiffe://socialcard/bank/<code>`).
    pub fn bank_client(code: &str) -> Self {
        Self::client(PeerIdentity::Bank(code.to_string()), format!("bank core {code}"))
    }

    /// One of our services calling another (`spiffe://socialcard/service/<name>`).
    pub fn service_client(name: &str) -> Self {
        Self::client(PeerIdentity::Service(name.to_string()), format!("service {name}"))
    }

    fn client(identity: PeerIdentity, common_name: String) -> Self {
        let (not_before, not_after) = default_validity();
        Self {
            common_name,
            identity: Some(identity),
            dns_names: Vec::new(),
            client_auth: true,
            server_auth: false,
            not_before,
            not_after,
        }
    }

    /// The server certificate of `service`: its DNS name, plus `localhost` and 127.0.0.1 for a laptop.
    pub fn server(service: &str) -> Self {
        let (not_before, not_after) = default_validity();
        Self {
            common_name: server_dns_name(service),
            identity: None,
            dns_names: vec![server_dns_name(service), "localhost".into(), "127.0.0.1".into()],
            client_auth: false,
            server_auth: true,
            not_before,
            not_after,
        }
    }

    /// The same certificate, but its validity ended yesterday.
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(30);
        self.not_after = now - Duration::days(1);
        self
    }

    fn params(&self) -> Result<CertificateParams, rcgen::Error> {
        let mut params = CertificateParams::new(self.dns_names.clone())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "socialcard (development)");
        dn.push(DnType::CommonName, self.common_name.clone());
        params.distinguished_name = dn;
        if let Some(identity) = &self.identity {
            params.subject_alt_names.push(SanType::URI(identity.uri().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if self.client_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if self.server_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    /// A certificate signed by its own key: no CA vouches for it.
    pub fn self_signed(&self) -> Result<IssuedCert, DevCaError> {
        let key = KeyPair::generate()?;
        let cert = self.params()?.self_signed(&key)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A certificate authority for development and tests.
#[derive(Debug)]
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl DevCa {
    pub fn generate(common_name: &str) -> Result<Self, DevCaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "socialcard (development)");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn certificate(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(self.cert_pem())
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, DevCaError> {
        let key = KeyPair::generate()?;
        let cert = spec.params()?.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The service identities that call other services and get a client certificate.
pub const SERVICE_CLIENTS: [&str; 5] = ["cli", "loss-coordinator", "postal", "ops", "bank-sim"];

/// Writes a development PKI into `dir` (see [`TlsDir`]): the CA, each bank's client certificate, a
/// server certificate for the registry, the loss coordinator and each bank's adapter, and client certificates for the adapters
/// (calling the registry) and the other services in [`SERVICE_CLIENTS`]. Returns the files written.
pub fn write_dev_pki(dir: &TlsDir, bank_codes: &[&str]) -> Result<usize, DevCaError> {
    let ca = DevCa::generate("socialcard development CA")?;
    write_file(&dir.ca(), &ca.cert_pem(), false)?;
    write_file(&dir.ca_key(), &ca.key_pem(), true)?;
    let mut written = 2;
    // The services that others call: the registry and the loss coordinator (the adapters below).
    for service in ["registry", "loss-coordinator"] {
        ca.issue(&LeafSpec::server(service))?.write(&dir.server(service))?;
        written += 2;
    }
    for code in bank_codes {
        ca.issue(&LeafSpec::bank_client(code))?.write(&dir.bank_client(code))?;
        let adapter = adapter_service_name(code);
        ca.issue(&LeafSpec::server(&adapter))?.write(&dir.server(&adapter))?;
        ca.issue(&LeafSpec::service_client(&adapter))?.write(&dir.service_client(&adapter))?;
        written += 6;
    }
    for service in SERVICE_CLIENTS {
        ca.issue(&LeafSpec::service_client(service))?.write(&dir.service_client(service))?;
        written += 2;
    }
    Ok(written)
}

fn write_file(path: &Path, content: &str, private: bool) -> Result<(), DevCaError> {
    use std::io::Write;
    let fail = |source| DevCaError::Write { path: path.to_path_buf(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options.open(path).map_err(fail)?.write_all(content.as_bytes()).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bank_certificate_names_its_bank_and_a_server_certificate_none() {
        let ca = DevCa::generate("test CA").unwrap();
        let cert = ca.issue(&LeafSpec::bank_client("icbc")).unwrap();
        let der = tonic::transport::Certificate::from_pem(&cert.cert_pem);
        let (_, pem) = x509_parser::pem::parse_x509_pem(der.get_ref()).unwrap();
        assert_eq!(PeerIdentity::from_certificate(&pem.contents), Ok(PeerIdentity::Bank("icbc".into())));
        let server = ca.issue(&LeafSpec::server("registry")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(server.cert_pem.as_bytes()).unwrap();
        assert_eq!(PeerIdentity::from_certificate(&pem.contents), Err(super::super::IdentityError::NoIdentity));
        assert!(!format!("{cert:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn the_pki_directory_holds_every_certificate() {
        let dir = std::env::temp_dir().join(format!("socialcard-pki-{}", std::process::id()));
        let tls = TlsDir::new(&dir);
        let n = write_dev_pki(&tls, &["icbc", "ccb"]).unwrap();
        // The CA (cert, key), the registry and coordinator servers, 3 pairs per bank, the service clients.
        assert_eq!(n, 2 + 2 * 2 + 2 * 6 + 2 * SERVICE_CLIENTS.len());
        assert!(tls.bank_client("ccb").cert.exists());
        assert!(tls.server("bank-adapter-icbc").key.exists());
        assert!(tls.service_client("bank-adapter-ccb").cert.exists());
        assert!(tls.server_config("registry").is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
