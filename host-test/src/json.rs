//! The JSON form of the WIT types, as engines and the CLI speak it.
//!
//! Records are objects with snake_case keys, enums lowercase (kebab-case) strings, variants
//! `{"case": value}`, options `null` or absent, tuples arrays, and byte lists (`body`) UTF-8
//! strings. Lists and booleans may be left out and default to empty / false.
//!
//! Written by hand rather than derived so that errors name the offending field but never echo
//! its value: the `app` object carries secrets, and a secret pasted into the wrong field must
//! not end up in a log or an HTTP response.

use crate::bindings::types::*;
use crate::call::{Call, Export, Reply};
use anyhow::{Result, anyhow, bail};
use serde_json::{Map, Value, json};

/// Conversion between a WIT type and its JSON form.
pub trait Json: Sized {
    fn to_json(&self) -> Value;
    /// `path` names the value in error messages, e.g. `request.nodes[1]`.
    fn from_json(value: &Value, path: &str) -> Result<Self>;
}

/// Parses the input of one export: an object keyed by parameter name (snake_case).
pub fn parse_call(export: Export, input: &Value) -> Result<Call> {
    let params: &[&str] = match export {
        Export::StartApproval | Export::HandleCallback => &["app", "request"],
        Export::GetApproval => &["app", "instance_id", "refresh"],
        Export::CancelApproval => &["app", "instance_id", "reason"],
        Export::Notify => &["app", "notification"],
        Export::HandleEvent => &["app", "event"],
    };
    let args = Obj::new(input, "input", params)?;
    Ok(match export {
        Export::StartApproval => Call::StartApproval {
            app: args.req("app")?,
            request: args.req("request")?,
        },
        Export::GetApproval => Call::GetApproval {
            app: args.req("app")?,
            instance_id: args.req("instance_id")?,
            refresh: args.opt("refresh")?.unwrap_or(false),
        },
        Export::CancelApproval => Call::CancelApproval {
            app: args.req("app")?,
            instance_id: args.req("instance_id")?,
            reason: args.opt("reason")?,
        },
        Export::Notify => Call::Notify {
            app: args.opt("app")?,
            notification: args.req("notification")?,
        },
        Export::HandleCallback => Call::HandleCallback {
            app: args.req("app")?,
            request: args.req("request")?,
        },
        Export::HandleEvent => Call::HandleEvent {
            app: args.req("app")?,
            event: event_from_json(&args)?,
        },
    })
}

/// The inverse of [`parse_call`].
pub fn call_to_json(call: &Call) -> Value {
    match call {
        Call::StartApproval { app, request } => {
            json!({"app": app.to_json(), "request": request.to_json()})
        }
        Call::GetApproval {
            app,
            instance_id,
            refresh,
        } => json!({"app": app.to_json(), "instance_id": instance_id, "refresh": refresh}),
        Call::CancelApproval {
            app,
            instance_id,
            reason,
        } => json!({"app": app.to_json(), "instance_id": instance_id, "reason": reason}),
        Call::Notify { app, notification } => {
            json!({"app": app.to_json(), "notification": notification.to_json()})
        }
        Call::HandleCallback { app, request } => {
            json!({"app": app.to_json(), "request": request.to_json()})
        }
        Call::HandleEvent { app, event } => {
            // The event as the JSON value it holds, so the round trip gives back what came in.
            let event =
                serde_json::from_slice::<Value>(event).unwrap_or_else(|_| bytes_to_json(event));
            json!({"app": app.to_json(), "event": event})
        }
    }
}

/// `handle-event`'s `event`: the event JSON itself (an object, passed on as its compact
/// serialisation) or a string holding it (passed on byte for byte).
fn event_from_json(args: &Obj<'_>) -> Result<Vec<u8>> {
    match args.get("event") {
        None => bail!("missing `event`"),
        Some(Value::String(s)) => Ok(s.clone().into_bytes()),
        Some(v) => Ok(v.to_string().into_bytes()),
    }
}

