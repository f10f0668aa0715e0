//! Token signing over arbitrary header and claims bytes, for fuzzing the checks that come after the
//! signature (`crate::fuzzing`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::TokenSigner;

/// A compact JWS of `header` and `claims` as given (not necessarily JSON), signed by `signer`.
pub fn sign_raw(signer: &TokenSigner, header: &[u8], claims: &[u8]) -> Option<String> {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(claims));
    let sig = signer.key.sign(&signer.rng, token.as_bytes()).ok()?;
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    Some(token)
}
