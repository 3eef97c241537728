//! API keys: when a key file is configured, protected RPCs need `authorization: Bearer <key>`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// The accepted keys, held as SHA-256 digests so a comparison does not leak a key's prefix
/// through timing.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Option<Arc<HashSet<[u8; 32]>>>,
}

impl ApiKeys {
    /// No keys: every request passes.
    pub fn open() -> Self {
        Self::default()
    }

    /// One key per line; blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API key file {}", path.display()))?;
        let digests: HashSet<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|key| Sha256::digest(key.as_bytes()).into())
            .collect();
        ensure!(!digests.is_empty(), "the API key file {} holds no key", path.display());
        Ok(Self { digests: Some(Arc::new(digests)) })
    }

    pub fn is_enabled(&self) -> bool {
        self.digests.is_some()
    }

    /// The identity of the caller for per-client limits: a digest prefix of its key, or "".
    pub fn client_of<T>(&self, request: &Request<T>) -> String {
        bearer(request).map(|key| crate::files::sha256_hex(key.as_bytes())[..16].to_string()).unwrap_or_default()
    }

    /// A tonic interceptor body: UNAUTHENTICATED unless the request carries an accepted key.
    pub fn check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        self.check_authorization(header)?;
        Ok(request)
    }

    /// The check behind every front door (gRPC metadata, HTTP header): UNAUTHENTICATED unless
    /// `authorization` holds `Bearer <accepted key>`.
    pub fn check_authorization(&self, header: Option<&str>) -> Result<(), Status> {
        let Some(digests) = &self.digests else { return Ok(()) };
        let key = header
            .and_then(bearer_key)
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <key>`"))?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if digests.contains(&digest) {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not valid"))
        }
    }
}

fn bearer<T>(request: &Request<T>) -> Option<String> {
    bearer_key(request.metadata().get("authorization")?.to_str().ok()?)
}

/// The key of an `authorization: Bearer <key>` value; the scheme's case does not matter
/// (RFC 7235, section 2.1).
fn bearer_key(value: &str) -> Option<String> {
    let (scheme, key) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim().to_string()).filter(|key| !key.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = auth {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn keys_from_a_file_gate_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team keys\nalpha-key\n\n  beta-key  \n").unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        assert!(keys.check(request(Some("Bearer alpha-key"))).is_ok());
        assert!(keys.check(request(Some("Bearer beta-key"))).is_ok());
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            assert!(keys.check(request(Some(&format!("{scheme} alpha-key")))).is_ok(), "{scheme}");
        }
        for bad in [None, Some("Bearer wrong"), Some("alpha-key"), Some("Basic alpha-key"), Some("Bearer ")] {
            assert_eq!(keys.check(request(bad)).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(ApiKeys::open().check(request(None)).is_ok());
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(ApiKeys::from_file(&path).is_err());
        assert_ne!(
            keys.client_of(&request(Some("Bearer alpha-key"))),
            keys.client_of(&request(Some("Bearer beta-key")))
        );
    }
}