/// `{"ok": value}` or `{"err": {...}}`.
pub fn reply_to_json(reply: &Reply) -> Value {
    match reply {
        Reply::Approval(r) => result_to_json(r),
        Reply::Receipt(r) => result_to_json(r),
        Reply::Callback(r) => result_to_json(r),
        Reply::Event(r) => result_to_json(r),
    }
}

pub fn result_to_json<T: Json>(result: &Result<T, Error>) -> Value {
    match result {
        Ok(v) => json!({"ok": v.to_json()}),
        Err(e) => json!({"err": e.to_json()}),
    }
}

pub fn result_from_json<T: Json>(value: &Value) -> Result<Result<T, Error>> {
    let obj = Obj::new(value, "result", &["ok", "err"])?;
    match (obj.get("ok"), obj.get("err")) {
        (Some(ok), None) => Ok(Ok(T::from_json(ok, "ok")?)),
        (None, Some(err)) => Ok(Err(Error::from_json(err, "err")?)),
        _ => bail!("`result` must have exactly one of `ok` and `err`"),
    }
}

/// Refuses an object with keys other than `fields`, for bodies read field by field outside
/// the record mapping (the engine API's cancel and notify).
pub fn only_fields(value: &Value, path: &str, fields: &[&str]) -> Result<()> {
    Obj::new(value, path, fields).map(drop)
}

/// A JSON object being read, with its path for error messages.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Obj<'a> {
    /// `fields` are all the object may have: a misspelt optional field (`mentionAll`,
    /// `detailUrl`) would otherwise be dropped without a word and change what is sent.
    fn new(value: &'a Value, path: &'a str, fields: &[&str]) -> Result<Obj<'a>> {
        let Value::Object(map) = value else {
            bail!("`{path}` must be an object")
        };
        let o = Obj { map, path };
        if let Some(k) = map.keys().find(|k| !fields.contains(&k.as_str())) {
            bail!(
                "`{}` is not a field here; expected: {}",
                o.field_path(k),
                fields.join(", ")
            );
        }
        Ok(o)
    }

    /// The field, treating `null` as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() || self.path == "input" {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn req<T: Json>(&self, key: &str) -> Result<T> {
        let path = self.field_path(key);
        match self.get(key) {
            Some(v) => T::from_json(v, &path),
            None => bail!("missing `{path}`"),
        }
    }

    fn opt<T: Json>(&self, key: &str) -> Result<Option<T>> {
        self.get(key)
            .map(|v| T::from_json(v, &self.field_path(key)))
            .transpose()
    }

    /// A list that may be left out (meaning empty).
    fn list<T: Json>(&self, key: &str) -> Result<Vec<T>> {
        Ok(self.opt(key)?.unwrap_or_default())
    }
}

impl Json for String {
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        match value {
            Value::String(s) => Ok(s.clone()),
            _ => bail!("`{path}` must be a string"),
        }
    }
}

impl Json for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        value
            .as_bool()
            .ok_or_else(|| anyhow!("`{path}` must be true or false"))
    }
}

impl Json for u64 {
    fn to_json(&self) -> Value {
        json!(self)
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        value
            .as_u64()
            .ok_or_else(|| anyhow!("`{path}` must be an unsigned integer"))
    }
}

impl Json for i64 {
    fn to_json(&self) -> Value {
        json!(self)
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        value
            .as_i64()
            .ok_or_else(|| anyhow!("`{path}` must be an integer"))
    }
}

/// Unsigned integers narrower than u64, range-checked.
macro_rules! json_narrow_uint {
    ($($t:ty),*) => {$(
        impl Json for $t {
            fn to_json(&self) -> Value {
                json!(self)
            }
            fn from_json(value: &Value, path: &str) -> Result<Self> {
                value
                    .as_u64()
                    .and_then(|n| <$t>::try_from(n).ok())
                    .ok_or_else(|| anyhow!("`{path}` must be an integer from 0 to {}", <$t>::MAX))
            }
        }
    )*};
}
json_narrow_uint!(u16, u32);

impl<T: Json> Json for Option<T> {
    fn to_json(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_json)
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        match value {
            Value::Null => Ok(None),
            v => T::from_json(v, path).map(Some),
        }
    }
}

