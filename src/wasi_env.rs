//! `Env` over the WASI imports: wasi:http outgoing, wasi:keyvalue, wasi:clocks, wasi:random.

use crate::component::wasi::clocks::{monotonic_clock, wall_clock};
use crate::component::wasi::http::outgoing_handler;
use crate::component::wasi::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
    TlsAlertReceivedPayload,
};
use crate::component::wasi::io::streams::StreamError;
use crate::component::wasi::keyvalue::{atomics, store};
use crate::component::wasi::random::random;
use crate::env::{Env, Request, Response};
use crate::error::{Error, Result};
use std::cell::OnceCell;

/// Platform replies are small; a larger body means something is wrong upstream.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
const CHUNK: usize = 4096;

pub struct WasiEnv {
    bucket: OnceCell<core::result::Result<store::Bucket, String>>,
}

impl WasiEnv {
    pub fn new() -> Self {
        WasiEnv {
            bucket: OnceCell::new(),
        }
    }

    fn bucket(&self) -> Result<&store::Bucket> {
        self.bucket
            .get_or_init(|| store::open("").map_err(|e| kv_error(&e)))
            .as_ref()
            .map_err(|e| Error::storage(e.clone()))
    }
}

fn kv_error(e: &store::Error) -> String {
    match e {
        store::Error::NoSuchStore => "key-value store not available".into(),
        store::Error::AccessDenied => "key-value store access denied".into(),
        store::Error::Other(s) => s.clone(),
    }
}

fn transport(e: ErrorCode, authority: &str) -> Error {
    // Codes that end a request before any of it can reach the server: no connection, no
    // address, or the host's own refusal. A create that failed this way did not happen, so
    // the start may be retried instead of holding its key for a person (-3). Timeouts after
    // connecting, resets and TLS protocol errors leave it open.
    let unsent = matches!(
        e,
        ErrorCode::HttpRequestDenied
            | ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTimeout
            | ErrorCode::DnsError(_)
            | ErrorCode::DnsTimeout
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationUnavailable
            | ErrorCode::DestinationIpProhibited
            | ErrorCode::DestinationIpUnroutable
            | ErrorCode::TlsCertificateError
            | ErrorCode::HttpRequestUriInvalid
            | ErrorCode::HttpRequestMethodInvalid
            // The host stopped sending a body over its limit: the server has an unfinished
            // request, which it cannot act on.
            | ErrorCode::HttpRequestBodySize(_)
    );
    let what = match e {
        ErrorCode::HttpRequestDenied => "denied by the host (not on the allow-list)".to_string(),
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout => "timed out".to_string(),
        ErrorCode::ConnectionRefused => "connection refused".to_string(),
        ErrorCode::DnsError(_) => "DNS lookup failed".to_string(),
        ErrorCode::DestinationIpProhibited => {
            "refused by the host (link-local or metadata address)".to_string()
        }
        ErrorCode::HttpRequestBodySize(limit) => match limit {
            Some(n) => format!("request body exceeds the host's limit of {n} bytes"),
            None => "request body exceeds the host's limit".to_string(),
        },
        ErrorCode::InternalError(Some(m)) => format!("internal-error: {m}"),
        ErrorCode::TlsAlertReceived(TlsAlertReceivedPayload {
            alert_message: Some(m),
            ..
        }) => format!("TLS-alert-received: {m}"),
        other => code_name(&other).to_string(),
    };
    // The engine sees one `transport` kind; the suffix tells it what the plugin knows.
    match unsent {
        true => Error::unsent(format!("request to {authority}: {what} (not sent)")),
        false => Error::transport(format!("request to {authority}: {what}")),
    }
}

/// The code's name in wasi:http. (Its `Debug` form said as much, but formatting the payloads'
/// types cost the component 5.4 KB.)
fn code_name(e: &ErrorCode) -> &'static str {
    match e {
        ErrorCode::DnsTimeout => "DNS-timeout",
        ErrorCode::DnsError(_) => "DNS-error",
        ErrorCode::DestinationNotFound => "destination-not-found",
        ErrorCode::DestinationUnavailable => "destination-unavailable",
        ErrorCode::DestinationIpProhibited => "destination-IP-prohibited",
        ErrorCode::DestinationIpUnroutable => "destination-IP-unroutable",
        ErrorCode::ConnectionRefused => "connection-refused",
        ErrorCode::ConnectionTerminated => "connection-terminated",
        ErrorCode::ConnectionTimeout => "connection-timeout",
        ErrorCode::ConnectionReadTimeout => "connection-read-timeout",
        ErrorCode::ConnectionWriteTimeout => "connection-write-timeout",
        ErrorCode::ConnectionLimitReached => "connection-limit-reached",
        ErrorCode::TlsProtocolError => "TLS-protocol-error",
        ErrorCode::TlsCertificateError => "TLS-certificate-error",
        ErrorCode::TlsAlertReceived(_) => "TLS-alert-received",
        ErrorCode::HttpRequestDenied => "HTTP-request-denied",
        ErrorCode::HttpRequestLengthRequired => "HTTP-request-length-required",
        ErrorCode::HttpRequestBodySize(_) => "HTTP-request-body-size",
        ErrorCode::HttpRequestMethodInvalid => "HTTP-request-method-invalid",
        ErrorCode::HttpRequestUriInvalid => "HTTP-request-URI-invalid",
        ErrorCode::HttpRequestUriTooLong => "HTTP-request-URI-too-long",
        ErrorCode::HttpRequestHeaderSectionSize(_) => "HTTP-request-header-section-size",
        ErrorCode::HttpRequestHeaderSize(_) => "HTTP-request-header-size",
        ErrorCode::HttpRequestTrailerSectionSize(_) => "HTTP-request-trailer-section-size",
        ErrorCode::HttpRequestTrailerSize(_) => "HTTP-request-trailer-size",
        ErrorCode::HttpResponseIncomplete => "HTTP-response-incomplete",
        ErrorCode::HttpResponseHeaderSectionSize(_) => "HTTP-response-header-section-size",
        ErrorCode::HttpResponseHeaderSize(_) => "HTTP-response-header-size",
        ErrorCode::HttpResponseBodySize(_) => "HTTP-response-body-size",
        ErrorCode::HttpResponseTrailerSectionSize(_) => "HTTP-response-trailer-section-size",
        ErrorCode::HttpResponseTrailerSize(_) => "HTTP-response-trailer-size",
        ErrorCode::HttpResponseTransferCoding(_) => "HTTP-response-transfer-coding",
        ErrorCode::HttpResponseContentCoding(_) => "HTTP-response-content-coding",
        ErrorCode::HttpResponseTimeout => "HTTP-response-timeout",
        ErrorCode::HttpUpgradeFailed => "HTTP-upgrade-failed",
        ErrorCode::HttpProtocolError => "HTTP-protocol-error",
        ErrorCode::LoopDetected => "loop-detected",
        ErrorCode::ConfigurationError => "configuration-error",
        ErrorCode::InternalError(_) => "internal-error",
    }
}

