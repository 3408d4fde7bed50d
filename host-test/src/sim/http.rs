//! A tiny loopback HTTP/1.1 server and client shared by the platform simulators.
//!
//! The simulators only need "call a closure per request" plus test-controlled faults (canned
//! error responses, delays), so this wraps hyper 1 directly instead of pulling in a framework.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Bodies above this are refused with 413 before the handler sees them (real platforms cap
/// request sizes too; it also keeps a misbehaving client from exhausting test memory).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// One request as the simulator's handler sees it: fully buffered, raw body kept intact.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query string, e.g. `/open-apis/im/v1/messages`.
    pub path: String,
    /// Raw query string without `?` (empty when absent).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Request {
    /// First header value by (case-insensitive) name, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Percent-decoded value of a query parameter (`+` is a space, as in forms).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }
}

/// A response produced by a simulator handler or by an injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `status` with a JSON body and `Content-Type: application/json; charset=utf-8`.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Response {
            status,
            headers: vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body: body.to_string().into_bytes(),
        }
    }

    /// Adds a header (builder style).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// Test-controlled misbehaviour, keyed by exact request path (no query).
#[derive(Debug, Default)]
pub struct Faults {
    next: HashMap<String, VecDeque<Response>>,
    delays: HashMap<String, Duration>,
    /// Injected responses served so far, per path (those requests never reach the handler).
    served: HashMap<String, usize>,
    /// Requests whose answer is withheld after the handler has acted on them, per path.
    lost: HashMap<String, usize>,
    /// Requests let through to the handler before the injected responses start, per path.
    pass: HashMap<String, usize>,
    /// Requests that have begun waiting out a delay, per path.
    delayed: HashMap<String, usize>,
}

impl Faults {
    /// The next `n` requests to `path` get `response` instead of reaching the handler (so they
    /// change no simulator state, like a gateway rejecting them).
    pub fn fail_next(&mut self, path: &str, n: usize, response: Response) {
        let queue = self.next.entry(path.to_string()).or_default();
        queue.extend(std::iter::repeat_n(response, n));
    }

    /// As [`Self::fail_next`], after the next `pass` requests to `path` reach the handler.
    pub fn fail_after(&mut self, path: &str, pass: usize, n: usize, response: Response) {
        self.pass.insert(path.to_string(), pass);
        self.fail_next(path, n, response);
    }

    /// Every request to `path` waits `delay` before being answered; `None` removes the delay.
    pub fn set_delay(&mut self, path: &str, delay: Option<Duration>) {
        match delay {
            Some(d) => self.delays.insert(path.to_string(), d),
            None => self.delays.remove(path),
        };
    }

    /// The next `n` requests to `path` reach the handler, which acts on them, but their
    /// answers never leave: the client sees a timeout, as when a connection drops after the
    /// platform has acted.
    pub fn lose_answers(&mut self, path: &str, n: usize) {
        *self.lost.entry(path.to_string()).or_default() += n;
    }

    /// How many injected responses `path` has served (to count a client's retries).
    pub fn served(&self, path: &str) -> usize {
        self.served.get(path).copied().unwrap_or(0)
    }

    /// How many requests to `path` have arrived and begun waiting out its delay: a test can
    /// act while a request is certainly at the platform and unanswered.
    pub fn delayed(&self, path: &str) -> usize {
        self.delayed.get(path).copied().unwrap_or(0)
    }

    /// Injected responses still waiting for `path`.
    pub fn pending(&self, path: &str) -> usize {
        self.next.get(path).map_or(0, VecDeque::len)
    }

    /// Drops every pending fault and delay, and the counts of served ones.
    pub fn clear(&mut self) {
        self.next.clear();
        self.delays.clear();
        self.delayed.clear();
        self.pass.clear();
        self.served.clear();
        self.lost.clear();
    }

    fn take(&mut self, path: &str) -> (Option<Duration>, Option<Response>, bool) {
        let delay = self.delays.get(path).copied();
        if delay.is_some() {
            *self.delayed.entry(path.to_string()).or_default() += 1;
        }
        let fault = match self.pass.get_mut(path) {
            Some(pass) if *pass > 0 => {
                *pass -= 1;
                None
            }
            _ => self.next.get_mut(path).and_then(VecDeque::pop_front),
        };
        if fault.is_some() {
            *self.served.entry(path.to_string()).or_default() += 1;
        }
        let lose = match self.lost.get_mut(path) {
            Some(n) if *n > 0 && fault.is_none() => {
                *n -= 1;
                true
            }
            _ => false,
        };
        (delay, fault, lose)
    }
}