impl<T: Json> Json for Vec<T> {
    fn to_json(&self) -> Value {
        Value::Array(self.iter().map(T::to_json).collect())
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let Value::Array(items) = value else {
            bail!("`{path}` must be an array");
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| T::from_json(v, &format!("{path}[{i}]")))
            .collect()
    }
}

/// `list<tuple<string, string>>` (headers, form fields): `[[k, v], ...]`. An object
/// `{k: v, ...}` is accepted too, as the natural way to write fields by hand.
impl Json for (String, String) {
    fn to_json(&self) -> Value {
        json!([self.0, self.1])
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        match value.as_array().map(Vec::as_slice) {
            Some([k, v]) => Ok((
                String::from_json(k, &format!("{path}[0]"))?,
                String::from_json(v, &format!("{path}[1]"))?,
            )),
            _ => bail!("`{path}` must be a [name, value] pair"),
        }
    }
}

fn pairs_from_json(obj: &Obj<'_>, key: &str) -> Result<Vec<(String, String)>> {
    match obj.get(key) {
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let path = format!("{}.{k}", obj.field_path(key));
                Ok((k.clone(), String::from_json(v, &path)?))
            })
            .collect(),
        _ => obj.list(key),
    }
}

/// Byte lists travel as UTF-8 strings; bytes that are not UTF-8 are replaced on output.
fn bytes_to_json(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

fn bytes_from_json(obj: &Obj<'_>, key: &str) -> Result<Vec<u8>> {
    Ok(obj.opt::<String>(key)?.unwrap_or_default().into_bytes())
}

/// Implements [`Json`] for a WIT enum as lowercase strings.
macro_rules! json_enum {
    ($ty:ident { $($variant:ident = $name:literal),* $(,)? }) => {
        impl Json for $ty {
            fn to_json(&self) -> Value {
                Value::String(match self { $($ty::$variant => $name),* }.to_string())
            }
            fn from_json(value: &Value, path: &str) -> Result<Self> {
                match value.as_str() {
                    $(Some($name) => Ok($ty::$variant),)*
                    _ => bail!(concat!("`{}` must be one of: ", $($name, " "),*), path),
                }
            }
        }
    };
}

json_enum!(Platform { Feishu = "feishu", Lark = "lark", Dingtalk = "dingtalk", Wecom = "wecom" });
json_enum!(SignMode { And = "and", Or = "or" });
json_enum!(ApprovalStatus {
    Pending = "pending",
    Approved = "approved",
    Rejected = "rejected",
    Canceled = "canceled",
});
json_enum!(Level { Info = "info", Success = "success", Warning = "warning", Failure = "failure" });

/// Reads a variant: an object with exactly one key, the case name.
fn variant<'a>(value: &'a Value, path: &str) -> Result<(&'a str, &'a Value)> {
    match value {
        Value::Object(map) if map.len() == 1 => {
            let (k, v) = map.iter().next().expect("one entry");
            Ok((k.as_str(), v))
        }
        _ => bail!("`{path}` must be an object with exactly one key (the case)"),
    }
}

impl Json for ImApp {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "platform": self.platform.to_json(),
            "app_id": self.app_id,
            "app_secret": self.app_secret,
            "agent_id": self.agent_id,
            "encrypt_key": self.encrypt_key,
            "token": self.token,
            "api_base": self.api_base,
            "max_clock_skew_secs": self.max_clock_skew_secs,
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(
            value,
            path,
            &[
                "id",
                "platform",
                "app_id",
                "app_secret",
                "agent_id",
                "encrypt_key",
                "token",
                "api_base",
                "max_clock_skew_secs",
            ],
        )?;
        Ok(ImApp {
            id: o.req("id")?,
            platform: o.req("platform")?,
            app_id: o.req("app_id")?,
            app_secret: o.req("app_secret")?,
            agent_id: o.opt("agent_id")?,
            encrypt_key: o.opt("encrypt_key")?,
            token: o.opt("token")?,
            api_base: o.opt("api_base")?,
            max_clock_skew_secs: o.opt("max_clock_skew_secs")?,
        })
    }
}

