//! A synthetic plugin for host tests: a core module with the plugin world's exports, built
//! with wasm-encoder and componentized with wit-component, whose exports misbehave on purpose.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::collections::BTreeMap;
use std::path::Path;
use wasm_encoder::{
    BlockType, CodeSection, ConstExpr, CustomSection, DataSection, EntityType, ExportKind,
    ExportSection, Function, FunctionSection, GlobalSection, GlobalType, ImportSection,
    Instruction as I, MemArg, MemorySection, MemoryType, Module, TypeSection, ValType,
};
use wit_parser::abi::{WasmSignature, WasmType};
use wit_parser::{
    Int, LiftLowerAbi, ManglingAndAbi, Resolve, SizeAlign, Type, TypeDefKind, WasmExport,
    WasmExportKind, WasmImport, WorldItem,
};

/// Waits up to `within` for `f` to hold, looking every millisecond (a test that admits a
/// thousand calls one by one waits here for each); fails the test naming `what` otherwise.
pub async fn until(what: &str, within: std::time::Duration, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Polls `f` once, for the work it does before its first wait; fails the test if it finished
/// there (`why` says why it should not have).
pub async fn poll_once<F: std::future::Future>(f: &mut std::pin::Pin<Box<F>>, why: &str)
where
    F::Output: std::fmt::Debug,
{
    tokio::select! {
        biased;
        r = f => panic!("{why}: {r:?}"),
        _ = std::future::ready(()) => {}
    }
}

/// What an export of the synthetic plugin does.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Returns `err(invalid-input("x"))`.
    Err,
    /// Returns `err(invalid-input(M))`, M naming the export and what it was given: the
    /// export's name, then a line `name=value` per string, bool and `list<u8>` argument (a
    /// record's fields as `param.field`, an absent option as `name=none`). Numbers, enums,
    /// variants and other lists are left out. [`echoed`] reads it back.
    Echo,
    /// Adds 1 to the tenant's counter named after the export (`wasi:keyvalue/atomics`, which
    /// the host makes durable at once, whatever the call does next), then does what the inner
    /// behaviour does. The other behaviours leave no trace in the store; this shows that a
    /// call ran, and how often.
    Counted(&'static Behaviour),
    /// Waits until the tenant's store has the key [`GATE`] (`wasi:keyvalue` `get`, polled),
    /// then does what the inner behaviour does: a call that holds its slot until the test
    /// lets it go, rather than until a deadline. The deadline still ends it.
    Gated(&'static Behaviour),
    Loop,
    Trap,
    /// Grows memory until refused, then traps.
    EatMemory,
    /// Returns `ok(callback-outcome)`: status 200, body "ok", one approved update (`i1`, `k`).
    Callback,
}

impl Behaviour {
    fn uses_kv(&self) -> bool {
        matches!(self, Behaviour::Counted(_) | Behaviour::Gated(_))
    }
}

/// A [`Behaviour::Echo`] message: the export's name, and its arguments by name.
pub fn echoed(message: &str) -> (String, BTreeMap<String, String>) {
    let mut lines = message.split('\n');
    let export = lines.next().unwrap_or_default().to_string();
    let args = lines
        .map(|l| {
            let (k, v) = l.split_once('=').expect("name=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    (export, args)
}

/// A loopback listener that takes connections, holds them and never answers (a webhook or a
/// platform that hangs): its address, and how many connections it took.
pub async fn silent_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            open.push(s);
        }
    });
    (addr, accepted)
}

/// The key a [`Behaviour::Gated`] call waits for.
pub const GATE: &str = "gate";

/// Where the static `err(invalid-input("x"))` return value lives. Every export returns
/// `result<T, error>` with a payload aligned to 8 (error holds an s64), so one layout fits all:
/// tag at 0, error case at 8, its string (ptr, len) at 16.
const RESULT: i32 = 64;
const STRING: i32 = 128;
/// Return areas of the key-value imports `Counted` and `Gated` call: `open`'s
/// result<bucket, error> (the handle at +4), `increment`'s result<u64, error>, and `get`'s
/// result<option<list<u8>>, error> (the option's tag at +4).
const OPENED: i32 = 192;
const INCREMENTED: i32 = 208;
const GOT: i32 = 232;
/// `Echo`'s `err(invalid-input(M))`, laid out as at `RESULT`; M itself is on the heap.
const ECHO_RESULT: i32 = 256;
/// `ok(callback-outcome)`: payload at +8 = http-response {status u16, headers, body}, then
/// updates; the one approval {instance-id, key, status u8, decisions, updated-at-ms u64 @32}.
const OUTCOME: i32 = 512;
const APPROVAL: i32 = 640;
/// The texts the exports copy from (export names, `Echo`'s labels); the heap follows them.
const TEXT: i32 = 1024;

/// The locals of an export's function: its one parameter, the address of its arguments
/// (every export of the world takes more than 16 flat values, so they come in memory), then
/// `Echo`'s write cursor and the start of its message.
const ARGS: u32 = 0;
const CUR: u32 = 1;
const START: u32 = 2;

pub fn plugin(behaviour: impl Fn(&str) -> Behaviour, version: &str) -> Vec<u8> {
    plugin_of_world(&wit_dir(), behaviour, version)
}

/// Traps unless the `result` at `result` is `ok`: a refused key-value call fails the call
/// rather than leaving a count silently short or a gate that never opens.
fn trap_unless_ok(f: &mut Function, result: i32) {
    f.instruction(&I::I32Const(result))
        .instruction(&I::I32Load8U(mem(0, 0)))
        .instruction(&I::If(BlockType::Empty))
        .instruction(&I::Unreachable)
        .instruction(&I::End);
}

/// The plugin world's WIT (`wit/`).
pub fn wit_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")
}

