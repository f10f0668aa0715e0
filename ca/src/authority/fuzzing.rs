//! CSR parsing, reachable for fuzzing (`crate::fuzzing`).

use crate::spiffe::SpiffeId;

/// [`super::parse_csr`]: the certified key's bytes and algorithm, or why the CSR is refused.
pub fn parse_csr(csr_pem: &str, identity: &SpiffeId) -> Result<(Vec<u8>, String), String> {
    super::parse_csr(csr_pem, identity)
        .map(|key| (key.raw, format!("{:?}", key.alg)))
        .map_err(|e| e.to_string())
}