impl Json for UserRef {
    fn to_json(&self) -> Value {
        match self {
            UserRef::Id(s) => json!({"id": s}),
            UserRef::Email(s) => json!({"email": s}),
            UserRef::Mobile(s) => json!({"mobile": s}),
        }
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let (case, v) = variant(value, path)?;
        let inner = format!("{path}.{case}");
        Ok(match case {
            "id" => UserRef::Id(String::from_json(v, &inner)?),
            "email" => UserRef::Email(String::from_json(v, &inner)?),
            "mobile" => UserRef::Mobile(String::from_json(v, &inner)?),
            _ => bail!("`{path}` must be {{\"id\"|\"email\"|\"mobile\": string}}"),
        })
    }
}

impl Json for ApprovalNode {
    fn to_json(&self) -> Value {
        json!({"approvers": self.approvers.to_json(), "mode": self.mode.to_json()})
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["approvers", "mode"])?;
        Ok(ApprovalNode {
            approvers: o.list("approvers")?,
            mode: o.req("mode")?,
        })
    }
}

impl Json for ApprovalRequest {
    fn to_json(&self) -> Value {
        json!({
            "key": self.key,
            "title": self.title,
            "initiator": self.initiator.to_json(),
            "nodes": self.nodes.to_json(),
            "cc": self.cc.to_json(),
            "fields": self.fields.to_json(),
            "detail_url": self.detail_url,
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(
            value,
            path,
            &[
                "key",
                "title",
                "initiator",
                "nodes",
                "cc",
                "fields",
                "detail_url",
            ],
        )?;
        Ok(ApprovalRequest {
            key: o.req("key")?,
            title: o.req("title")?,
            initiator: o.req("initiator")?,
            nodes: o.list("nodes")?,
            cc: o.list("cc")?,
            fields: pairs_from_json(&o, "fields")?,
            detail_url: o.opt("detail_url")?,
        })
    }
}

impl Json for Decision {
    fn to_json(&self) -> Value {
        json!({
            "user": self.user,
            "approved": self.approved,
            "comment": self.comment,
            "at_ms": self.at_ms,
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["user", "approved", "comment", "at_ms"])?;
        Ok(Decision {
            user: o.req("user")?,
            approved: o.req("approved")?,
            comment: o.opt("comment")?,
            at_ms: o.req("at_ms")?,
        })
    }
}

impl Json for Approval {
    fn to_json(&self) -> Value {
        json!({
            "instance_id": self.instance_id,
            "key": self.key,
            "status": self.status.to_json(),
            "decisions": self.decisions.to_json(),
            "updated_at_ms": self.updated_at_ms,
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(
            value,
            path,
            &["instance_id", "key", "status", "decisions", "updated_at_ms"],
        )?;
        Ok(Approval {
            instance_id: o.req("instance_id")?,
            key: o.req("key")?,
            status: o.req("status")?,
            decisions: o.list("decisions")?,
            updated_at_ms: o.req("updated_at_ms")?,
        })
    }
}

impl Json for RobotWebhook {
    fn to_json(&self) -> Value {
        json!({"platform": self.platform.to_json(), "url": self.url, "secret": self.secret})
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["platform", "url", "secret"])?;
        Ok(RobotWebhook {
            platform: o.req("platform")?,
            url: o.req("url")?,
            secret: o.opt("secret")?,
        })
    }
}

impl Json for Target {
    fn to_json(&self) -> Value {
        match self {
            Target::Webhook(w) => json!({"webhook": w.to_json()}),
            Target::Chat(c) => json!({"chat": c}),
            Target::Users(u) => json!({"users": u.to_json()}),
        }
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let (case, v) = variant(value, path)?;
        let inner = format!("{path}.{case}");
        Ok(match case {
            "webhook" => Target::Webhook(RobotWebhook::from_json(v, &inner)?),
            "chat" => Target::Chat(String::from_json(v, &inner)?),
            "users" => Target::Users(Vec::from_json(v, &inner)?),
            _ => bail!("`{path}` must be {{\"webhook\"|\"chat\"|\"users\": ...}}"),
        })
    }
}

impl Json for Link {
    fn to_json(&self) -> Value {
        json!({"text": self.text, "url": self.url})
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["text", "url"])?;
        Ok(Link {
            text: o.req("text")?,
            url: o.req("url")?,
        })
    }
}

impl Json for Notification {
    fn to_json(&self) -> Value {
        json!({
            "target": self.target.to_json(),
            "title": self.title,
            "markdown": self.markdown,
            "level": self.level.to_json(),
            "link": self.link.to_json(),
            "mentions": self.mentions.to_json(),
            "mention_all": self.mention_all,
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(
            value,
            path,
            &[
                "target",
                "title",
                "markdown",
                "level",
                "link",
                "mentions",
                "mention_all",
            ],
        )?;
        Ok(Notification {
            target: o.req("target")?,
            title: o.req("title")?,
            markdown: o.opt("markdown")?.unwrap_or_default(),
            level: o.opt("level")?.unwrap_or(Level::Info),
            link: o.opt("link")?,
            mentions: o.list("mentions")?,
            mention_all: o.opt("mention_all")?.unwrap_or(false),
        })
    }
}

impl Json for Receipt {
    fn to_json(&self) -> Value {
        json!({"message_id": self.message_id})
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["message_id"])?;
        Ok(Receipt {
            message_id: o.opt("message_id")?,
        })
    }
}

impl Json for HttpRequest {
    fn to_json(&self) -> Value {
        json!({
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers.to_json(),
            "body": bytes_to_json(&self.body),
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["method", "path", "query", "headers", "body"])?;
        Ok(HttpRequest {
            method: o.opt("method")?.unwrap_or_else(|| "POST".to_string()),
            path: o.opt("path")?.unwrap_or_else(|| "/".to_string()),
            query: o.opt("query")?.unwrap_or_default(),
            headers: pairs_from_json(&o, "headers")?,
            body: bytes_from_json(&o, "body")?,
        })
    }
}

impl Json for HttpResponse {
    fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "headers": self.headers.to_json(),
            "body": bytes_to_json(&self.body),
        })
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["status", "headers", "body"])?;
        Ok(HttpResponse {
            status: o.req("status")?,
            headers: pairs_from_json(&o, "headers")?,
            body: bytes_from_json(&o, "body")?,
        })
    }
}

impl Json for CallbackOutcome {
    fn to_json(&self) -> Value {
        json!({"response": self.response.to_json(), "updates": self.updates.to_json()})
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["response", "updates"])?;
        Ok(CallbackOutcome {
            response: o.req("response")?,
            updates: o.list("updates")?,
        })
    }
}

