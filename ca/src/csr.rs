//! Workload key and CSR generation: what a sidecar (or pilot) sends to the CA.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

use crate::spiffe::SpiffeId;

/// A fresh private key and a CSR for it.
#[derive(Debug)]
pub struct KeyAndCsr {
    /// The private key, PKCS#8 PEM. Never leaves the workload.
    pub key_pem: String,
    /// The CSR, PEM.
    pub csr_pem: String,
}

/// Generates an ECDSA P-256 key and a CSR naming `identity` in its URI SAN (the CA checks it against
/// the caller's token; it never takes the identity from the CSR).
pub fn generate(identity: &SpiffeId) -> Result<KeyAndCsr, rcgen::Error> {
    generate_with_dns(identity, &[])
}

/// [`generate`] with DNS SANs as well (pilot's webhook Service names; the CA allows them only as
/// [`crate::dns`] says).
pub fn generate_with_dns(
    identity: &SpiffeId,
    dns_names: &[String],
) -> Result<KeyAndCsr, rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
    for name in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}
