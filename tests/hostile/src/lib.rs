//! A plugin that misbehaves on purpose, through the same imports the real one gets:
//!
//! - `notify`: streams 100 MB (generated chunk by chunk, so its own memory stays small) to the
//!   webhook URL it is given;
//! - `start-approval`: builds a request with 1 MiB of headers for the app's `api-base`;
//! - `get-approval`: requests the "instance id" as a URL (e.g. the cloud metadata service);
//! - `cancel-approval`: reads and overwrites the key named by the "instance id", and tries to
//!   open other buckets (another tenant's keys, if the host let it);
//! - `handle-event`: with an event `N URL`, opens N GET requests to URL at once, then waits
//!   for them all;
//! - the callbacks answer `invalid-input`.
//!
//! Every export reports what the host let it do as the message of an error, for the test to
//! check.

#![cfg(target_arch = "wasm32")]

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        generate_all,
    });
}

use bindings::imbridge::plugin::types as w;
use bindings::wasi::http::outgoing_handler;
use bindings::wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use bindings::wasi::keyvalue::store;

struct Hostile;

bindings::export!(Hostile with_types_in bindings);

const HUGE_BODY: u64 = 100 * 1024 * 1024;
/// `blocking-write-and-flush` takes at most 4096 bytes per call.
const CHUNK: usize = 4096;

fn report(what: String) -> w::Error {
    w::Error::Transport(what)
}

/// POSTs `body_len` zero bytes and `headers` 1 KiB headers to `url`; returns what happened.
fn send(url: &str, body_len: u64, headers: usize) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(("https", r)) => (Scheme::Https, r),
        Some((_, r)) => (Scheme::Http, r),
        None => return format!("not a URL: {url}"),
    };
    let cut = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    let fields = Fields::new();
    let value = vec![b'a'; 1024];
    for i in 0..headers {
        if let Err(e) = fields.append(&format!("x-hostile-{i}"), &value) {
            return format!("header {i} refused: {e:?}");
        }
    }
    let req = OutgoingRequest::new(fields);
    let _ = req.set_method(&Method::Post);
    let _ = req.set_scheme(Some(&scheme));
    let _ = req.set_authority(Some(authority));
    let _ = req.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
    let Ok(body) = req.body() else {
        return "no body".into();
    };
    let future = match outgoing_handler::handle(req, None) {
        Ok(f) => f,
        Err(e) => return format!("refused: {e:?}"),
    };
    let mut sent = 0u64;
    let mut write_failed = false;
    {
        let Ok(out) = body.write() else {
            return "no body stream".into();
        };
        let chunk = [0u8; CHUNK];
        while sent < body_len {
            if out.blocking_write_and_flush(&chunk).is_err() {
                write_failed = true;
                break;
            }
            sent += CHUNK as u64;
        }
    }
    if write_failed {
        drop(body);
    } else if let Err(e) = OutgoingBody::finish(body, None) {
        return format!("finish failed after {sent} bytes: {e:?}");
    }
    future.subscribe().block();
    match future.get() {
        Some(Ok(Ok(resp))) => format!("sent {sent} bytes, got HTTP {}", resp.status()),
        Some(Ok(Err(e))) => format!("failed after {sent} bytes: {e:?}"),
        _ => format!("no response after {sent} bytes"),
    }
}

/// Opens `n` GET requests to `http://authority/path` before waiting for any; returns how many
/// got a response and the first other outcome.
fn at_once(n: usize, url: &str) -> String {
    let Some(rest) = url.strip_prefix("http://") else {
        return format!("not an http URL: {url}");
    };
    let cut = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    let mut futures = Vec::new();
    for _ in 0..n {
        let req = OutgoingRequest::new(Fields::new());
        let _ = req.set_scheme(Some(&Scheme::Http));
        let _ = req.set_authority(Some(authority));
        let _ = req.set_path_with_query(Some(if path.is_empty() { "/" } else { path }));
        match outgoing_handler::handle(req, None) {
            Ok(f) => futures.push(f),
            Err(e) => return format!("refused after {}: {e:?}", futures.len()),
        }
    }
    let mut answered = 0;
    let mut other = None;
    for future in futures {
        future.subscribe().block();
        match future.get() {
            Some(Ok(Ok(_))) => answered += 1,
            outcome => {
                other.get_or_insert_with(|| format!("{outcome:?}"));
            }
        }
    }
    format!("answered={answered} other={other:?}")
}

impl bindings::Guest for Hostile {
    fn start_approval(app: w::ImApp, _: w::ApprovalRequest) -> Result<w::Approval, w::Error> {
        let url = app.api_base.unwrap_or_default();
        Err(report(send(&url, 0, 1024)))
    }

    fn get_approval(_: w::ImApp, url: String, _: bool) -> Result<w::Approval, w::Error> {
        Err(report(send(&url, 0, 0)))
    }

    fn cancel_approval(
        _: w::ImApp,
        key: String,
        other_bucket: Option<String>,
    ) -> Result<w::Approval, w::Error> {
        let bucket = match store::open("") {
            Ok(b) => b,
            Err(e) => return Err(report(format!("open: {e:?}"))),
        };
        let seen = bucket.get(&key);
        let wrote = bucket.set(&key, b"hostile was here").is_ok();
        let other = other_bucket.map(|name| store::open(&name).is_ok());
        Err(report(format!(
            "read={:?} wrote={wrote} other_bucket_opened={other:?}",
            seen.map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
        )))
    }

    fn notify(_: Option<w::ImApp>, n: w::Notification) -> Result<w::Receipt, w::Error> {
        let url = match n.target {
            w::Target::Webhook(h) => h.url,
            _ => String::new(),
        };
        Err(report(send(&url, HUGE_BODY, 0)))
    }

    /// Writes, then fails: the host must not keep the write (callbacks are redelivered).
    fn handle_callback(_: w::ImApp, r: w::HttpRequest) -> Result<w::CallbackOutcome, w::Error> {
        if let Ok(bucket) = store::open("") {
            let _ = bucket.set(&r.path, b"half a callback");
        }
        Err(w::Error::InvalidInput("x".into()))
    }

    fn handle_event(_: w::ImApp, event: Vec<u8>) -> Result<Vec<w::Approval>, w::Error> {
        let event = String::from_utf8_lossy(&event).into_owned();
        let Some((n, url)) = event.split_once(' ') else {
            return Err(w::Error::InvalidInput("x".into()));
        };
        Err(report(at_once(n.parse().unwrap_or(0), url)))
    }
}
