//! Outgoing HTTP for the plugin: wasmtime-wasi-http with an allow-list and capped timeouts.
//!
//! The plugin holds app secrets and could be coaxed (or written) to send them anywhere; the
//! allow-list confines it to the IM platforms' API hosts, hosts the operator configured for
//! the tenant, and the `api-base` the engine passed with the current call.

use crate::log;
use http_body_util::{BodyExt, Limited};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi_http::p2::bindings::http::{outgoing_handler, types};
use wasmtime_wasi_http::p2::types::HostOutgoingRequest;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttp, WasiHttpHooks, WasiHttpView};

/// The public API hosts of the supported platforms, always allowed (on the default port).
pub const PLATFORM_HOSTS: &[&str] = &[
    "open.feishu.cn",
    "open.larksuite.com",
    "api.dingtalk.com",
    "oapi.dingtalk.com",
    "qyapi.weixin.qq.com",
];

/// Timeouts used when the plugin does not set its own request options.
const DEFAULT_CONNECT: Duration = Duration::from_secs(10);
const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(30);
const DEFAULT_BETWEEN_BYTES: Duration = Duration::from_secs(30);

/// One allowed destination. Without a port it matches only the scheme's default port, so
/// allowing `example.com` does not open every service that host runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses `host`, `host:port`, `[v6]:port`, or a URL (only its authority is used).
    pub fn parse(text: &str) -> anyhow::Result<HostPattern> {
        let (host, port) = split_authority(text).ok_or_else(|| {
            anyhow::anyhow!(
                "`{}` is not a host, host:port or URL",
                without_userinfo(text)
            )
        })?;
        Ok(HostPattern {
            host: normalize_host(host),
            port,
        })
    }

    fn matches(&self, host: &str, port: u16, default_port: u16) -> bool {
        self.host == host && self.port.unwrap_or(default_port) == port
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) if self.host.contains(':') => write!(f, "[{}]:{port}", self.host),
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// Splits the authority out of `text` into host and optional port.
fn split_authority(text: &str) -> Option<(&str, Option<u16>)> {
    let text = text.trim();
    let rest = match text.split_once("://") {
        Some((_scheme, rest)) => rest,
        None => text,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = match authority.rsplit_once('@') {
        Some((_userinfo, a)) => a,
        None => authority,
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '[' || c == ']') {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((host, port))
}

/// `text` with any `user:password@` of its authority masked: an `api_base` or allow-list entry
/// may carry credentials, and errors about it reach logs and callers.
fn without_userinfo(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    // Up to the last `@` anywhere: a password may hold `/`, `?` or `#`, and an authority
    // too broken to parse cannot be told from a path, so a path's `@` is masked too.
    let masked = match rest.rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => return text.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{masked}"),
        None => masked,
    }
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The destinations one plugin call may reach.
#[derive(Clone, Debug, Default)]
pub struct AllowList {
    patterns: Vec<HostPattern>,
}

impl AllowList {
    /// The platform hosts plus `extra` (the tenant's configured hosts).
    pub fn new(extra: &[String]) -> anyhow::Result<AllowList> {
        let mut patterns: Vec<HostPattern> = PLATFORM_HOSTS
            .iter()
            .map(|h| HostPattern {
                host: (*h).to_string(),
                port: None,
            })
            .collect();
        for entry in extra {
            patterns.push(HostPattern::parse(entry)?);
        }
        Ok(AllowList { patterns })
    }

    /// A copy that also allows the authority of `api_base`.
    pub fn with(&self, api_base: &str) -> anyhow::Result<AllowList> {
        let mut list = self.clone();
        list.patterns.push(HostPattern::parse(api_base)?);
        Ok(list)
    }

    /// Whether a request to `uri` may be sent.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let Some(authority) = uri.authority() else {
            return false;
        };
        let default_port = match uri.scheme_str() {
            Some("https") => 443,
            Some("http") => 80,
            _ => return false,
        };
        let port = authority.port_u16().unwrap_or(default_port);
        let host = uri_host(uri).unwrap_or_default();
        !is_prohibited_ip(&host)
            && self
                .patterns
                .iter()
                .any(|p| p.matches(&host, port, default_port))
    }
}