/// A component of `n` instances of a core module that defines one memory, and nothing else.
pub fn component_of_modules(n: u32) -> Vec<u8> {
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut module = Module::new();
    module.section(&memories);
    let mut instances = wasm_encoder::InstanceSection::new();
    for _ in 0..n {
        instances.instantiate(0, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
    }
    let mut component = wasm_encoder::Component::new();
    component
        .section(&wasm_encoder::ModuleSection(&module))
        .section(&instances);
    component.finish()
}

fn val(t: &WasmType) -> ValType {
    match t {
        WasmType::I64 | WasmType::PointerOrI64 => ValType::I64,
        WasmType::F32 => ValType::F32,
        WasmType::F64 => ValType::F64,
        _ => ValType::I32,
    }
}

fn mem(offset: usize, align: u32) -> MemArg {
    MemArg {
        offset: offset as u64,
        align,
        memory_index: 0,
    }
}

/// Generates the exports' code.
struct Gen<'a> {
    resolve: &'a Resolve,
    sizes: SizeAlign,
    /// The static texts, placed at [`TEXT`].
    text: Vec<u8>,
    /// The function indices of `wasi:keyvalue/store.open`, `atomics.increment` and
    /// `store.[method]bucket.get`.
    kv: Option<(u32, u32, u32)>,
}