/// What a simulator plugs into [`Server::start`].
pub type Handler =
    Arc<dyn Fn(Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// A running loopback server; stops when dropped.
pub struct Server {
    addr: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl Server {
    /// Binds 127.0.0.1 on an ephemeral port and serves `handler`, consulting `faults` first.
    pub async fn start(handler: Handler, faults: Arc<Mutex<Faults>>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let faults = faults.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<Incoming>| {
                        let handler = handler.clone();
                        let faults = faults.clone();
                        async move { Ok::<_, Infallible>(dispatch(req, handler, faults).await) }
                    });
                    // Connection errors (client hung up mid-request, e.g. after its own
                    // timeout) are expected in fault tests and not interesting.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Server { addr, accept_loop })
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A platform simulator's configuration and state, shared by its request handler and the
/// handle tests drive it through.
pub struct Shared<C, S> {
    pub config: C,
    state: Mutex<S>,
}

impl<C, S> Shared<C, S> {
    /// The state; a test that panicked while holding it does not lock the others out.
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running platform simulator on 127.0.0.1: the server, what its handler shares, and the
/// faults tests inject ahead of the handler; stops when dropped. Each platform adds its own
/// operations (`DingtalkSim`, `FeishuSim`, `WecomSim`).
pub struct Sim<C, S> {
    server: Server,
    pub(super) inner: Arc<Shared<C, S>>,
    faults: Arc<Mutex<Faults>>,
}

impl<C: Send + Sync + 'static, S: Send + 'static> Sim<C, S> {
    /// Serves `handle` over `config` and `state` on an ephemeral loopback port; `platform`
    /// names it in the error.
    pub async fn launch(
        platform: &str,
        config: C,
        state: S,
        handle: fn(&Shared<C, S>, Request) -> Response,
    ) -> anyhow::Result<Self> {
        let inner = Arc::new(Shared {
            config,
            state: Mutex::new(state),
        });
        let faults = Arc::new(Mutex::new(Faults::default()));
        let handler_inner = inner.clone();
        let handler: Handler = Arc::new(move |req: Request| {
            let inner = handler_inner.clone();
            Box::pin(async move { handle(&inner, req) })
        });
        let server = Server::start(handler, faults.clone())
            .await
            .with_context(|| format!("starting the {platform} simulator"))?;
        Ok(Sim {
            server,
            inner,
            faults,
        })
    }

    /// `http://127.0.0.1:PORT`: the app's `api-base`.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Locks and returns the state. Do not hold the guard across an `.await`.
    pub fn state(&self) -> MutexGuard<'_, S> {
        self.inner.lock()
    }

    /// The fault injection itself: canned responses with any status, headers and body, and
    /// delays, for paths (exact, no query).
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delays every answer on `path` (to trigger client timeouts); `None` removes the delay.
    pub fn set_delay(&self, path: &str, delay: Option<Duration>) {
        self.faults().set_delay(path, delay);
    }

    /// Removes every injected fault and delay.
    pub fn clear_faults(&self) {
        self.faults().clear();
    }
}

/// Posts the same bytes to `url` until `accepted` takes a reply, waiting `retry_delays`
/// between attempts, as a platform redelivers a push: every attempt's reply, and whether
/// one was accepted.
pub async fn deliver(
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
    retry_delays: &[Duration],
    timeout: Duration,
    accepted: impl Fn(&Reply) -> bool,
) -> (Vec<Reply>, bool) {
    let mut attempts = Vec::new();
    for attempt in 0..=retry_delays.len() {
        if attempt > 0 {
            tokio::time::sleep(retry_delays[attempt - 1]).await;
        }
        let reply = post(url, headers, body.to_vec(), timeout).await;
        let done = accepted(&reply);
        attempts.push(reply);
        if done {
            return (attempts, true);
        }
    }
    (attempts, false)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn dispatch(
    req: hyper::Request<Incoming>,
    handler: Handler,
    faults: Arc<Mutex<Faults>>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return to_hyper(Response {
                status: 413,
                headers: vec![],
                body: b"request body too large".to_vec(),
            });
        }
    };
    let request = Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        headers: parts.headers,
        body,
    };
    let (delay, fault, lose) = faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take(&request.path);
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let response = match fault {
        Some(fault) => fault,
        None => handler(request).await,
    };
    if lose {
        // Longer than any client waits; the task ends when the client hangs up or the
        // runtime stops.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    to_hyper(response)
}

fn to_hyper(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(response.status).unwrap_or(hyper::StatusCode::OK);
    for (name, value) in response.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            out.headers_mut().append(name, value);
        }
    }
    out
}

