//! The JSON form that `imbridge-host invoke` speaks, translated to and from WAVE (the
//! WebAssembly Value Encoding that `wasmtime run --invoke` takes and prints), typed by the
//! export signatures in `wit/world.wit`.
//!
//! Generic over the WIT types rather than one function per record, so a new field or export
//! needs no change here: records are objects with snake_case keys, enums strings, variants
//! `{"case": value}`, options `null` or absent, tuples arrays, `list<u8>` UTF-8 strings. An
//! `err` holding a variant is flattened to `{"kind", "message"}` (plus the payload's fields when
//! it is a record), exactly like the reference host, so the two outputs compare equal.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::path::Path;
use wasm_wave::value::{FuncType, Type, Value as Wave, resolve_wit_func_type};
use wasm_wave::wasm::{WasmFunc, WasmType, WasmTypeKind, WasmValue};
use wit_parser::Resolve;

/// The plugin world's exports, with their WAVE types.
pub struct Exports {
    resolve: Resolve,
    world: wit_parser::WorldId,
}

impl Exports {
    /// Reads `wit/` (the world and its vendored dependencies).
    pub fn load(wit_dir: &Path) -> Result<Exports> {
        let mut resolve = Resolve::default();
        let (pkg, _) = resolve
            .push_dir(wit_dir)
            .with_context(|| format!("parsing {}", wit_dir.display()))?;
        let world = resolve.select_world(&[pkg], Some("plugin"))?;
        Ok(Exports { resolve, world })
    }

    fn func(&self, export: &str) -> Result<FuncType> {
        let f = self.resolve.worlds[self.world]
            .exports
            .values()
            .find_map(|item| match item {
                wit_parser::WorldItem::Function(f) if f.name == export => Some(f),
                _ => None,
            })
            .ok_or_else(|| anyhow!("the world exports no function `{export}`"))?;
        Ok(resolve_wit_func_type(&self.resolve, f)?)
    }

    /// `export(args…)` in WAVE, from the JSON object `invoke` takes (keyed by parameter name).
    pub fn call(&self, export: &str, args: &Value) -> Result<String> {
        let func = self.func(export)?;
        let args_obj = args
            .as_object()
            .context("arguments must be a JSON object")?;
        let mut out = Vec::new();
        for (name, ty) in func.param_names().zip(func.params()) {
            let key = snake(&name);
            let v = args_obj.get(&key).unwrap_or(&Value::Null);
            let wave = to_wave(&ty, v).with_context(|| format!("argument `{key}`"))?;
            out.push(wasm_wave::to_string(&wave)?);
        }
        Ok(format!("{export}({})", out.join(", ")))
    }

    /// The JSON form of what `wasmtime run --invoke` printed for `export`.
    pub fn result(&self, export: &str, printed: &str) -> Result<Value> {
        let func = self.func(export)?;
        let ty = func
            .results()
            .next()
            .with_context(|| format!("`{export}` returns nothing"))?;
        let v: Wave = wasm_wave::from_str(&ty, printed.trim())
            .with_context(|| format!("parsing the printed result {printed:?}"))?;
        from_wave(&ty, &v, true)
    }
}

fn snake(name: &str) -> String {
    name.replace('-', "_")
}

