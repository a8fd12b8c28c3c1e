//! Throwaway certificate authorities for TLS tests: a CA, a server certificate for
//! `localhost`/`127.0.0.1`, a client certificate and, on demand, a certificate per agent
//! name ([`TestPki::agent_files`]), written as PEM files into a temporary directory that is
//! removed on `Drop`.
//!
//! The paths come back as plain `(ca, cert, key)` tuples so that this crate does not depend on
//! `belay-auth` (which uses this module in its own tests); callers build their `TlsFiles` from
//! them. Keys are ECDSA P-256, generated fresh for every [`TestPki`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::Error;

/// The DNS name the server certificate is issued for (it also carries `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// A CA with one server and one client certificate, plus a client certificate from an
/// unrelated CA, all as PEM files under [`TestPki::dir`].
#[derive(Debug)]
pub struct TestPki {
    /// The directory holding every file; removed when the `TestPki` is dropped.
    pub dir: TempDir,
    /// The CA certificate (`ca.pem`) that signed the server and client certificates.
    pub ca: PathBuf,
    /// The server certificate (`server.pem`), SANs `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// The server's private key (`server-key.pem`, PKCS#8).
    pub server_key: PathBuf,
    /// The client certificate (`client.pem`), CN `belay-test-client`.
    pub client_cert: PathBuf,
    /// The client's private key (`client-key.pem`, PKCS#8).
    pub client_key: PathBuf,
    /// A second, unrelated CA (`other-ca.pem`).
    pub other_ca: PathBuf,
    /// A client certificate signed by [`TestPki::other_ca`] (`other-client.pem`).
    pub other_client_cert: PathBuf,
    /// Its private key (`other-client-key.pem`).
    pub other_client_key: PathBuf,
    /// The CA's signing half, for certificates issued later ([`TestPki::agent_files`]).
    issuer: CaIssuer,
}

/// The CA's key and parameters; `Debug` shows nothing of the key.
struct CaIssuer(Issuer<'static, KeyPair>);

impl std::fmt::Debug for CaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaIssuer(..)")
    }
}

impl TestPki {
    /// Generates both CAs and the three leaf certificates and writes them as PEM files into
    /// a fresh temporary directory.
    pub fn new() -> Result<TestPki, Error> {
        let dir = tempfile::Builder::new()
            .prefix("belay-pki-")
            .tempdir()
            .map_err(Error::io(
                "creating a temporary directory for test certificates",
            ))?;
        let root = dir.path().to_path_buf();

        let (ca_pem, ca) = new_ca("belay test CA")?;
        let ca_path = write(&root, "ca.pem", &ca_pem)?;

        let server = new_leaf(
            &ca,
            "belay-test-server",
            &[SERVER_NAME, "127.0.0.1"],
            // Controller and agents both serve and call each other with one identity.
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (server_cert, server_key) = server.write(&root, "server")?;

        let client = new_leaf(
            &ca,
            "belay-test-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let (client_cert, client_key) = client.write(&root, "client")?;

        let (other_ca_pem, other_ca) = new_ca("belay unrelated test CA")?;
        let other_ca_path = write(&root, "other-ca.pem", &other_ca_pem)?;
        let other = new_leaf(
            &other_ca,
            "belay-test-client",
            &[],
            &[ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let (other_client_cert, other_client_key) = other.write(&root, "other-client")?;

        Ok(TestPki {
            dir,
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            other_ca: other_ca_path,
            other_client_cert,
            other_client_key,
            issuer: CaIssuer(ca),
        })
    }

    /// `(ca, cert, key)` for an agent named `name`: a certificate from the same CA whose
    /// only DNS SAN is `name` (its identity; the controller binds an agent's registration
    /// to it, and verifies the agent's server certificate against it when it calls the
    /// agent), with the IP SAN `127.0.0.1` (for a client dialling the agent straight by
    /// its address), valid for both server and client use. Written as `agent-<name>.pem` and `agent-<name>-key.pem`.
    pub fn agent_files(&self, name: &str) -> Result<(PathBuf, PathBuf, PathBuf), Error> {
        let leaf = new_leaf(
            &self.issuer.0,
            name,
            &[name, "127.0.0.1"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (cert, key) = leaf.write(self.dir.path(), &format!("agent-{name}"))?;
        Ok((self.ca.clone(), cert, key))
    }

    /// `(ca, cert, key)` for a server: it trusts client certificates signed by `ca`.
    pub fn server_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.ca.clone(),
            self.server_cert.clone(),
            self.server_key.clone(),
        )
    }

    /// `(ca, cert, key)` for a client with a certificate from the same CA as the server.
    pub fn client_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.ca.clone(),
            self.client_cert.clone(),
            self.client_key.clone(),
        )
    }

    /// `(ca, cert, key)` for a client that trusts the right CA (so it accepts the server) but
    /// presents a certificate from an unrelated CA, which the server must refuse.
    pub fn other_ca_client(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.ca.clone(),
            self.other_client_cert.clone(),
            self.other_client_key.clone(),
        )
    }
}

/// A leaf certificate and its key, both PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Leaf {
    fn write(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), Error> {
        let cert = write(dir, &format!("{stem}.pem"), &self.cert_pem)?;
        let key = write(dir, &format!("{stem}-key.pem"), &self.key_pem)?;
        Ok((cert, key))
    }
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Io {
        what: format!("generating the test {what}"),
        source: std::io::Error::other(e),
    }
}

fn new_ca(name: &str) -> Result<(String, Issuer<'static, KeyPair>), Error> {
    let mut params = CertificateParams::new(Vec::new()).map_err(rcgen_err("CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().map_err(rcgen_err("CA key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_err("CA certificate"))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    common_name: &str,
    sans: &[&str],
    usages: &[ExtendedKeyUsagePurpose],
) -> Result<Leaf, Error> {
    let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let mut params = CertificateParams::new(sans).map_err(rcgen_err("leaf parameters"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages.to_vec();
    let key = KeyPair::generate().map_err(rcgen_err("leaf key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(rcgen_err("leaf certificate"))?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    std::fs::write(&path, contents).map_err(Error::io(format!("writing {}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pem_files_that_exist_and_differ() {
        let pki = TestPki::new().expect("test PKI is generated");
        let (ca, cert, key) = pki.server_files();
        let (client_ca, client_cert, client_key) = pki.client_files();
        assert_eq!(ca, client_ca, "server and client share the CA");
        for path in [&ca, &cert, &client_cert, &pki.other_ca] {
            let text = std::fs::read_to_string(path).expect("certificate file is readable");
            assert!(
                text.starts_with("-----BEGIN CERTIFICATE-----"),
                "{} is a PEM certificate",
                path.display()
            );
        }
        for path in [&key, &client_key, &pki.other_client_key] {
            let text = std::fs::read_to_string(path).expect("key file is readable");
            assert!(
                text.contains("PRIVATE KEY-----"),
                "{} is a PEM key",
                path.display()
            );
        }
        let (other_trust, other_cert, _) = pki.other_ca_client();
        assert_eq!(
            other_trust, ca,
            "the wrong-CA client still trusts the server's CA"
        );
        assert_ne!(
            std::fs::read(&other_cert).expect("readable"),
            std::fs::read(&client_cert).expect("readable")
        );
        let dir = pki.dir.path().to_path_buf();
        drop(pki);
        assert!(!dir.exists(), "the directory is removed on drop");
    }
}