/// The host of `uri`, lower-cased, without a trailing dot or IPv6 brackets.
fn uri_host(uri: &http::Uri) -> Option<String> {
    let host = uri.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(normalize_host(host))
}

/// Link-local addresses (cloud metadata services such as 169.254.169.254 live there) and the
/// unspecified address are refused even when allow-listed: no IM platform is reached that way,
/// and a plugin talking to the metadata service could steal the host's cloud credentials.
/// (Names are not resolved here; the allow-list admits only names the operator chose.)
pub fn is_prohibited_ip(host: &str) -> bool {
    let parsed = host
        .parse::<std::net::IpAddr>()
        .or_else(|e| inet_aton(host).map(std::net::IpAddr::V4).ok_or(e));
    match parsed {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_link_local() || v4.is_unspecified(),
        Ok(std::net::IpAddr::V6(v6)) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.is_unspecified()
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
        Err(_) => false,
    }
}

/// The IPv4 address the system resolver reads from `host` besides the dotted quad: `inet_aton`'s
/// one to four parts, each decimal, `0x` hex or `0`-led octal, the last filling the remaining
/// bytes (`2852039166`, `0xa9fea9fe`, `169.254.43518` and `0` are addresses to `connect`).
fn inet_aton(host: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            Some(hex) => (hex, 16),
            None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
            None => (*part, 10),
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = match digits {
            "" => 0,
            _ => u32::from_str_radix(digits, radix).ok()?,
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&v| v > 0xff) {
        return None;
    }
    let room = 8 * (4 - leading.len() as u32);
    if room < 32 && *last >> room != 0 {
        return None;
    }
    let head = leading
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &v)| acc | v << (24 - 8 * i as u32));
    Some(std::net::Ipv4Addr::from(head | last))
}

/// Bodies the plugin sends are capped: platform API requests are a few KiB, and a plugin
/// streaming gigabytes would tie up the host's bandwidth on behalf of one tenant.
pub const MAX_REQUEST_BODY: u64 = 2 * 1024 * 1024;

/// Adds `wasi:http/types` and an `outgoing-handler` that checks the allow-list.
///
/// wasmtime-wasi-http reports errors of `send_request` only through the response future,
/// after the guest has started writing the body; the guest then sees "body write failed"
/// instead of the reason. Checking in `handle` refuses the request before any of that, with
/// `HTTP-request-denied`. The `send_request` hook checks again, as the last line.
///
/// `handle` is defined by hand because the generated `add_to_linker` wants the whole
/// `wasi:http/types` host implemented by whatever type carries the check.
pub fn add_to_linker<T: WasiHttpView + 'static>(
    linker: &mut Linker<T>,
    policy: fn(&T) -> &HttpPolicy,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, WasiHttp>(linker, &Default::default(), T::http)?;
    let mut instance = linker.instance(OUTGOING_HANDLER)?;
    instance.func_wrap(
        "handle",
        move |mut store: StoreContextMut<'_, T>,
              (request, options): (
            Resource<HostOutgoingRequest>,
            Option<Resource<RequestOptions>>,
        )| {
            let data = store.data_mut();
            let (scheme, authority) = {
                let view = data.http();
                let req = view.table.get(&request)?;
                let scheme = match &req.scheme {
                    None | Some(types::Scheme::Https) => "https",
                    Some(types::Scheme::Http) => "http",
                    Some(types::Scheme::Other(_)) => "unsupported",
                };
                (scheme, req.authority.clone().unwrap_or_default())
            };
            let uri = format!("{scheme}://{authority}/").parse::<http::Uri>();
            if let Ok(uri) = &uri
                && uri_host(uri).is_some_and(|h| is_prohibited_ip(&h))
            {
                policy(data).log_prohibited(&authority);
                data.http().table.delete(request)?;
                return Ok((Err(types::ErrorCode::DestinationIpProhibited),));
            }
            if !uri.is_ok_and(|uri| policy(data).allows(&uri)) {
                policy(data).log_denied(&authority);
                data.http().table.delete(request)?;
                return Ok((Err(types::ErrorCode::HttpRequestDenied),));
            }
            let declared = {
                let view = data.http();
                let req = view.table.get(&request)?;
                req.headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if declared.is_some_and(|n| n > MAX_REQUEST_BODY) {
                policy(data).log_too_big(&authority);
                data.http().table.delete(request)?;
                return Ok((Err(types::ErrorCode::HttpRequestBodySize(declared)),));
            }
            match outgoing_handler::Host::handle(&mut data.http(), request, options) {
                Ok(response) => Ok((Ok(response),)),
                Err(e) => Ok((Err(e.downcast()?),)),
            }
        },
    )?;
    Ok(())
}