impl Gen<'_> {
    fn text(&mut self, s: &str) -> (i32, i32) {
        let at = TEXT + self.text.len() as i32;
        self.text.extend_from_slice(s.as_bytes());
        (at, s.len() as i32)
    }

    fn body(&mut self, f: &mut Function, behaviour: Behaviour, func: &wit_parser::Function) {
        match behaviour {
            Behaviour::Err => {
                f.instruction(&I::I32Const(RESULT));
            }
            Behaviour::Callback => {
                f.instruction(&I::I32Const(OUTCOME));
            }
            Behaviour::Loop => {
                f.instruction(&I::Loop(BlockType::Empty))
                    .instruction(&I::Br(0))
                    .instruction(&I::End)
                    .instruction(&I::Unreachable);
            }
            Behaviour::Trap => {
                f.instruction(&I::Unreachable);
            }
            Behaviour::EatMemory => {
                f.instruction(&I::Loop(BlockType::Empty))
                    .instruction(&I::I32Const(16))
                    .instruction(&I::MemoryGrow(0))
                    .instruction(&I::I32Const(-1))
                    .instruction(&I::I32Ne)
                    .instruction(&I::BrIf(0))
                    .instruction(&I::End)
                    .instruction(&I::Unreachable);
            }
            Behaviour::Counted(inner) => {
                let (_, increment, _) = self.open_bucket(f);
                let (name, len) = self.text(&func.name);
                f.instruction(&I::I32Const(OPENED))
                    .instruction(&I::I32Load(mem(4, 2)))
                    .instruction(&I::I32Const(name))
                    .instruction(&I::I32Const(len))
                    .instruction(&I::I64Const(1))
                    .instruction(&I::I32Const(INCREMENTED))
                    .instruction(&I::Call(increment));
                trap_unless_ok(f, INCREMENTED);
                self.body(f, *inner, func);
            }
            Behaviour::Gated(inner) => {
                let (_, _, get) = self.open_bucket(f);
                let (key, len) = self.text(GATE);
                f.instruction(&I::Loop(BlockType::Empty))
                    .instruction(&I::I32Const(OPENED))
                    .instruction(&I::I32Load(mem(4, 2)))
                    .instruction(&I::I32Const(key))
                    .instruction(&I::I32Const(len))
                    .instruction(&I::I32Const(GOT))
                    .instruction(&I::Call(get));
                trap_unless_ok(f, GOT);
                f.instruction(&I::I32Const(GOT))
                    .instruction(&I::I32Load8U(mem(4, 0)))
                    .instruction(&I::I32Eqz)
                    .instruction(&I::BrIf(0))
                    .instruction(&I::End);
                self.body(f, *inner, func);
            }
            Behaviour::Echo => {
                f.instruction(&I::GlobalGet(0))
                    .instruction(&I::LocalTee(CUR))
                    .instruction(&I::LocalSet(START));
                self.append_text(f, &func.name);
                let offsets: Vec<(usize, Type)> = self
                    .sizes
                    .field_offsets(func.params.iter().map(|p| &p.ty))
                    .into_iter()
                    .map(|(at, ty)| (at.size_wasm32(), *ty))
                    .collect();
                for ((at, ty), param) in offsets.into_iter().zip(&func.params) {
                    self.value(f, &param.name, ty, at);
                }
                let store = |f: &mut Function, at: i32, value: &[I<'static>], op: I<'static>| {
                    f.instruction(&I::I32Const(at));
                    for i in value {
                        f.instruction(i);
                    }
                    f.instruction(&op);
                };
                let err = [I::I32Const(1)];
                store(f, ECHO_RESULT, &err, I::I32Store8(mem(0, 0)));
                let invalid_input = [I::I32Const(1)];
                store(f, ECHO_RESULT + 8, &invalid_input, I::I32Store8(mem(0, 0)));
                let start = [I::LocalGet(START)];
                store(f, ECHO_RESULT + 16, &start, I::I32Store(mem(0, 2)));
                let len = [I::LocalGet(CUR), I::LocalGet(START), I::I32Sub];
                store(f, ECHO_RESULT + 20, &len, I::I32Store(mem(0, 2)));
                f.instruction(&I::LocalGet(CUR))
                    .instruction(&I::GlobalSet(0))
                    .instruction(&I::I32Const(ECHO_RESULT));
            }
        }
    }

    /// Opens the one bucket there is, "" (so its address does not matter), into `OPENED`;
    /// returns the key-value imports.
    fn open_bucket(&self, f: &mut Function) -> (u32, u32, u32) {
        let kv = self.kv.expect("the key-value imports");
        f.instruction(&I::I32Const(0))
            .instruction(&I::I32Const(0))
            .instruction(&I::I32Const(OPENED))
            .instruction(&I::Call(kv.0));
        trap_unless_ok(f, OPENED);
        kv
    }

    /// Appends the static text `s` to the message.
    fn append_text(&mut self, f: &mut Function, s: &str) {
        let (at, len) = self.text(s);
        f.instruction(&I::LocalGet(CUR))
            .instruction(&I::I32Const(at))
            .instruction(&I::I32Const(len))
            .instruction(&I::MemoryCopy {
                src_mem: 0,
                dst_mem: 0,
            })
            .instruction(&I::LocalGet(CUR))
            .instruction(&I::I32Const(len))
            .instruction(&I::I32Add)
            .instruction(&I::LocalSet(CUR));
    }

    /// Appends the string or `list<u8>` (ptr, len) at `offset` in the arguments.
    fn append_argument(&mut self, f: &mut Function, offset: usize) {
        f.instruction(&I::LocalGet(CUR))
            .instruction(&I::LocalGet(ARGS))
            .instruction(&I::I32Load(mem(offset, 2)))
            .instruction(&I::LocalGet(ARGS))
            .instruction(&I::I32Load(mem(offset + 4, 2)))
            .instruction(&I::MemoryCopy {
                src_mem: 0,
                dst_mem: 0,
            })
            .instruction(&I::LocalGet(CUR))
            .instruction(&I::LocalGet(ARGS))
            .instruction(&I::I32Load(mem(offset + 4, 2)))
            .instruction(&I::I32Add)
            .instruction(&I::LocalSet(CUR));
    }

    /// Whether `Echo` shows anything of a value of type `ty`.
    fn shown(&self, ty: Type) -> bool {
        match ty {
            Type::String | Type::Bool => true,
            Type::Id(id) => match &self.resolve.types[id].kind {
                TypeDefKind::Type(t) | TypeDefKind::Option(t) => self.shown(*t),
                TypeDefKind::List(t) => *t == Type::U8,
                TypeDefKind::Record(r) => r.fields.iter().any(|f| self.shown(f.ty)),
                _ => false,
            },
            _ => false,
        }
    }

    /// Appends `\nname=value` for the argument of type `ty` at `offset`, or its fields'.
    fn value(&mut self, f: &mut Function, name: &str, ty: Type, offset: usize) {
        if !self.shown(ty) {
            return;
        }
        let kind = match ty {
            Type::Id(id) => Some(self.resolve.types[id].kind.clone()),
            _ => None,
        };
        match (ty, kind) {
            (Type::Bool, _) => {
                self.append_text(f, &format!("\n{name}="));
                f.instruction(&I::LocalGet(ARGS))
                    .instruction(&I::I32Load8U(mem(offset, 0)))
                    .instruction(&I::If(BlockType::Empty));
                self.append_text(f, "true");
                f.instruction(&I::Else);
                self.append_text(f, "false");
                f.instruction(&I::End);
            }
            (Type::String, _) | (_, Some(TypeDefKind::List(_))) => {
                self.append_text(f, &format!("\n{name}="));
                self.append_argument(f, offset);
            }
            (_, Some(TypeDefKind::Type(t))) => self.value(f, name, t, offset),
            (_, Some(TypeDefKind::Record(r))) => {
                let offsets = self.sizes.field_offsets(r.fields.iter().map(|f| &f.ty));
                for ((at, t), field) in offsets.into_iter().zip(&r.fields) {
                    let at = offset + at.size_wasm32();
                    self.value(f, &format!("{name}.{}", field.name), *t, at);
                }
            }
            (_, Some(TypeDefKind::Option(t))) => {
                let payload = self.sizes.payload_offset(Int::U8, [None, Some(&t)]);
                f.instruction(&I::LocalGet(ARGS))
                    .instruction(&I::I32Load8U(mem(offset, 0)))
                    .instruction(&I::If(BlockType::Empty));
                self.value(f, name, t, offset + payload.size_wasm32());
                f.instruction(&I::Else);
                self.append_text(f, &format!("\n{name}=none"));
                f.instruction(&I::End);
            }
            _ => unreachable!("`shown` admits no other type"),
        }
    }
}

