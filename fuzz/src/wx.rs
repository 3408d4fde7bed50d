//! The crypto framing on its own. Input: `[mode, payload…]`, `mode % 7`:
//! - 0: `WxKey::new` on an arbitrary key string;
//! - 1: `WxKey::decrypt` of an arbitrary (base64) string;
//! - 2: round trip: `[random ×16, rid_len, rid…, msg…]` must decrypt to `msg`, and be refused
//!   for any other receive id;
//! - 3: bit flip: `[flip_hi, flip_lo, msg…]` encrypted, one ciphertext bit flipped, decrypted;
//! - 4: raw frame: `payload` is the AES plaintext itself (the frame checks see fuzzer bytes);
//! - 5: Feishu `decrypt` of an arbitrary string;
//! - 6: Feishu round trip `[iv ×16, msg…]`, and base64 round trip.

use crate::Reader;
use aes::Aes256;
use cbc::cipher::{BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use imbridge::crypto::wx::WxKey;
use imbridge::crypto::{b64_decode, b64_encode, feishu};
use imbridge::error::Error;

const RID: &str = "wwfzcorp";

fn key_bytes() -> [u8; 32] {
    b64_decode(&format!("{}=", crate::WX_AES_KEY))
        .expect("valid key")
        .try_into()
        .expect("32 bytes")
}

/// Encrypts `plaintext` (zero-padded to whole AES blocks) with the WX key and IV and no
/// framing at all, so the decrypting side's length and padding checks see arbitrary bytes.
pub fn raw_encrypt(plaintext: &[u8]) -> String {
    let key = key_bytes();
    let mut pt = plaintext.to_vec();
    pt.resize(pt.len().div_ceil(16) * 16, 0);
    let ct = cbc::Encryptor::<Aes256>::new(&key.into(), key[..16].into())
        .encrypt_padded_vec_mut::<NoPadding>(&pt);
    b64_encode(&ct)
}

fn key() -> WxKey {
    WxKey::new(crate::WX_AES_KEY).expect("valid key")
}

pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let mode = r.byte() % 7;
    match mode {
        0 => {
            let s = String::from_utf8_lossy(r.rest());
            if let Ok(k) = WxKey::new(&s) {
                let enc = k.encrypt([1; 16], b"x", RID);
                assert_eq!(k.decrypt(&enc, RID).expect("round trip"), b"x");
            }
        }
        1 => {
            let s = String::from_utf8_lossy(r.rest());
            if let Ok(m) = key().decrypt(&s, RID) {
                // The message comes out of the ciphertext; it cannot be longer.
                assert!(m.len() <= s.len());
            }
        }
        2 => {
            let random: [u8; 16] = pad16(r.take(16));
            let n = r.byte() as usize;
            let rid = String::from_utf8_lossy(r.take(n)).into_owned();
            let msg = r.rest();
            let k = key();
            let enc = k.encrypt(random, msg, &rid);
            assert_eq!(k.decrypt(&enc, &rid).expect("round trip"), msg);
            let other = format!("{rid}x");
            assert!(matches!(
                k.decrypt(&enc, &other),
                Err(Error::Unauthorized(_) | Error::InvalidInput(_))
            ));
        }
        3 => {
            let flip = u16::from_be_bytes([r.byte(), r.byte()]) as usize;
            let msg = r.rest();
            let k = key();
            let mut raw = b64_decode(&k.encrypt([7; 16], msg, RID)).expect("own base64");
            let bit = flip % (raw.len() * 8);
            raw[bit / 8] ^= 1 << (bit % 8);
            if let Ok(m) = k.decrypt(&b64_encode(&raw), RID) {
                assert!(m.len() <= raw.len());
            }
        }
        4 => {
            let _ = key().decrypt(&raw_encrypt(r.rest()), RID);
        }
        5 => {
            let s = String::from_utf8_lossy(r.rest());
            let _ = feishu::decrypt("fz-feishu-encrypt-key", &s);
        }
        _ => {
            let iv: [u8; 16] = pad16(r.take(16));
            let msg = r.rest();
            let enc = feishu::encrypt("k", iv, msg);
            assert_eq!(feishu::decrypt("k", &enc).expect("round trip"), msg);
            assert_eq!(b64_decode(&b64_encode(msg)).expect("base64"), msg);
        }
    }
}

fn pad16(b: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..b.len()].copy_from_slice(b);
    out
}
