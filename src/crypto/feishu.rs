//! Feishu/Lark event encryption: AES-256-CBC, key = SHA-256(Encrypt Key), a random IV
//! prefixed to the ciphertext, standard PKCS#7; signature = hex SHA-256 over
//! timestamp ‖ nonce ‖ Encrypt Key ‖ raw body.

use super::{b64_decode, b64_encode, sha256, undecryptable};
use crate::error::Result;
use aes::Aes256;
use cbc::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::Pkcs7};

/// Decrypts in the buffer base64 decoded into (one allocation per callback, not two).
pub fn decrypt(encrypt_key: &str, encrypted_b64: &str) -> Result<Vec<u8>> {
    let mut raw = b64_decode(encrypted_b64)?;
    if raw.len() < 32 || raw.len() % 16 != 0 {
        return Err(undecryptable());
    }
    let (iv, ct) = raw.split_at_mut(16);
    let key = sha256(&[encrypt_key.as_bytes()]);
    let len = cbc::Decryptor::<Aes256>::new(&key.into(), (&*iv).into())
        .decrypt_padded_mut::<Pkcs7>(ct)
        .map_err(|_| undecryptable())?
        .len();
    raw.truncate(16 + len);
    raw.drain(..16);
    Ok(raw)
}

pub fn encrypt(encrypt_key: &str, iv: [u8; 16], plaintext: &[u8]) -> String {
    let key = sha256(&[encrypt_key.as_bytes()]);
    let ct = cbc::Encryptor::<Aes256>::new(&key.into(), &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext);
    let mut out = Vec::with_capacity(16 + ct.len());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    b64_encode(&out)
}

/// The `X-Lark-Signature` value for a request body exactly as received.
pub fn signature(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
    crate::env::hex(&sha256(&[
        timestamp.as_bytes(),
        nonce.as_bytes(),
        encrypt_key.as_bytes(),
        body,
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn decrypts_the_public_docs_vector() {
        let pt = decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=").unwrap();
        assert_eq!(pt, b"hello world");
    }

    #[test]
    fn roundtrip_with_random_iv() {
        let enc = encrypt("k", [7; 16], br#"{"a":1}"#);
        assert_eq!(decrypt("k", &enc).unwrap(), br#"{"a":1}"#);
        assert!(decrypt("other", &enc).is_err());
    }

    #[test]
    fn rejects_truncated_and_misaligned_ciphertext() {
        let enc = encrypt("k", [1; 16], b"hello world, long enough for two blocks");
        let raw = b64_decode(&enc).unwrap();
        for cut in [0, 16, 17, raw.len() - 1] {
            let r = decrypt("k", &b64_encode(&raw[..cut]));
            assert!(matches!(r, Err(Error::InvalidInput(_))), "cut {cut}: {r:?}");
        }
    }

    #[test]
    fn signature_matches_independent_sha256() {
        // printf '%s' '1700000000nonce1keybody' | sha256sum
        assert_eq!(
            signature("1700000000", "nonce1", "key", b"body"),
            "b09dfc48e99e32fd3d92c94007987868864da55b09cd747a55ddc4292c364431"
        );
    }
}
