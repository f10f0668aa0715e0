//! The files a workload's identity comes from, read again whenever they matter: Kubernetes rotates a
//! projected token (about hourly) and updates a mounted root bundle in place, so a value read once
//! at start-up goes stale while the pod lives on.
//!
//! - The bootstrap token is read at every certificate request ([`crate::client::CaClient::with_files`]).
//! - The root bundle ([`RootFile`]) is read at every certificate request and polled every
//!   [`ROOT_POLL_INTERVAL`]; a change swaps the roots of the shared [`TrustBundle`], which every
//!   rustls config built from it uses for its next handshake. Write the file atomically (a rename, as
//!   the kubelet does for ConfigMap volumes): a half-written file that still parses would be taken.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::tls::{SvidError, TrustBundle};

/// How often the root bundle file is checked for changes between certificate requests.
pub const ROOT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Why a mounted file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable root certificate.
    #[error("{}: {source}", path.display())]
    Roots {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: SvidError,
    },
}

/// The `--ca-root` file and the live bundle loaded from it.
#[derive(Debug, Clone)]
pub struct RootFile {
    path: Arc<Path>,
    bundle: TrustBundle,
}

impl RootFile {
    /// Loads `path`; at start-up an unreadable or empty bundle is an error.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let pem = std::fs::read_to_string(path).map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let bundle = TrustBundle::from_pem(&pem).map_err(|source| FileError::Roots {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: Arc::from(path),
            bundle,
        })
    }

    /// The live bundle (clones share it).
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Reads the file again and swaps the roots if they changed; returns whether they did. A file
    /// that cannot be read or holds no certificate leaves the current roots in force (a root bundle
    /// must never become empty because of a bad write), with a warning.
    pub async fn reload(&self) -> bool {
        let result = match tokio::fs::read_to_string(&*self.path).await {
            Ok(pem) => self
                .bundle
                .replace_pem(&pem)
                .map_err(|source| FileError::Roots {
                    path: self.path.to_path_buf(),
                    source,
                }),
            Err(source) => Err(FileError::Read {
                path: self.path.to_path_buf(),
                source,
            }),
        };
        match result {
            Ok(true) => {
                tracing::info!(path = %self.path.display(), roots = self.bundle.len(), "trust bundle reloaded");
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "trust bundle not reloaded; keeping the current roots");
                false
            }
        }
    }

    /// Polls the file every `every` for ever. Run it as a task; it ends when the task is dropped.
    pub async fn watch(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            self.reload().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }

    #[tokio::test]
    async fn reload_takes_changes_and_keeps_roots_over_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.pem");
        let (a, b) = (root_pem(), root_pem());
        std::fs::write(&path, &a).unwrap();
        let file = RootFile::load(&path).unwrap();
        let shared = file.bundle().clone();
        assert!(!file.reload().await, "unchanged file");

        std::fs::write(&path, format!("{a}{b}")).unwrap();
        assert!(file.reload().await);
        assert_eq!(shared.len(), 2, "clones see the new roots");

        std::fs::write(&path, "").unwrap();
        assert!(!file.reload().await);
        std::fs::remove_file(&path).unwrap();
        assert!(!file.reload().await);
        assert_eq!(shared.len(), 2, "bad or missing file: roots kept");

        std::fs::write(&path, &b).unwrap();
        assert!(file.reload().await);
        assert_eq!(shared.len(), 1);
        assert!(RootFile::load(&dir.path().join("missing")).is_err());
    }
}