fn to_wave(ty: &Type, v: &Value) -> Result<Wave> {
    Ok(match ty.kind() {
        WasmTypeKind::Bool => Wave::make_bool(match v {
            Value::Null => false,
            v => v.as_bool().context("expected a boolean")?,
        }),
        WasmTypeKind::U16 => Wave::make_u16(u16::try_from(num(v)?)?),
        WasmTypeKind::U64 => Wave::make_u64(num(v)?),
        WasmTypeKind::S64 => Wave::make_s64(v.as_i64().context("expected an integer")?),
        WasmTypeKind::String => Wave::make_string(Cow::Borrowed(str_of(v)?)),
        WasmTypeKind::List => {
            let elem = ty.list_element_type().context("list type")?;
            if elem.kind() == WasmTypeKind::U8 {
                let text = if v.is_null() { "" } else { str_of(v)? };
                let bytes = text.bytes().map(Wave::make_u8);
                return Ok(Wave::make_list(ty, bytes)?);
            }
            let items = match v {
                Value::Null => Vec::new(),
                Value::Array(a) => a.iter().map(|x| to_wave(&elem, x)).collect::<Result<_>>()?,
                _ => bail!("expected an array"),
            };
            Wave::make_list(ty, items)?
        }
        WasmTypeKind::Record => {
            let obj = v.as_object().context("expected an object")?;
            let fields = ty
                .record_fields()
                .map(|(name, fty)| {
                    let key = snake(&name);
                    let x = obj.get(&key).unwrap_or(&Value::Null);
                    let w = to_wave(&fty, x).with_context(|| format!("field `{key}`"))?;
                    Ok((name.into_owned(), w))
                })
                .collect::<Result<Vec<_>>>()?;
            Wave::make_record(ty, fields.iter().map(|(n, w)| (n.as_str(), w.clone())))?
        }
        WasmTypeKind::Tuple => {
            let arr = v.as_array().context("expected an array")?;
            let types: Vec<Type> = ty.tuple_element_types().collect();
            if arr.len() != types.len() {
                bail!("expected {} elements", types.len());
            }
            let items = types
                .iter()
                .zip(arr)
                .map(|(t, x)| to_wave(t, x))
                .collect::<Result<Vec<_>>>()?;
            Wave::make_tuple(ty, items)?
        }
        WasmTypeKind::Enum => Wave::make_enum(ty, str_of(v)?)?,
        WasmTypeKind::Variant => {
            let obj = v.as_object().filter(|o| o.len() == 1);
            let (case, payload) = obj
                .and_then(|o| o.iter().next())
                .context("expected {\"case\": value}")?;
            let (name, pty) = ty
                .variant_cases()
                .find(|(n, _)| snake(n) == *case)
                .with_context(|| format!("no case `{case}`"))?;
            let payload = pty.map(|t| to_wave(&t, payload)).transpose()?;
            Wave::make_variant(ty, &name, payload)?
        }
        WasmTypeKind::Option => {
            let some = ty.option_some_type().context("option type")?;
            let inner = (!v.is_null()).then(|| to_wave(&some, v)).transpose()?;
            Wave::make_option(ty, inner)?
        }
        other => bail!("no JSON form for WIT {other:?} arguments"),
    })
}

fn num(v: &Value) -> Result<u64> {
    v.as_u64().context("expected a non-negative integer")
}

fn str_of(v: &Value) -> Result<&str> {
    v.as_str().context("expected a string")
}

/// `top` marks the export's own result, whose `err` is flattened like the reference host's.
fn from_wave(ty: &Type, v: &Wave, top: bool) -> Result<Value> {
    Ok(match v.kind() {
        WasmTypeKind::Bool => json!(v.unwrap_bool()),
        WasmTypeKind::U8 => json!(v.unwrap_u8()),
        WasmTypeKind::U16 => json!(v.unwrap_u16()),
        WasmTypeKind::U32 => json!(v.unwrap_u32()),
        WasmTypeKind::U64 => json!(v.unwrap_u64()),
        WasmTypeKind::S64 => json!(v.unwrap_s64()),
        WasmTypeKind::String => json!(v.unwrap_string()),
        WasmTypeKind::Enum => json!(v.unwrap_enum()),
        WasmTypeKind::List => {
            let elem = ty.list_element_type().context("list type")?;
            if elem.kind() == WasmTypeKind::U8 {
                let bytes: Vec<u8> = v.unwrap_list().map(|b| b.unwrap_u8()).collect();
                let text = String::from_utf8(bytes).context("a byte list that is not UTF-8")?;
                return Ok(json!(text));
            }
            let items = v.unwrap_list().map(|x| from_wave(&elem, &x, false));
            Value::Array(items.collect::<Result<_>>()?)
        }
        WasmTypeKind::Record => {
            let mut m = Map::new();
            for ((name, fty), (_, x)) in ty.record_fields().zip(v.unwrap_record()) {
                m.insert(snake(&name), from_wave(&fty, &x, false)?);
            }
            Value::Object(m)
        }
        WasmTypeKind::Tuple => {
            let items = ty
                .tuple_element_types()
                .zip(v.unwrap_tuple())
                .map(|(t, x)| from_wave(&t, &x, false));
            Value::Array(items.collect::<Result<_>>()?)
        }
        WasmTypeKind::Variant => {
            let (case, payload) = variant_json(ty, v)?;
            json!({ snake(&case): payload.unwrap_or(Value::Null) })
        }
        WasmTypeKind::Option => match v.unwrap_option() {
            Some(x) => from_wave(&ty.option_some_type().context("option type")?, &x, false)?,
            None => Value::Null,
        },
        WasmTypeKind::Result => {
            let (ok_ty, err_ty) = ty.result_types().context("result type")?;
            match v.unwrap_result() {
                Ok(x) => json!({"ok": payload_json(ok_ty, x)?}),
                Err(Some(e)) if top && e.kind() == WasmTypeKind::Variant => {
                    let (kind, payload) = variant_json(&err_ty.context("error type")?, &e)?;
                    let mut m = Map::new();
                    m.insert("kind".into(), json!(kind));
                    match payload {
                        Some(Value::Object(fields)) => m.extend(fields),
                        Some(msg) => {
                            m.insert("message".into(), msg);
                        }
                        None => {}
                    }
                    json!({ "err": m })
                }
                Err(e) => json!({"err": payload_json(err_ty, e)?}),
            }
        }
        other => bail!("no JSON form for WIT {other:?} results"),
    })
}

