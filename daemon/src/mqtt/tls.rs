//! TLS to the broker (`mqtts://`): the rustls client configuration, built once at start from
//! `[mqtt] ca_file` (default: the system's CA bundle) and the optional client certificate and
//! key, so that a missing or unreadable file stops the start with one line naming it instead
//! of failing every connection attempt later.
//!
//! Handshake failures (unknown CA, expired certificate, wrong host name) happen per
//! connection; [`explain`] turns rustls' wording into what an installer should check.

use crate::config::MqttSettings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Debian's bundle of the system's trusted CAs, used when `ca_file` is not set.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why the TLS set-up failed; each names the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or holds no usable PEM item.
    #[error("[mqtt] {setting} {}: {problem}", path.display())]
    File {
        /// The configuration key.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the certificate).
    #[error("[mqtt] TLS set-up: {0}")]
    Rustls(String),
}

fn file_error(setting: &'static str, path: &Path, problem: impl ToString) -> TlsSetupError {
    TlsSetupError::File {
        setting,
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|e| file_error(setting, path, format!("cannot read it: {e}")))
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read_pem(setting, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(setting, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            setting,
            path,
            "holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

/// The client configuration for `settings` (which must be `mqtts://`).
pub fn client_config(settings: &MqttSettings) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let (ca_setting, ca_path) = match &settings.ca_file {
        Some(p) => ("ca_file", p.clone()),
        None => ("ca_file (default)", PathBuf::from(SYSTEM_CA_BUNDLE)),
    };
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certificates(ca_setting, &ca_path)?);
    if added == 0 {
        return Err(file_error(
            ca_setting,
            &ca_path,
            format!("none of its {ignored} certificate(s) is a usable CA certificate"),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&settings.client_cert, &settings.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates("client_cert", cert_path)?;
            let key_pem = read_pem("client_key", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                file_error(
                    "client_key",
                    key_path,
                    format!("holds no usable private key (PEM, PKCS#8, PKCS#1 or SEC1): {e}"),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsSetupError::Rustls(format!(
                    "client_cert {} and client_key {} do not go together: {e}",
                    cert_path.display(),
                    key_path.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// What a failed TLS connection means, for the log line (the raw error follows it).
pub fn explain(error: &str, settings: &MqttSettings) -> Option<String> {
    let ca = settings
        .ca_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| SYSTEM_CA_BUNDLE.to_string());
    let hint = if error.contains("UnknownIssuer") || error.contains("BadSignature") {
        format!("the broker's certificate is not signed by a CA in {ca}")
    } else if error.contains("Expired") {
        "the broker's certificate has expired (or this machine's clock is wrong)".to_string()
    } else if error.contains("NotValidYet") {
        "the broker's certificate is not valid yet (is this machine's clock right?)".to_string()
    } else if error.contains("NotValidForName") {
        format!(
            "the broker's certificate is not valid for {:?}, the host in [mqtt] url",
            settings.host
        )
    } else if error.contains("CertificateRequired") || error.contains("certificate required") {
        "the broker wants a client certificate: set [mqtt] client_cert and client_key".to_string()
    } else if error.contains("UnknownCA") || error.contains("unknown ca") {
        "the broker does not trust our client certificate".to_string()
    } else if error.contains("InvalidContentType") || error.contains("CorruptMessage") {
        "the broker does not speak TLS on this port (mqtt:// instead of mqtts://?)".to_string()
    } else {
        return None;
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> MqttSettings {
        MqttSettings {
            url: "mqtts://127.0.0.1:8883".into(),
            host: "127.0.0.1".into(),
            port: 8883,
            tls: true,
            client_id: "t".into(),
            username: None,
            password_file: None,
            ca_file: Some(dir.join("ca.pem")),
            client_cert: None,
            client_key: None,
            topic_prefix: "id06/v1".into(),
        }
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = client_config(&settings(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ca_file") && e.contains("ca.pem") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let e = client_config(&settings(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.pem") && e.contains("no certificate"), "{e}");
    }

    #[test]
    fn handshake_errors_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let e = "TLS: I/O: invalid peer certificate: UnknownIssuer";
        assert!(explain(e, &s).unwrap().contains("ca.pem"));
        let e = "TLS: I/O: invalid peer certificate: Expired";
        assert!(explain(e, &s).unwrap().contains("expired"));
        assert!(explain("I/O: connection refused", &s).is_none());
    }
}