/// What came back from [`post`]: the peer's status and body, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Option<u16>,
    pub body: Vec<u8>,
    /// Transport failure or timeout; `None` when an HTTP response arrived.
    pub error: Option<String>,
}

impl Reply {
    /// The body as (lossy) UTF-8, for assertions and reports.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// POSTs `body` with `headers` to an `http://` URL, giving up after `timeout`.
///
/// Used by simulators to push callbacks; it never fails, the outcome is in the [`Reply`].
pub async fn post(
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Reply {
    request(hyper::Method::POST, url, headers, body, timeout).await
}

/// A GET with a deadline (e.g. WeCom's URL check); like [`post`], the outcome is the [`Reply`].
pub async fn get(url: &str, timeout: Duration) -> Reply {
    request(hyper::Method::GET, url, &[], Vec::new(), timeout).await
}

/// [`get`] with request headers (e.g. an engine's bearer token).
pub async fn get_with(url: &str, headers: &[(String, String)], timeout: Duration) -> Reply {
    request(hyper::Method::GET, url, headers, Vec::new(), timeout).await
}

async fn request(
    method: hyper::Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Reply {
    let failed = |error: String| Reply {
        status: None,
        body: Vec::new(),
        error: Some(error),
    };
    let mut builder = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let request = match builder.body(Full::new(Bytes::from(body))) {
        Ok(r) => r,
        Err(e) => return failed(format!("bad request: {e}")),
    };
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body.to_vec()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, body))) => Reply {
            status: Some(status),
            body,
            error: None,
        },
        Ok(Err(e)) => failed(e),
        Err(_) => failed(format!("timed out after {timeout:?}")),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded_once() {
        let req = Request {
            method: "GET".into(),
            path: "/".into(),
            query: "a=1&receive_id_type=open_id&e=x%2By+z&bad=%zz&end=%4".into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        assert_eq!(
            req.query_param("receive_id_type").as_deref(),
            Some("open_id")
        );
        assert_eq!(req.query_param("e").as_deref(), Some("x+y z"));
        assert_eq!(req.query_param("bad").as_deref(), Some("%zz"));
        assert_eq!(req.query_param("end").as_deref(), Some("%4"));
        assert_eq!(req.query_param("missing"), None);
    }

    #[tokio::test]
    async fn faults_and_delays_apply_per_path() {
        let handler: Handler = Arc::new(|req: Request| {
            Box::pin(async move { Response::json(200, &serde_json::json!({"path": req.path})) })
        });
        let faults = Arc::new(Mutex::new(Faults::default()));
        let server = Server::start(handler, faults.clone()).await.unwrap();
        faults.lock().unwrap().fail_next(
            "/x",
            1,
            Response::json(503, &serde_json::json!({"code": 1})),
        );
        faults
            .lock()
            .unwrap()
            .set_delay("/slow", Some(Duration::from_millis(300)));
        let url = |p: &str| format!("{}{p}", server.base_url());
        let t = Duration::from_secs(5);
        assert_eq!(post(&url("/x"), &[], vec![], t).await.status, Some(503));
        assert_eq!(post(&url("/x"), &[], vec![], t).await.status, Some(200));
        let slow = post(&url("/slow"), &[], vec![], Duration::from_millis(50)).await;
        assert!(slow.error.unwrap().contains("timed out"));
        // A lost answer: the handler ran, the client timed out; the next request is answered.
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = ran.clone();
        let handler: Handler = Arc::new(move |_req: Request| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Response::json(200, &serde_json::json!({})) })
        });
        let server = Server::start(handler, faults.clone()).await.unwrap();
        faults.lock().unwrap().lose_answers("/lost", 1);
        let url = |p: &str| format!("{}{p}", server.base_url());
        let lost = post(&url("/lost"), &[], vec![], Duration::from_millis(200)).await;
        assert!(lost.error.unwrap().contains("timed out"));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(post(&url("/lost"), &[], vec![], t).await.status, Some(200));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
