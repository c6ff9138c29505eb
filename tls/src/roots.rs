//! Whom the gateway and the rigs trust over TLS: the public web roots, plus the certificate
//! authorities of a PEM file an operator names (a private CA).

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why the CAs of a PEM file could not be added.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// The file could not be read, or a PEM section in it is broken.
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// The file has no `CERTIFICATE` section.
    #[error("the CA file {path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the file is not one a trust anchor can be made of.
    #[error("the CA file {path} holds a certificate rustls cannot use: {source}")]
    Unusable {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        source: rustls::Error,
    },
}

/// The public web roots, and every certificate of `extra_cas` when given. Other PEM sections
/// (keys) are skipped; a file with no certificate at all is an error, as it is surely not what
/// the operator meant.
fn trust_roots(extra_cas: Option<&Path>) -> Result<RootCertStore, CaFileError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let Some(path) = extra_cas else {
        return Ok(roots);
    };
    let read = |source| CaFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(read)? {
        roots
            .add(cert.map_err(read)?)
            .map_err(|source| CaFileError::Unusable {
                path: path.to_owned(),
                source,
            })?;
        added += 1;
    }
    if added == 0 {
        return Err(CaFileError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// Client TLS settings, ring as the provider, trusting [`trust_roots`]`(extra_cas)`.
pub fn client_config(extra_cas: Option<&Path>) -> Result<rustls::ClientConfig, CaFileError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}"))
        .with_root_certificates(trust_roots(extra_cas)?)
        .with_no_client_auth())
}