impl Error {
    /// The kebab-case case name, as used in `{"err": {"kind": ...}}`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "invalid-config",
            Error::InvalidInput(_) => "invalid-input",
            Error::Unauthorized(_) => "unauthorized",
            Error::Platform(_) => "platform",
            Error::Transport(_) => "transport",
            Error::Storage(_) => "storage",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::InvalidConfig(m)
            | Error::InvalidInput(m)
            | Error::Unauthorized(m)
            | Error::Transport(m)
            | Error::Storage(m) => m,
            Error::Platform(p) => &p.message,
        }
    }
}

/// Errors are flattened, `{"kind", "message"}` plus `code` and `retryable` for `platform`,
/// since that is what an engine switches on.
impl Json for Error {
    fn to_json(&self) -> Value {
        match self {
            Error::Platform(p) => json!({
                "kind": "platform",
                "message": p.message,
                "code": p.code,
                "retryable": p.retryable,
            }),
            e => json!({"kind": e.kind(), "message": e.message()}),
        }
    }
    fn from_json(value: &Value, path: &str) -> Result<Self> {
        let o = Obj::new(value, path, &["kind", "message", "code", "retryable"])?;
        let kind: String = o.req("kind")?;
        let message: String = o.opt("message")?.unwrap_or_default();
        Ok(match kind.as_str() {
            "invalid-config" => Error::InvalidConfig(message),
            "invalid-input" => Error::InvalidInput(message),
            "unauthorized" => Error::Unauthorized(message),
            "transport" => Error::Transport(message),
            "storage" => Error::Storage(message),
            "platform" => Error::Platform(PlatformError {
                code: o.req("code")?,
                message,
                retryable: o.opt("retryable")?.unwrap_or(false),
            }),
            _ => bail!(
                "`{path}.kind` must be one of: invalid-config invalid-input unauthorized \
                 platform transport storage"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Value {
        json!({"id": "a1", "platform": "feishu", "app_id": "cli_x", "app_secret": "s3cr3t",
               "token": "tok", "api_base": null})
    }

    fn roundtrip<T: Json>(v: Value) {
        let parsed = T::from_json(&v, "x").unwrap();
        let back = parsed.to_json();
        assert_eq!(strip_nulls(back), strip_nulls(v));
    }

    fn strip_nulls(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k, strip_nulls(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
            v => v,
        }
    }

    #[test]
    fn inputs_roundtrip() {
        roundtrip::<ImApp>(app());
        let mut windowed = app();
        windowed["max_clock_skew_secs"] = json!(30);
        roundtrip::<ImApp>(windowed.clone());
        windowed["max_clock_skew_secs"] = json!(-1);
        assert!(ImApp::from_json(&windowed, "app").is_err());
        windowed["max_clock_skew_secs"] = json!(u64::from(u32::MAX) + 1);
        assert!(ImApp::from_json(&windowed, "app").is_err());
        roundtrip::<ApprovalRequest>(json!({
            "key": "wf-42/run-7/deploy", "title": "Deploy", "initiator": {"id": "ou_1"},
            "nodes": [{"approvers": [{"email": "a@x.com"}, {"mobile": "+86 1"}], "mode": "and"},
                      {"approvers": [{"id": "ou_2"}], "mode": "or"}],
            "cc": [{"id": "ou_3"}], "fields": [["env", "prod"], ["ver", "1.2"]],
            "detail_url": "https://ci/1"}));
        roundtrip::<Notification>(json!({
            "target": {"webhook": {"platform": "lark", "url": "https://h/x", "secret": "k"}},
            "title": "t", "markdown": "**m**", "level": "failure",
            "link": {"text": "open", "url": "https://ci"}, "mentions": [{"id": "u"}],
            "mention_all": true}));
        roundtrip::<Notification>(json!({
            "target": {"users": [{"id": "u1"}]}, "title": "t", "markdown": "",
            "level": "success", "mentions": [], "mention_all": false}));
        roundtrip::<HttpRequest>(json!({
            "method": "POST", "path": "/callback/t/a1", "query": "a=1&b=2",
            "headers": [["content-type", "application/json"]], "body": "{\"x\":1}"}));
    }

    #[test]
    fn outputs_roundtrip() {
        roundtrip::<CallbackOutcome>(json!({
            "response": {"status": 200, "headers": [["content-type", "application/json"]],
                         "body": "{\"challenge\":\"c1\"}"},
            "updates": [{"instance_id": "i1", "key": "k", "status": "approved",
                         "decisions": [{"user": "u", "approved": true, "comment": "ok",
                                        "at_ms": 1700000000000u64}],
                         "updated_at_ms": 1700000000001u64}]}));
        roundtrip::<Receipt>(json!({"message_id": "om_1"}));
        roundtrip::<Error>(
            json!({"kind": "platform", "message": "rate limited", "code": 99991400,
                                  "retryable": true}),
        );
        roundtrip::<Error>(json!({"kind": "unauthorized", "message": "bad signature"}));
        let r: Result<Receipt, Error> =
            result_from_json(&json!({"err": {"kind": "transport", "message": "timeout"}})).unwrap();
        assert_eq!(
            result_to_json(&r),
            json!({"err": {"kind": "transport", "message": "timeout"}})
        );
    }

    #[test]
    fn calls_roundtrip() {
        for (export, input) in [
            (
                Export::GetApproval,
                json!({"app": app(), "instance_id": "i", "refresh": true}),
            ),
            (
                Export::CancelApproval,
                json!({"app": app(), "instance_id": "i", "reason": "r"}),
            ),
            (
                Export::Notify,
                json!({"app": null, "notification": {"target": {"chat": "oc_1"},
                "title": "t", "markdown": "m", "level": "info", "mentions": [],
                "mention_all": false, "link": null}}),
            ),
            (
                Export::HandleCallback,
                json!({"app": app(), "request": {"method": "GET",
                "path": "/", "query": "", "headers": [], "body": ""}}),
            ),
            (
                Export::HandleEvent,
                json!({"app": app(), "event": {"uuid": "u1", "event": {"type": "x"}}}),
            ),
        ] {
            let call = parse_call(export, &input).unwrap();
            assert_eq!(strip_nulls(call_to_json(&call)), strip_nulls(input));
        }
    }

    #[test]
    fn lenient_defaults() {
        let n =
            Notification::from_json(&json!({"target": {"chat": "c"}, "title": "t"}), "n").unwrap();
        assert_eq!(n.markdown, "");
        assert!(matches!(n.level, Level::Info));
        assert!(n.mentions.is_empty() && !n.mention_all && n.link.is_none());
        let r = HttpRequest::from_json(&json!({"headers": {"X-A": "1"}}), "r").unwrap();
        assert_eq!(r.headers, [("X-A".to_string(), "1".to_string())]);
        assert_eq!(r.method, "POST");
    }

    #[test]
    fn errors_name_the_field_but_never_echo_values() {
        let cases = [
            json!({"id": "a", "platform": "s3cr3t", "app_id": "x", "app_secret": "s3cr3t"}),
            json!({"id": "a", "platform": "feishu", "app_id": "x", "app_secret": ["s3cr3t"]}),
            json!({"id": "a", "platform": "feishu", "app_id": "x", "app_secret": "s",
                   "token": {"s3cr3t": 1}}),
            json!({"id": "a", "platform": "feishu", "app_id": "s3cr3t"}),
        ];
        for case in cases {
            let err = ImApp::from_json(&case, "app").unwrap_err().to_string();
            assert!(!err.contains("s3cr3t"), "{err}");
            assert!(err.contains("`app."), "{err}");
        }
        let err = parse_call(
            Export::StartApproval,
            &json!({"app": app(), "request": {
            "key": "k", "title": "t", "initiator": {"id": "u"},
            "nodes": [{"approvers": [{"name": "x"}], "mode": "and"}]}}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("request.nodes[0].approvers[0]"), "{err}");
        assert!(parse_call(Export::Notify, &json!([1])).is_err());
        assert!(parse_call(Export::GetApproval, &json!({"app": app()})).is_err());
        assert!(parse_call(Export::HandleEvent, &json!({"app": app()})).is_err());
    }

    #[test]
    fn misspelt_fields_are_refused_not_dropped() {
        let notify = |notification: Value| {
            parse_call(
                Export::Notify,
                &json!({"app": app(), "notification": notification}),
            )
            .map_err(|e| e.to_string())
        };
        let ok = json!({"target": {"chat": "oc"}, "title": "t", "mention_all": true});
        assert!(notify(ok).is_ok());
        for (bad, field) in [
            (
                json!({"target": {"chat": "oc"}, "title": "t", "mentionAll": true}),
                "notification.mentionAll",
            ),
            (
                json!({"target": {"chat": "oc"}, "title": "t", "body": "**x**"}),
                "notification.body",
            ),
            (
                json!({"target": {"chat": "oc"}, "title": "t", "link": {"text": "a", "href": "u"}}),
                "notification.link.href",
            ),
        ] {
            let err = notify(bad).unwrap_err();
            assert!(err.contains(&format!("`{field}` is not a field")), "{err}");
            assert!(err.contains("expected:"), "{err}");
        }
        let err = parse_call(
            Export::GetApproval,
            &json!({"app": app(), "instance_id": "i", "refrsh": true}),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`refrsh`"), "{err}");
    }

    #[test]
    fn event_as_string_is_passed_byte_for_byte() {
        let raw = "{ \"uuid\" : \"u1\" }";
        let call = parse_call(Export::HandleEvent, &json!({"app": app(), "event": raw})).unwrap();
        let Call::HandleEvent { event, .. } = call else {
            panic!("wrong call")
        };
        assert_eq!(event, raw.as_bytes());
    }
}
