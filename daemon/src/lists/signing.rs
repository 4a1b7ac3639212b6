//! Ed25519 signatures over the canonical forms of blocklist updates and snapshot manifests
//! (defined in `id06_protocol::blocklist`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Decodes 32 bytes written as base64 or as 64 hex digits.
fn decode_32(text: &str, what: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| format!("{what}: {e}"))?
    } else {
        B64.decode(t)
            .map_err(|e| format!("{what} is neither 64 hex digits nor base64: {e}"))?
    };
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{what} is {} bytes; an Ed25519 key is 32", b.len()))
}

/// Parses a public key (base64 or hex).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes = decode_32(text, "[blocklist] public_key")?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| "[blocklist] public_key is not a valid Ed25519 public key".to_string())
}

/// Checks a base64 signature over `message`.
pub fn verify(key: &VerifyingKey, message: &[u8], signature: Option<&str>) -> Result<(), String> {
    let sig = signature.ok_or("it carries no signature, and updates must be signed")?;
    let bytes = B64
        .decode(sig.trim())
        .map_err(|_| "its signature is not base64".to_string())?;
    let sig =
        Signature::from_slice(&bytes).map_err(|_| "its signature is not 64 bytes".to_string())?;
    key.verify(message, &sig)
        .map_err(|_| "its signature does not match the configured public key".to_string())
}

/// A signing key read from a file holding its 32-byte seed (base64 or hex).
pub fn load_secret_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the signing key {}: {e}", path.display()))?;
    let seed = decode_32(&text, &format!("the signing key {}", path.display()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A fresh signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey, String> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| format!("no randomness from the system: {e}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A base64 signature over `message`.
pub fn sign(key: &SigningKey, message: &[u8]) -> String {
    B64.encode(key.sign(message).to_bytes())
}

/// The base64 public key of a signing key.
pub fn public_key_text(key: &SigningKey) -> String {
    B64.encode(key.verifying_key().to_bytes())
}

/// The base64 seed of a signing key, for its file.
pub fn secret_key_text(key: &SigningKey) -> String {
    B64.encode(key.to_bytes())
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_message_and_key() {
        let k = generate_key().unwrap();
        let public = parse_public_key(&public_key_text(&k)).unwrap();
        let sig = sign(&k, b"hello");
        assert!(verify(&public, b"hello", Some(&sig)).is_ok());
        assert!(verify(&public, b"hellO", Some(&sig)).is_err());
        assert!(verify(&public, b"hello", None).is_err());
        assert!(verify(&public, b"hello", Some("!!")).is_err());
        let other = parse_public_key(&public_key_text(&generate_key().unwrap())).unwrap();
        assert!(verify(&other, b"hello", Some(&sig)).is_err());
    }

    #[test]
    fn keys_are_read_as_base64_or_hex_and_checked() {
        let k = generate_key().unwrap();
        let hex: String = k
            .verifying_key()
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(parse_public_key(&hex).unwrap(), k.verifying_key());
        assert!(parse_public_key("c2hvcnQ=").unwrap_err().contains("32"));
        assert!(parse_public_key("not a key!").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, secret_key_text(&k) + "\n").unwrap();
        assert_eq!(load_secret_key(&p).unwrap().to_bytes(), k.to_bytes());
    }
}