fn variant_json(ty: &Type, v: &Wave) -> Result<(String, Option<Value>)> {
    let (case, payload) = v.unwrap_variant();
    let pty = ty
        .variant_cases()
        .find(|(n, _)| *n == case)
        .and_then(|(_, t)| t);
    let payload = match (pty, payload) {
        (Some(t), Some(p)) => Some(from_wave(&t, &p, false)?),
        _ => None,
    };
    Ok((case.into_owned(), payload))
}

fn payload_json(ty: Option<Type>, v: Option<Cow<'_, Wave>>) -> Result<Value> {
    match (ty, v) {
        (Some(t), Some(x)) => from_wave(&t, &x, false),
        _ => Ok(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Exports {
        Exports::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")).unwrap()
    }

    #[test]
    fn calls_are_wave_typed_by_the_world() {
        let args = json!({
            "app": {"id": "a", "platform": "feishu", "app_id": "cli", "app_secret": "s",
                    "token": "t"},
            "request": {"method": "POST", "path": "/cb", "query": "",
                        "headers": [["X-A", "\"q\""]], "body": "hi"},
        });
        let call = exports().call("handle-callback", &args).unwrap();
        assert_eq!(
            call,
            r#"handle-callback({id: "a", platform: feishu, app-id: "cli", app-secret: "s", token: some("t")}, {method: "POST", path: "/cb", query: "", headers: [("X-A", "\"q\"")], body: [104, 105]})"#
        );
        // What wasmtime does with it: parse untyped, then type against the export.
        let untyped = wasm_wave::untyped::UntypedFuncCall::parse(&call).unwrap();
        let func = exports().func("handle-callback").unwrap();
        let types: Vec<Type> = func.params().collect();
        untyped.to_wasm_params::<Wave>(&types).unwrap();

        let bad = json!({"app": {"id": "a", "platform": "msn"}, "request": {}});
        let e = exports().call("handle-callback", &bad).unwrap_err();
        assert!(format!("{e:#}").contains("`app`"), "{e:#}");
    }

    #[test]
    fn results_read_back_in_the_reference_hosts_json_form() {
        let ex = exports();
        let printed = r#"ok({response: {status: 200, headers: [("content-type", "application/json")], body: [123, 125]}, updates: []})"#;
        assert_eq!(
            ex.result("handle-callback", printed).unwrap(),
            json!({"ok": {"response": {"status": 200,
                "headers": [["content-type", "application/json"]], "body": "{}"}, "updates": []}})
        );
        let printed =
            r#"err(platform({code: 19021, message: "sign match fail", retryable: false}))"#;
        assert_eq!(
            ex.result("notify", printed).unwrap(),
            json!({"err": {"kind": "platform", "code": 19021, "message": "sign match fail",
                           "retryable": false}})
        );
        let printed = r#"err(unauthorized("verification token mismatch"))"#;
        assert_eq!(
            ex.result("notify", printed).unwrap(),
            json!({"err": {"kind": "unauthorized", "message": "verification token mismatch"}})
        );
        assert_eq!(
            ex.result("notify", "ok({message-id: none})").unwrap(),
            json!({"ok": {"message_id": null}})
        );
        assert!(ex.result("notify", "ok({message-id: 7})").is_err());
    }
}
