//! The WXBizMsgCrypt frame used by both DingTalk and WeCom callbacks:
//! AES-256-CBC, key = base64(EncodingAESKey + "="), IV = key[..16],
//! plaintext = random(16) ‖ u32 BE length ‖ message ‖ receive id, PKCS#7 to 32 bytes.

use super::{b64_decode, b64_encode, ct_eq, undecryptable};
use crate::error::{Error, Result};
use aes::Aes256;
use cbc::cipher::{
    BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit, block_padding::NoPadding,
};

const PAD_BLOCK: usize = 32;

/// The expanded key and the frame's IV: a DingTalk callback decrypts the push and encrypts
/// its reply with one key schedule.
#[derive(Clone)]
pub struct WxKey {
    cipher: Aes256,
    iv: [u8; 16],
}

impl core::fmt::Debug for WxKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("WxKey(..)")
    }
}

impl WxKey {
    /// `encoding_aes_key` is the 43-character value shown in the platform console.
    pub fn new(encoding_aes_key: &str) -> Result<Self> {
        let k = encoding_aes_key.trim();
        if k.len() != 43 {
            return Err(Error::config(format!(
                "the AES key must be 43 characters, got {}",
                k.len()
            )));
        }
        let bytes = b64_decode(&format!("{k}="))
            .map_err(|_| Error::config("the AES key is not valid base64"))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::config("the AES key does not decode to 32 bytes"))?;
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&key[..16]);
        Ok(WxKey {
            cipher: Aes256::new(&key.into()),
            iv,
        })
    }

    /// Returns the message after checking the frame and that the trailing receive id equals
    /// `receive_id` (the AppKey / CorpID the callback must be addressed to). Decrypts in the
    /// buffer base64 decoded into, so a callback costs one allocation here, not three.
    pub fn decrypt(&self, encrypted_b64: &str, receive_id: &str) -> Result<Vec<u8>> {
        let mut buf = b64_decode(encrypted_b64)?;
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(undecryptable());
        }
        let pt = cbc::Decryptor::inner_iv_init(self.cipher.clone(), &self.iv.into())
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| undecryptable())?;
        let body = unpad32(pt).ok_or_else(undecryptable)?;
        if body.len() < 20 {
            return Err(undecryptable());
        }
        let len = u32::from_be_bytes([body[16], body[17], body[18], body[19]]) as usize;
        let rest = &body[20..];
        if len > rest.len() {
            return Err(undecryptable());
        }
        if !ct_eq(&rest[len..], receive_id.as_bytes()) {
            return Err(Error::unauthorized(
                "callback is addressed to another app (receive id mismatch)",
            ));
        }
        buf.truncate(20 + len);
        buf.drain(..20);
        Ok(buf)
    }

    pub fn encrypt(&self, random: [u8; 16], msg: &[u8], receive_id: &str) -> String {
        let mut pt = Vec::with_capacity(20 + msg.len() + receive_id.len() + PAD_BLOCK);
        pt.extend_from_slice(&random);
        pt.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        pt.extend_from_slice(msg);
        pt.extend_from_slice(receive_id.as_bytes());
        let pad = PAD_BLOCK - pt.len() % PAD_BLOCK;
        pt.resize(pt.len() + pad, pad as u8);
        let ct = cbc::Encryptor::inner_iv_init(self.cipher.clone(), &self.iv.into())
            .encrypt_padded_vec_mut::<NoPadding>(&pt);
        b64_encode(&ct)
    }
}

/// PKCS#7 with a 32-byte block: the last byte n (1..=32) repeats n times.
fn unpad32(pt: &[u8]) -> Option<&[u8]> {
    let n = *pt.last()? as usize;
    if n == 0 || n > PAD_BLOCK || n > pt.len() {
        return None;
    }
    let (body, pad) = pt.split_at(pt.len() - n);
    pad.iter().all(|&b| b as usize == n).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";

    #[test]
    fn roundtrip_and_receive_id_check() {
        let k = WxKey::new(KEY).unwrap();
        let enc = k.encrypt([9; 16], b"<xml>hi</xml>", "wx5823bf96d3bd56c7");
        assert_eq!(
            k.decrypt(&enc, "wx5823bf96d3bd56c7").unwrap(),
            b"<xml>hi</xml>"
        );
        assert!(matches!(
            k.decrypt(&enc, "other-corp"),
            Err(Error::Unauthorized(_))
        ));
    }

    /// WeCom's own worked example (developer.work.weixin.qq.com/document/path/90968, and the
    /// official sample code): token QDG6eK, this key, company wx5823bf96d3bd56c7. Unlike the
    /// round trip above it pins the scheme to WeCom's, not to itself.
    #[test]
    fn wecoms_published_example() {
        const CORP: &str = "wx5823bf96d3bd56c7";
        let k = WxKey::new(KEY).unwrap();
        let echo = "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==";
        assert_eq!(
            crate::crypto::sorted_sha1_hex(&["QDG6eK", "1409659589", "263014780", echo]),
            "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3"
        );
        assert_eq!(k.decrypt(echo, CORP).unwrap(), b"1616140317555161061");
        let post = "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDAVe0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==";
        assert_eq!(
            crate::crypto::sorted_sha1_hex(&["QDG6eK", "1409659813", "1372623149", post]),
            "477715d11cdb4164915debcba66cb864d751f3e6"
        );
        assert_eq!(
            String::from_utf8(k.decrypt(post, CORP).unwrap()).unwrap(),
            "<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName>\n\
             <FromUserName><![CDATA[mycreate]]></FromUserName>\n\
             <CreateTime>1409659813</CreateTime>\n\
             <MsgType><![CDATA[text]]></MsgType>\n\
             <Content><![CDATA[hello]]></Content>\n\
             <MsgId>4561255354251345929</MsgId>\n\
             <AgentID>218</AgentID>\n\
             </xml>"
        );
        assert!(matches!(
            k.decrypt(post, "ww0000000000000000"),
            Err(Error::Unauthorized(_))
        ));
    }

    #[test]
    fn pads_to_32_not_16() {
        let k = WxKey::new(KEY).unwrap();
        // 16 + 4 + 5 + 3 = 28 bytes → one 32-byte block with 4 bytes of padding 0x04.
        let enc = k.encrypt([0; 16], b"hello", "abc");
        assert_eq!(b64_decode(&enc).unwrap().len(), 32);
        // 16 + 4 + 9 + 3 = 32 bytes → a whole extra block of 0x20.
        let enc = k.encrypt([0; 16], b"123456789", "abc");
        assert_eq!(b64_decode(&enc).unwrap().len(), 64);
        assert_eq!(k.decrypt(&enc, "abc").unwrap(), b"123456789");
    }

    #[test]
    fn rejects_bad_padding_and_lengths() {
        assert_eq!(unpad32(&[1, 2, 3, 0]), None);
        assert_eq!(unpad32(&[33; 40]), None);
        assert_eq!(unpad32(&[5, 5, 3, 3]), None);
        assert_eq!(unpad32(&[7, 2, 2]), Some(&[7][..]));
        let k = WxKey::new(KEY).unwrap();
        assert!(matches!(
            k.decrypt("AAAA", "x"),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn key_must_be_43_chars() {
        assert!(matches!(WxKey::new("short"), Err(Error::InvalidConfig(_))));
    }
}
