//! weft's identity: SPIFFE IDs, the certificate authority, its client, and mesh mTLS configs.
//!
//! Everything that proves or checks who a workload is lives here, so pilot and the sidecar share one
//! implementation: [`spiffe`] parses IDs, [`authority`] and [`server`] are the CA, [`auth`] decides who
//! a caller is (weft tokens, TokenReview, JWKS), [`token`] its bootstrap credentials, [`dns`] who may have DNS names in a certificate, [`csr`] and [`client`] what a workload uses to get a certificate ([`files`]: its token and root
//! files, read again as they rotate), [`tls`]
//! the rustls configs and SPIFFE verifiers, [`grpc`] gRPC over those configs; [`monitoring`] the
//! plain-HTTP /metrics endpoint the CA and pilot serve.

pub mod auth;
pub mod authority;
pub mod cli;
pub mod client;
pub mod csr;
pub mod dns;
pub mod files;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod monitoring;
pub mod server;
pub mod spiffe;
pub mod tls;
pub mod token;

pub use spiffe::SpiffeId;
