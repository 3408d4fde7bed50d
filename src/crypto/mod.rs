//! Callback and webhook cryptography shared by all platforms. Pure functions; every
//! comparison of secret-derived values is constant-time.

pub mod feishu;
pub mod robot;
pub mod wx;

use crate::error::{Error, Result};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// Constant-time equality for signatures and tokens (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// DingTalk's and WeCom's callback signature: SHA-1 over the lexicographically sorted
/// values, concatenated without separators, as lowercase hex.
pub fn sorted_sha1_hex(values: &[&str]) -> String {
    let mut sorted: Vec<&str> = values.to_vec();
    // Four values: an insertion sort. `sort_unstable` instantiates ~9 KB of wasm for them, and
    // the component's size budget is what keeps its hot paths from being built for speed.
    for i in 1..sorted.len() {
        let mut j = i;
        while j > 0 && sorted[j - 1] > sorted[j] {
            sorted.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut h = Sha1::new();
    for v in sorted {
        h.update(v.as_bytes());
    }
    crate::env::hex(&h.finalize())
}

/// Platform keys are 43 random characters plus "=", so their last symbol carries non-zero
/// spare bits; the platforms' own SDKs ignore those, and so must we.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

pub fn b64_decode(s: &str) -> Result<Vec<u8>> {
    LENIENT
        .decode(s.trim())
        .map_err(|_| Error::input("payload is not valid base64"))
}

pub fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// One message for every way decryption can fail, so responses reveal nothing about padding.
/// The one answer to every failure between a verified signature and a readable message: bad
/// base64, length, padding, frame, receive id, or a plaintext that does not parse. WX
/// signatures use the callback token, not the AES key, so someone holding only the token could
/// otherwise tell "bad padding" from "padding fine, content wrong" and decrypt captured
/// callbacks through that oracle.
pub fn undecryptable() -> Error {
    Error::input("payload cannot be decrypted and read with the configured key and app id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_sha1_sorts_before_hashing() {
        let a = sorted_sha1_hex(&["token", "1700000000", "nonce", "ENC"]);
        let b = sorted_sha1_hex(&["ENC", "nonce", "token", "1700000000"]);
        assert_eq!(a, b);
        // sha1("1700000000ENCnoncetoken"), computed independently with coreutils sha1sum.
        assert_eq!(a, "8eff1fcabfa545a4f3228f21284394ba7964166a");
    }

    #[test]
    fn ct_eq_handles_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
    }

    #[test]
    fn bad_base64_is_invalid_input() {
        assert!(matches!(b64_decode("%%%"), Err(Error::InvalidInput(_))));
    }
}