impl Env for WasiEnv {
    fn send(&self, r: &Request) -> Result<Response> {
        let (https, authority, path) = crate::http::split_url(&r.url)
            .ok_or_else(|| Error::config("URL must be http(s) with a host"))?;
        let scheme = if https { Scheme::Https } else { Scheme::Http };
        let headers = Fields::new();
        for (k, v) in &r.headers {
            headers
                .append(k, v.as_bytes())
                .map_err(|_| Error::input(format!("invalid header {k}")))?;
        }
        let req = OutgoingRequest::new(headers);
        let method = match r.method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            other => Method::Other(other.to_string()),
        };
        let bad = |_| Error::config("cannot build request");
        req.set_method(&method).map_err(bad)?;
        req.set_scheme(Some(&scheme)).map_err(bad)?;
        req.set_authority(Some(authority)).map_err(bad)?;
        req.set_path_with_query(Some(path)).map_err(bad)?;
        let opts = RequestOptions::new();
        let ns = r.timeout_ms.saturating_mul(1_000_000);
        // A host may not support every timeout; the ones it does are enough.
        let _ = opts.set_connect_timeout(Some(ns));
        let _ = opts.set_first_byte_timeout(Some(ns));
        let _ = opts.set_between_bytes_timeout(Some(ns));
        let body = req.body().map_err(bad)?;
        let future =
            outgoing_handler::handle(req, Some(opts)).map_err(|e| transport(e, authority))?;
        let written = {
            let out = body.write().map_err(bad)?;
            r.body
                .chunks(CHUNK)
                .try_for_each(|chunk| out.blocking_write_and_flush(chunk))
        };
        match written {
            Ok(()) => OutgoingBody::finish(body, None).map_err(|e| transport(e, authority))?,
            // The host aborted the request (e.g. its body cap); the reason comes with the
            // response future, so the body is abandoned and the future read below.
            Err(_) => drop(body),
        }

        future.subscribe().block();
        let resp = match future.get() {
            Some(Ok(Ok(resp))) if written.is_ok() => resp,
            Some(Ok(Err(e))) => return Err(transport(e, authority)),
            Some(Ok(Ok(_))) if written.is_err() => {
                return Err(Error::transport(format!(
                    "request to {authority}: body write failed"
                )));
            }
            _ => {
                return Err(Error::transport(format!(
                    "request to {authority}: no response"
                )));
            }
        };
        let status = resp.status();
        let headers = resp
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = resp
            .consume()
            .map_err(|_| Error::transport("response body unavailable"))?;
        let mut body = Vec::new();
        {
            let stream = incoming
                .stream()
                .map_err(|_| Error::transport("response body unavailable"))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(chunk) => {
                        body.extend_from_slice(&chunk);
                        if body.len() > MAX_RESPONSE_BYTES {
                            return Err(Error::transport(format!(
                                "response from {authority} exceeds {MAX_RESPONSE_BYTES} bytes"
                            )));
                        }
                    }
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(_)) => {
                        return Err(Error::transport(format!(
                            "reading the response from {authority} failed or timed out"
                        )));
                    }
                }
            }
        }
        drop(incoming);
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.bucket()?
            .get(key)
            .map_err(|e| Error::storage(kv_error(&e)))
    }

    fn kv_set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.bucket()?
            .set(key, value)
            .map_err(|e| Error::storage(kv_error(&e)))
    }

    fn kv_delete(&self, key: &str) -> Result<()> {
        self.bucket()?
            .delete(key)
            .map_err(|e| Error::storage(kv_error(&e)))
    }

    fn kv_increment(&self, key: &str, delta: u64) -> Result<u64> {
        atomics::increment(self.bucket()?, key, delta).map_err(|e| Error::storage(kv_error(&e)))
    }

    fn now_ms(&self) -> u64 {
        let t = wall_clock::now();
        t.seconds * 1000 + u64::from(t.nanoseconds / 1_000_000)
    }

    fn sleep_ms(&self, ms: u64) {
        monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    }

    fn random_bytes(&self, len: usize) -> Vec<u8> {
        random::get_random_bytes(len as u64)
    }
}