/// The synthetic plugin built against the WIT package in `wit` (a changed copy of `wit/`).
pub fn plugin_of_world(
    wit: &Path,
    behaviour: impl Fn(&str) -> Behaviour,
    version: &str,
) -> Vec<u8> {
    build(wit, behaviour, version, false)
}

/// The synthetic plugin with a data segment past its memory's end: it fits the world, and
/// every instantiation traps before any export can run.
pub fn plugin_trapping_when_instantiated() -> Vec<u8> {
    build(&wit_dir(), |_| Behaviour::Err, "traps", true)
}

fn build(
    wit: &Path,
    behaviour: impl Fn(&str) -> Behaviour,
    version: &str,
    out_of_bounds: bool,
) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_dir(wit).unwrap();
    let world = resolve.select_world(&[pkg], Some("plugin")).unwrap();
    let mangling = ManglingAndAbi::Legacy(LiftLowerAbi::Sync);

    let exported: Vec<(&wit_parser::Function, Behaviour)> = resolve.worlds[world]
        .exports
        .values()
        .filter_map(|item| match item {
            WorldItem::Function(func) => Some((func, behaviour(&func.name))),
            _ => None,
        })
        .collect();

    let mut types = TypeSection::new();
    let mut imports = ImportSection::new();
    let mut funcs = FunctionSection::new();
    let mut exports = ExportSection::new();
    let mut code = CodeSection::new();
    let mut type_of = |sig: &WasmSignature| {
        types.ty().function(
            sig.params.iter().map(val).collect::<Vec<_>>(),
            sig.results.iter().map(val).collect::<Vec<_>>(),
        );
        types.len() - 1
    };

    // Only a plugin that counts or waits imports the key-value store: the others stay as
    // they were.
    let mut kv = None;
    if exported.iter().any(|(_, b)| b.uses_kv()) {
        let mut import = |interface: &str, name: &str, flat: usize| {
            let (key, id) = resolve.worlds[world]
                .imports
                .iter()
                .find_map(|(key, item)| match item {
                    WorldItem::Interface { id, .. }
                        if resolve.id_of(*id).is_some_and(|n| {
                            n.starts_with(&format!("wasi:keyvalue/{interface}@"))
                        }) =>
                    {
                        Some((key, *id))
                    }
                    _ => None,
                })
                .expect("the world imports wasi:keyvalue");
            let func = &resolve.interfaces[id].functions[name];
            let sig = resolve.wasm_signature(mangling.import_variant(), func);
            assert_eq!(sig.params.len(), flat, "{interface}.{name} changed");
            let (module, field) = resolve.wasm_import_name(
                mangling,
                WasmImport::Func {
                    interface: Some(key),
                    func,
                },
            );
            imports.import(&module, &field, EntityType::Function(type_of(&sig)));
            imports.len() - 1
        };
        // (name ptr, len, return area); (bucket, key ptr, len, delta, return area);
        // (bucket, key ptr, len, return area)
        kv = Some((
            import("store", "open", 3),
            import("atomics", "increment", 5),
            import("store", "[method]bucket.get", 4),
        ));
    }
    let imported = imports.len();

    // cabi_realloc: a bump allocator; nothing is ever freed in a one-shot instance.
    funcs.function(type_of(&WasmSignature {
        params: vec![WasmType::I32; 4],
        results: vec![WasmType::I32],
        indirect_params: false,
        retptr: false,
    }));
    let mut f = Function::new([(1, ValType::I32)]);
    f.instruction(&I::GlobalGet(0))
        .instruction(&I::LocalGet(2))
        .instruction(&I::I32Add)
        .instruction(&I::I32Const(1))
        .instruction(&I::I32Sub)
        .instruction(&I::I32Const(0))
        .instruction(&I::LocalGet(2))
        .instruction(&I::I32Sub)
        .instruction(&I::I32And)
        .instruction(&I::LocalTee(4))
        .instruction(&I::LocalGet(3))
        .instruction(&I::I32Add)
        .instruction(&I::GlobalSet(0))
        .instruction(&I::LocalGet(4))
        .instruction(&I::End);
    code.function(&f);
    exports.export(
        &resolve.wasm_export_name(mangling, WasmExport::Realloc),
        ExportKind::Func,
        imported,
    );

    let mut sizes = SizeAlign::default();
    sizes.fill(&resolve);
    let mut generate = Gen {
        resolve: &resolve,
        sizes,
        text: Vec::new(),
        kv,
    };
    for (index, (func, behaviour)) in (imported + 1..).zip(&exported) {
        let sig = resolve.wasm_signature(mangling.export_variant(), func);
        assert!(
            sig.indirect_params && sig.params.len() == 1,
            "`{}` takes its arguments as values: `Echo` reads them from memory",
            func.name
        );
        funcs.function(type_of(&sig));
        let mut f = Function::new([(2, ValType::I32)]);
        generate.body(&mut f, *behaviour, func);
        f.instruction(&I::End);
        code.function(&f);
        let name = resolve.wasm_export_name(
            mangling,
            WasmExport::Func {
                interface: None,
                func,
                kind: WasmExportKind::Normal,
            },
        );
        exports.export(&name, ExportKind::Func, index);
    }
    let text = generate.text;
    let heap = (TEXT + text.len() as i32 + 7) & !7;

    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 2,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    exports.export(
        &resolve.wasm_export_name(mangling, WasmExport::Memory),
        ExportKind::Memory,
        0,
    );
    let mut globals = GlobalSection::new();
    globals.global(
        GlobalType {
            val_type: ValType::I32,
            mutable: true,
            shared: false,
        },
        &ConstExpr::i32_const(heap),
    );
    let mut data = DataSection::new();
    if !text.is_empty() {
        data.active(0, &ConstExpr::i32_const(TEXT), text);
    }
    let mut result = vec![0u8; 24];
    result[0] = 1; // err
    result[8] = 1; // invalid-input
    result[16..20].copy_from_slice(&STRING.to_le_bytes());
    result[20..24].copy_from_slice(&1u32.to_le_bytes());
    data.active(0, &ConstExpr::i32_const(RESULT), result);
    data.active(0, &ConstExpr::i32_const(STRING), b"x".to_vec());
    let le = |v: &mut Vec<u8>, at: usize, n: u32| v[at..at + 4].copy_from_slice(&n.to_le_bytes());
    let mut outcome = vec![0u8; 40];
    outcome[8..10].copy_from_slice(&200u16.to_le_bytes());
    le(&mut outcome, 20, 600); // body
    le(&mut outcome, 24, 2);
    le(&mut outcome, 28, APPROVAL as u32); // updates
    le(&mut outcome, 32, 1);
    data.active(0, &ConstExpr::i32_const(OUTCOME), outcome);
    data.active(0, &ConstExpr::i32_const(600), b"ok".to_vec());
    let mut approval = vec![0u8; 40];
    le(&mut approval, 0, 700);
    le(&mut approval, 4, 2);
    le(&mut approval, 8, 710);
    le(&mut approval, 12, 1);
    approval[16] = 1; // approved
    approval[32..40].copy_from_slice(&1234u64.to_le_bytes());
    data.active(0, &ConstExpr::i32_const(APPROVAL), approval);
    data.active(0, &ConstExpr::i32_const(700), b"i1".to_vec());
    data.active(0, &ConstExpr::i32_const(710), b"k".to_vec());
    if out_of_bounds {
        data.active(0, &ConstExpr::i32_const(4 << 16), b"past the end".to_vec());
    }

    let mut module = Module::new();
    module.section(&types);
    if imported > 0 {
        module.section(&imports);
    }
    module
        .section(&funcs)
        .section(&memories)
        .section(&globals)
        .section(&exports)
        .section(&code)
        .section(&data)
        .section(&CustomSection {
            name: "test-version".into(),
            data: version.as_bytes().into(),
        });
    let mut bytes = module.finish();
    wit_component::embed_component_metadata(
        &mut bytes,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .unwrap();
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&bytes)
        .unwrap()
        .encode()
        .unwrap()
}

pub fn standard(name: &str) -> Behaviour {
    match name {
        "notify" => Behaviour::Loop,
        "get-approval" => Behaviour::Trap,
        "cancel-approval" => Behaviour::EatMemory,
        _ => Behaviour::Err,
    }
}