/// The interface as the vendored WIT names it; the linker also serves older 0.2.x imports.
const OUTGOING_HANDLER: &str = "wasi:http/outgoing-handler@0.2.12";

/// Most connections one call may have open at once. The plugin sends one request at a time;
/// without a bound a plugin could open thousands, use up the host's file descriptors (other
/// tenants' connects then fail) and flood a platform from the host's address.
pub const MAX_CONNECTIONS_PER_CALL: usize = 16;

/// The `wasi:http` hooks of one plugin call.
pub struct HttpPolicy {
    pub tenant: Arc<str>,
    pub allow: AllowList,
    /// When the call must be over.
    pub deadline: Instant,
    /// Time left to the plugin after a request has timed out, to turn the timeout into a typed
    /// `transport` error instead of being cut off by the call deadline.
    pub margin: Duration,
    /// The call's open connections ([`MAX_CONNECTIONS_PER_CALL`]); further requests wait.
    pub connections: Arc<tokio::sync::Semaphore>,
}

impl HttpPolicy {
    pub fn new(tenant: Arc<str>, allow: AllowList, deadline: Instant, margin: Duration) -> Self {
        HttpPolicy {
            tenant,
            allow,
            deadline,
            margin,
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_CALL)),
        }
    }

    /// When every request of the call must be over: the deadline less the margin.
    fn until(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.left()
    }

    /// How long the call's requests have from now: to the deadline, less the margin.
    fn left(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .saturating_sub(self.margin)
    }

    /// The plugin's timeouts (or defaults), none beyond the call deadline minus the margin.
    fn options(&self, asked: Option<RequestOptions>) -> RequestOptions {
        let asked = asked.unwrap_or_default();
        let left = self.left();
        let cap = |t: Option<Duration>, default: Duration| Some(t.unwrap_or(default).min(left));
        RequestOptions {
            connect_timeout: cap(asked.connect_timeout, DEFAULT_CONNECT),
            first_byte_timeout: cap(asked.first_byte_timeout, DEFAULT_FIRST_BYTE),
            between_bytes_timeout: cap(asked.between_bytes_timeout, DEFAULT_BETWEEN_BYTES),
        }
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

/// What a failed TLS handshake tells the plugin. The default says protocol error for every
/// one, which the plugin must read as "may have been sent"; a certificate the host does not
/// trust is certain to have stopped the request before any of it left.
fn tls_error_code(err: &std::io::Error) -> types::ErrorCode {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => types::ErrorCode::TlsCertificateError,
        _ => types::ErrorCode::TlsProtocolError,
    }
}

