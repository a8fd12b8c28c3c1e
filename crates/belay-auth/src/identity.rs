//! Who is on the other end of a mutual-TLS connection: the identities its certificate
//! carries, and the check that a peer's claimed name (an agent's registration) is one of
//! them.
//!
//! **The rule.** A certificate's identities are its DNS subject alternative names; a
//! certificate without any DNS SAN is identified by its subject common name (CN) instead.
//! IP-address and other SANs are never identities (a name is not an address). A claimed
//! name must equal one identity exactly (ASCII case-insensitive, as DNS names compare).

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// How a server treats the names its peers claim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Without mTLS nothing proves who a peer is: a claimed name is taken as asserted.
    #[default]
    Asserted,
    /// With mTLS a claimed name must be an identity of the certificate the peer presented
    /// on that connection ([`check_claimed_name`]).
    Certificate,
}

/// Why a claimed name is refused. The message names the certificate's identities and the
/// claimed name, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The connection carries no client certificate.
    #[error(
        "{what} {claimed:?} presented no client certificate: with mTLS, a name is accepted only \
         from a certificate that carries it (DNS SAN, or CN when it has no DNS SAN); configure \
         [tls] cert/key issued for {claimed:?}"
    )]
    NoCertificate {
        /// What claims the name ("agent").
        what: &'static str,
        /// The claimed name.
        claimed: String,
    },
    /// The certificate could not be read.
    #[error("{what} {claimed:?} presented a certificate that cannot be read: {reason}")]
    Unreadable {
        /// What claims the name.
        what: &'static str,
        /// The claimed name.
        claimed: String,
        /// The parser's words.
        reason: String,
    },
    /// The certificate names someone else.
    #[error(
        "{what} name {claimed:?} is not an identity of the certificate it presented \
         (identities: {}); an agent may only claim a name its certificate carries (DNS SAN, or \
         CN when it has no DNS SAN): set `name` in agent.toml to one of them, or issue a \
         certificate for {claimed:?}",
        if identities.is_empty() { "none".to_string() } else { identities.join(", ") }
    )]
    Mismatch {
        /// What claims the name.
        what: &'static str,
        /// The claimed name.
        claimed: String,
        /// The certificate's identities.
        identities: Vec<String>,
    },
}

/// The identities of a DER certificate (see the module's rule).
pub fn certificate_identities(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let sans = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let dns: Vec<String> = sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !dns.is_empty() {
        return Ok(dns);
    }
    Ok(parsed
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(str::to_string)
        .collect())
}

/// Checks that `claimed` is an identity of the leaf (first) certificate of `peer_certs`,
/// the chain the peer presented on this connection (`None`: it presented none).
pub fn check_claimed_name(
    what: &'static str,
    claimed: &str,
    peer_certs: Option<&[CertificateDer<'_>]>,
) -> Result<(), IdentityError> {
    let Some(leaf) = peer_certs.and_then(|c| c.first()) else {
        return Err(IdentityError::NoCertificate {
            what,
            claimed: claimed.to_string(),
        });
    };
    let identities = certificate_identities(leaf).map_err(|reason| IdentityError::Unreadable {
        what,
        claimed: claimed.to_string(),
        reason,
    })?;
    if identities.iter().any(|i| i.eq_ignore_ascii_case(claimed)) {
        Ok(())
    } else {
        Err(IdentityError::Mismatch {
            what,
            claimed: claimed.to_string(),
            identities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;

    fn der(path: &std::path::Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("a PEM certificate")
    }

    #[test]
    fn dns_sans_are_the_identities_and_ip_sans_are_not() {
        let pki = belay_testkit::pki::TestPki::new().expect("test PKI");
        // The server certificate: DNS SAN `localhost`, IP SAN 127.0.0.1, CN belay-test-server.
        let ids = certificate_identities(&der(&pki.server_cert)).expect("readable");
        assert_eq!(ids, vec!["localhost".to_string()]);
        let (_, agent_cert, _) = pki.agent_files("db-7").expect("agent certificate");
        let cert = der(&agent_cert);
        assert_eq!(
            certificate_identities(&cert).expect("readable"),
            vec!["db-7"]
        );
        check_claimed_name("agent", "db-7", Some(std::slice::from_ref(&cert))).expect("its name");
        check_claimed_name("agent", "DB-7", Some(std::slice::from_ref(&cert)))
            .expect("DNS names compare case-insensitively");
        let err = check_claimed_name("agent", "db-8", Some(std::slice::from_ref(&cert)))
            .expect_err("another name is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("\"db-8\"") && msg.contains("identities: db-7"),
            "{msg}"
        );
        // 127.0.0.1 is an IP SAN of the agent's certificate: never an identity.
        assert!(check_claimed_name("agent", "127.0.0.1", Some(&[cert])).is_err());
        let err = check_claimed_name("agent", "db-7", None).expect_err("no certificate");
        assert!(matches!(err, IdentityError::NoCertificate { .. }), "{err}");
    }

    #[test]
    fn the_common_name_counts_only_without_dns_sans() {
        let pki = belay_testkit::pki::TestPki::new().expect("test PKI");
        // The client certificate has no SAN at all: its CN is its identity.
        let cert = der(&pki.client_cert);
        assert_eq!(
            certificate_identities(&cert).expect("readable"),
            vec!["belay-test-client"]
        );
        // The server certificate's CN is not an identity: it has a DNS SAN.
        let server = der(&pki.server_cert);
        assert!(check_claimed_name("agent", "belay-test-server", Some(&[server])).is_err());
    }
}
