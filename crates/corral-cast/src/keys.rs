//! Ed25519 signing keys for cast manifests.
//!
//! File format (what `corral cast keygen` writes): `KEY` holds the 32-byte secret seed as 64
//! lowercase hexadecimal digits and a newline, mode 0600; `KEY.pub` holds the 32-byte public key
//! the same way. Readers also accept the raw 32 bytes, and ignore surrounding whitespace.

use fs_err::os::unix::fs::OpenOptionsExt;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::{CastError, io_at};

/// Makes a fresh signing key from the operating system's random source.
pub fn generate() -> Result<SigningKey, CastError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| CastError::Key {
        path: PathBuf::from("<random>"),
        reason: format!("no randomness: {e}"),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public-key file that goes with secret-key file `key`: `KEY.pub`.
pub fn public_path(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Writes `key` (0600, refusing to overwrite) and `key.pub`.
pub fn write_keypair(path: &Path, key: &SigningKey) -> Result<PathBuf, CastError> {
    let mut f = fs_err::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))?;
    writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))?;
    let pub_path = public_path(path);
    fs_err::write(
        &pub_path,
        format!("{}\n", hex::encode(key.verifying_key().to_bytes())),
    )
    .map_err(io_at(&pub_path))?;
    Ok(pub_path)
}

fn read_32(path: &Path) -> Result<[u8; 32], CastError> {
    let bytes = fs_err::read(path).map_err(io_at(path))?;
    if bytes.len() == 32 {
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        return Ok(out);
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| CastError::Key {
        path: path.to_owned(),
        reason: "neither 64 hex digits nor 32 raw bytes".into(),
    })?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|e| CastError::Key {
        path: path.to_owned(),
        reason: format!("expected 64 hex digits: {e}"),
    })?;
    Ok(out)
}

/// Reads a secret key written by [`write_keypair`] (hex or raw).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, CastError> {
    Ok(SigningKey::from_bytes(&read_32(path)?))
}

/// Reads a public key (`KEY.pub`, hex or raw).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, CastError> {
    VerifyingKey::from_bytes(&read_32(path)?).map_err(|e| CastError::Key {
        path: path.to_owned(),
        reason: format!("not an Ed25519 public key: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keypair_round_trips_and_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cast.key");
        let key = generate().unwrap();
        let pub_path = write_keypair(&path, &key).unwrap();
        assert_eq!(pub_path, dir.path().join("cast.key.pub"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_verifying_key(&pub_path).unwrap(), key.verifying_key());
        // Refuses to overwrite an existing key.
        assert!(write_keypair(&path, &key).is_err());
    }

    #[test]
    fn garbage_key_is_rejected_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pub");
        std::fs::write(&path, "not hex\n").unwrap();
        let err = read_verifying_key(&path).unwrap_err().to_string();
        assert!(err.contains("bad.pub"), "{err}");
    }
}