impl WasiHttpHooks for HttpPolicy {
    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> types::ErrorCode {
        tls_error_code(err)
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        if !self.allows(request.uri()) {
            self.log_denied(request.uri().host().unwrap_or(""));
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let options = self.options(options);
        let tenant = self.tenant.clone();
        let host = request.uri().host().unwrap_or_default().to_string();
        // Streamed bodies are counted as they go: past the cap the request is aborted. hyper
        // reports that as a protocol error, so the flag turns it back into the reason.
        let over = Arc::new(AtomicBool::new(false));
        let flag = over.clone();
        // hyper looks at the body only once the connection (TLS included) is up and the
        // request is about to be written: until then, nothing of it can have left.
        let started = Arc::new(AtomicBool::new(false));
        let writing = started.clone();
        let request = request.map(move |body| {
            let body = Started {
                body,
                started: writing,
            };
            Limited::new(body, MAX_REQUEST_BODY as usize)
                .map_err(move |e| match e.downcast::<Error>() {
                    Ok(e) => *e,
                    Err(_) => {
                        flag.store(true, Ordering::Relaxed);
                        log!(
                            "tenant={tenant} http request to host={host} aborted: body over \
                             {MAX_REQUEST_BODY} bytes"
                        );
                        Error::HttpRequestBodySize(Some(MAX_REQUEST_BODY))
                    }
                })
                .boxed_unsync()
        });
        let until = self.until();
        let connections = self.connections.clone();
        Box::new(async move {
            let too_big = || Error::HttpRequestBodySize(Some(MAX_REQUEST_BODY));
            // Nothing has gone out while the request waits for a connection of its own.
            let permit = tokio::time::timeout_at(until, connections.acquire_owned())
                .await
                .map_err(|_| Error::ConnectionTimeout)?
                .map_err(|_| Error::ConnectionTimeout)?;
            // Each of the connect, first-byte and between-bytes timeouts is capped at the time
            // left, but not their sum, and the TLS handshake has none: one bound for the whole
            // exchange keeps a stalled or dripping server from running the call into its
            // deadline, where the plugin would get no answer at all. Before the request began
            // to be written it is a connect timeout (certainly unsent); after, a read timeout.
            let sent = wasmtime_wasi_http::default_send_request(request, Some(options));
            let (response, io) = tokio::time::timeout_at(until, sent)
                .await
                .map_err(|_| match started.load(Ordering::Relaxed) {
                    true => Error::ConnectionReadTimeout,
                    false => Error::ConnectionTimeout,
                })?
                .map_err(|e| {
                    if over.load(Ordering::Relaxed) {
                        too_big()
                    } else {
                        e
                    }
                })?;
            let io = async move {
                let _connection = permit;
                io.await.map_err(|e| {
                    if over.load(Ordering::Relaxed) {
                        too_big()
                    } else {
                        e
                    }
                })
            };
            Ok((
                response.map(|body| Until::new(body, until).boxed_unsync()),
                Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

/// A request body that notes when hyper first looks at it.
struct Started<B> {
    body: B,
    started: Arc<AtomicBool>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Started<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        self.started.store(true, Ordering::Relaxed);
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.started.store(true, Ordering::Relaxed);
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.started.store(true, Ordering::Relaxed);
        self.body.size_hint()
    }
}

/// A response body that fails with a read timeout once `until` has passed without its end.
/// The between-bytes timeout restarts with every chunk, so a server sending one byte at a time
/// would otherwise hold the plugin past its deadline.
struct Until<B> {
    body: B,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<B> Until<B> {
    fn new(body: B, until: tokio::time::Instant) -> Self {
        Until {
            body,
            timer: Box::pin(tokio::time::sleep_until(until)),
        }
    }
}

impl<B> hyper::body::Body for Until<B>
where
    B: hyper::body::Body<Error = Error> + Unpin,
{
    type Data = B::Data;
    type Error = Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, Error>>> {
        // The timer first: a body whose data is always ready would otherwise never end.
        if self.timer.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(Error::ConnectionReadTimeout)));
        }
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl HttpPolicy {
    fn allows(&self, uri: &http::Uri) -> bool {
        self.allow.allows(uri)
    }

    /// Logs the host only: paths and queries of webhook URLs carry access tokens.
    fn log_denied(&self, authority: &str) {
        self.log_refused(authority, "not in the allow-list");
    }

    fn log_prohibited(&self, authority: &str) {
        self.log_refused(
            authority,
            "link-local or unspecified address, never allowed",
        );
    }

    fn log_too_big(&self, authority: &str) {
        self.log_refused(
            authority,
            &format!("content-length over {MAX_REQUEST_BODY} bytes"),
        );
    }

    fn log_refused(&self, authority: &str, why: &str) {
        let host = split_authority(authority).map_or("?", |(host, _)| host);
        log!("tenant={} http denied host={host} ({why})", self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn platform_hosts_are_allowed_on_default_ports_only() {
        let list = AllowList::new(&[]).unwrap();
        assert!(list.allows(&uri(
            "https://open.feishu.cn/open-apis/auth/v3/tenant_access_token/internal"
        )));
        assert!(list.allows(&uri("https://OPEN.FEISHU.CN./x")));
        assert!(list.allows(&uri("https://qyapi.weixin.qq.com:443/cgi-bin/gettoken")));
        assert!(list.allows(&uri("https://oapi.dingtalk.com/robot/send?access_token=x")));
        assert!(!list.allows(&uri("https://open.feishu.cn:8443/")));
        assert!(!list.allows(&uri("https://open.feishu.cn.evil.com/")));
        assert!(!list.allows(&uri("https://evil.com/open.feishu.cn")));
        assert!(!list.allows(&uri("http://127.0.0.1:8080/")));
        assert!(!list.allows(&uri("/relative")));
        assert!(!list.allows(&uri("ftp://open.feishu.cn/")));
    }

    #[test]
    fn extra_hosts_and_api_base() {
        let list = AllowList::new(&["127.0.0.1:40123".into(), "Example.com".into()]).unwrap();
        assert!(list.allows(&uri("http://127.0.0.1:40123/open-apis")));
        assert!(!list.allows(&uri("http://127.0.0.1:40124/")));
        assert!(list.allows(&uri("https://example.com/hook")));
        assert!(list.allows(&uri("http://example.com/hook")));
        assert!(!list.allows(&uri("https://example.com:444/hook")));
        assert!(!list.allows(&uri("https://sub.example.com/hook")));

        let call = list.with("http://localhost:9000/base/path?x=1").unwrap();
        assert!(call.allows(&uri("http://localhost:9000/open-apis/x")));
        assert!(!list.allows(&uri("http://localhost:9000/open-apis/x")));
        let v6 = list.with("http://[::1]:7000").unwrap();
        assert!(v6.allows(&uri("http://[::1]:7000/")));
        assert!(!v6.allows(&uri("http://[::1]:7001/")));
        let bare = list.with("https://private.feishu.corp").unwrap();
        assert!(bare.allows(&uri("https://private.feishu.corp/open-apis")));
    }

    #[test]
    fn link_local_and_unspecified_addresses_are_never_allowed() {
        let list = AllowList::new(&[
            "169.254.169.254".into(),
            "169.254.169.254:80".into(),
            "[fe80::1]:80".into(),
            "0.0.0.0:8080".into(),
            "[::ffff:169.254.169.254]:80".into(),
            "10.0.0.1:80".into(),
        ])
        .unwrap();
        for refused in [
            "http://169.254.169.254/latest/meta-data/",
            "http://169.254.1.2:80/",
            "http://[fe80::1]:80/",
            "http://0.0.0.0:8080/",
            "http://[::ffff:169.254.169.254]:80/",
        ] {
            assert!(!list.allows(&uri(refused)), "{refused}");
        }
        assert!(list.allows(&uri("http://10.0.0.1/")));
        assert!(!is_prohibited_ip("open.feishu.cn"));
        assert!(!is_prohibited_ip("127.0.0.1"));
    }

    /// The resolver `connect` uses reads these as 169.254.169.254 and 0.0.0.0, so allow-listing
    /// one (or an engine passing it as `api_base`) must not reach the metadata service.
    #[test]
    fn other_spellings_of_those_addresses_are_refused_too() {
        let spellings = [
            "2852039166",
            "0xa9fea9fe",
            "0XA9FEA9FE",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.16689662",
            "0xa9.0xfe.0xa9.0xfe",
            "0",
            "0.0",
            "00",
        ];
        let entries: Vec<String> = spellings.iter().map(|s| format!("{s}:8080")).collect();
        let list = AllowList::new(&entries).unwrap();
        for host in spellings {
            assert!(is_prohibited_ip(host), "{host}");
            let target = format!("http://{host}:8080/latest/meta-data/");
            assert!(!list.allows(&uri(&target)), "{target}");
        }
        assert_eq!(inet_aton("2852039166"), Some([169, 254, 169, 254].into()));
        assert_eq!(inet_aton("127.1"), Some([127, 0, 0, 1].into()));
        assert_eq!(inet_aton("10.0.513"), Some([10, 0, 2, 1].into()));
        // Not addresses to the resolver: names, out-of-range parts, bad digits.
        for name in [
            "open.feishu.cn",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "1.16777216",
            "4294967296",
            "08",
            "1..2",
            "",
        ] {
            assert_eq!(inet_aton(name), None, "{name}");
        }
        assert!(!is_prohibited_ip("2130706433")); // 127.0.0.1
    }

    /// How a request to `scheme://addr/` ends under a policy with `left` before its deadline
    /// and a 1 s margin: the error, or "answered".
    async fn outcome(scheme: &str, addr: std::net::SocketAddr, left: Duration) -> String {
        let allow = AllowList::new(&[addr.to_string()]).unwrap();
        let mut policy = HttpPolicy::new(
            "t".into(),
            allow,
            Instant::now() + left,
            Duration::from_secs(1),
        );
        let body = http_body_util::Empty::<bytes::Bytes>::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let request = http::Request::builder()
            .uri(format!("{scheme}://{addr}/x"))
            .body(body)
            .unwrap();
        let sent = policy.send_request(request, None, Box::new(async { Ok(()) }));
        match Box::into_pin(sent).await {
            Ok(_) => "answered".into(),
            Err(e) => format!("{e:?}"),
        }
    }

    /// A server that takes connections and says nothing, and one that reads the request and
    /// never answers it.
    async fn silent(read_first: bool) -> std::net::SocketAddr {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                if read_first {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                }
                held.push(s);
            }
        });
        addr
    }

    /// A request whose connection never got as far as writing it is "connect timeout", which
    /// tells the plugin it never left (a create may be retried); one written and unanswered
    /// is a read timeout (it may have been acted on).
    #[tokio::test]
    async fn timeouts_say_whether_the_request_can_have_left() {
        let stalled_tls = silent(false).await;
        assert_eq!(
            outcome("https", stalled_tls, Duration::from_millis(1500)).await,
            "ConnectionTimeout"
        );
        assert_eq!(
            outcome("https", stalled_tls, Duration::from_secs(1)).await,
            "ConnectionTimeout",
            "no time left"
        );
        let unanswered = silent(true).await;
        assert_eq!(
            outcome("http", unanswered, Duration::from_millis(1500)).await,
            "ConnectionReadTimeout"
        );
    }

    /// tokio-rustls hands a handshake's rustls error on inside an `io::Error`.
    #[test]
    fn an_untrusted_certificate_is_a_certificate_error() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let untrusted = wrap(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(matches!(
            tls_error_code(&untrusted),
            types::ErrorCode::TlsCertificateError
        ));
        for other in [
            wrap(rustls::Error::DecryptError),
            std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        ] {
            assert!(matches!(
                tls_error_code(&other),
                types::ErrorCode::TlsProtocolError
            ));
        }
    }

    #[test]
    fn credentials_in_a_bad_pattern_stay_out_of_the_error() {
        let err = HostPattern::parse("https://user:s3cr3t@h:44x/path").unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("s3cr3t"), "{msg}");
        assert!(msg.contains("***@h:44x/path"), "{msg}");
        assert_eq!(without_userinfo("h:44x"), "h:44x");
        assert_eq!(without_userinfo("u:p@h:x/a@b"), "***@b");
        for (leaky, secret) in [
            ("https://u:pa#ss@h:1", "pa#ss"),
            ("https://user:p/w@h", "p/w"),
            ("u:p?w@h:x", "p?w"),
        ] {
            assert!(!without_userinfo(leaky).contains(secret), "{leaky}");
            let err = HostPattern::parse(leaky).map(|p| p.to_string());
            assert!(!format!("{err:?}").contains(secret), "{leaky}: {err:?}");
        }
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in ["", "host:notaport", "host:70000", "[::1", "https://", "a b"] {
            assert!(
                HostPattern::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert_eq!(
            HostPattern::parse("user:pw@h.com:81/x")
                .unwrap()
                .to_string(),
            "h.com:81"
        );
    }

    #[test]
    fn timeouts_are_capped() {
        let made = Instant::now();
        let policy = HttpPolicy::new(
            "t".into(),
            AllowList::default(),
            made + Duration::from_secs(6),
            Duration::from_secs(1),
        );
        // What is left of the deadline less its margin, however long the machine took since.
        let near = |d: Option<Duration>, secs: u64| {
            let d = d.unwrap();
            d <= Duration::from_secs(secs)
                && d >= Duration::from_secs(secs).saturating_sub(made.elapsed())
        };
        let o = policy.options(None);
        assert!(near(o.connect_timeout, 5));
        let o = policy.options(Some(RequestOptions {
            connect_timeout: Some(Duration::from_secs(1)),
            first_byte_timeout: Some(Duration::from_secs(600)),
            between_bytes_timeout: None,
        }));
        assert_eq!(o.connect_timeout, Some(Duration::from_secs(1)));
        assert!(near(o.first_byte_timeout, 5));
        assert!(near(o.between_bytes_timeout, 5));
    }
}
