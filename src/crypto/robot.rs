//! Custom group robot signatures. The two platforms mirror each other: Feishu keys the HMAC
//! with "ts\nsecret" over an empty message (ts in seconds); DingTalk keys it with the secret
//! over "ts\nsecret" (ts in milliseconds).

use super::b64_encode;
use hmac::{Hmac, Mac};
use sha2::Sha256;

fn hmac_sha256_b64(key: &[u8], msg: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key length");
    mac.update(msg);
    b64_encode(&mac.finalize().into_bytes())
}

/// Value of `sign` in a Feishu bot webhook body, for `timestamp` = `ts_secs`.
pub fn feishu_sign(ts_secs: u64, secret: &str) -> String {
    hmac_sha256_b64(format!("{ts_secs}\n{secret}").as_bytes(), b"")
}

/// Value of `sign` (before URL-encoding) for a DingTalk robot URL, `timestamp` = `ts_ms`.
pub fn dingtalk_sign(ts_ms: u64, secret: &str) -> String {
    hmac_sha256_b64(secret.as_bytes(), format!("{ts_ms}\n{secret}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feishu_and_dingtalk_are_mirror_images() {
        // openssl dgst -sha256 -hmac $'1700000000\nsec' -binary </dev/null | base64
        assert_eq!(
            feishu_sign(1_700_000_000, "sec"),
            "ttGYnPblC3CcNExnS7y5igm57JhpqZJtHpJ+TURiUeg="
        );
        // printf '1700000000000\nsec' | openssl dgst -sha256 -hmac sec -binary | base64
        assert_eq!(
            dingtalk_sign(1_700_000_000_000, "sec"),
            "2Bn+1b9JMbAnwLtaHqn8F5V8vOWoUG9M7qcsi2p+u90="
        );
    }
}
