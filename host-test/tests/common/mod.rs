//! A synthetic plugin for host tests: a core module with the plugin world's exports, built
//! with wasm-encoder and componentized with wit-component, whose exports misbehave on purpose.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::path::Path;
use wasm_encoder::{
    CodeSection, ConstExpr, CustomSection, DataSection, ExportKind, ExportSection, Function,
    FunctionSection, GlobalSection, GlobalType, Instruction as I, MemorySection, MemoryType,
    Module, TypeSection, ValType,
};
use wit_parser::abi::WasmType;
use wit_parser::{LiftLowerAbi, ManglingAndAbi, Resolve, WasmExport, WasmExportKind, WorldItem};

/// What an export of the synthetic plugin does.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Returns `err(invalid-input("x"))`.
    Err,
    Loop,
    Trap,
    /// Grows memory until refused, then traps.
    EatMemory,
    /// Returns `ok(callback-outcome)`: status 200, body "ok", one approved update (`i1`, `k`).
    Callback,
}

/// Where the static `err(invalid-input("x"))` return value lives. Every export returns
/// `result<T, error>` with a payload aligned to 8 (error holds an s64), so one layout fits all:
/// tag at 0, error case at 8, its string (ptr, len) at 16.
const RESULT: i32 = 64;
const STRING: i32 = 128;
/// `ok(callback-outcome)`: payload at +8 = http-response {status u16, headers, body}, then
/// updates; the one approval {instance-id, key, status u8, decisions, updated-at-ms u64 @32}.
const OUTCOME: i32 = 512;
const APPROVAL: i32 = 640;
const HEAP: i32 = 1024;

pub fn plugin(behaviour: impl Fn(&str) -> Behaviour, version: &str) -> Vec<u8> {
    plugin_of_world(&wit_dir(), behaviour, version)
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

/// The synthetic plugin built against the WIT package in `wit` (a changed copy of `wit/`).
pub fn plugin_of_world(
    wit: &Path,
    behaviour: impl Fn(&str) -> Behaviour,
    version: &str,
) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let (pkg, _) = resolve.push_dir(wit).unwrap();
    let world = resolve.select_world(&[pkg], Some("plugin")).unwrap();
    let mangling = ManglingAndAbi::Legacy(LiftLowerAbi::Sync);

    let mut types = TypeSection::new();
    let mut funcs = FunctionSection::new();
    let mut exports = ExportSection::new();
    let mut code = CodeSection::new();
    let val = |t: &WasmType| match t {
        WasmType::I64 | WasmType::PointerOrI64 => ValType::I64,
        WasmType::F32 => ValType::F32,
        WasmType::F64 => ValType::F64,
        _ => ValType::I32,
    };

    // cabi_realloc: a bump allocator; nothing is ever freed in a one-shot instance.
    types.ty().function([ValType::I32; 4], [ValType::I32]);
    funcs.function(0);
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
        0,
    );

    let mut index = 1;
    for (_, item) in &resolve.worlds[world].exports {
        let WorldItem::Function(func) = item else {
            continue;
        };
        let sig = resolve.wasm_signature(mangling.export_variant(), func);
        types.ty().function(
            sig.params.iter().map(val).collect::<Vec<_>>(),
            sig.results.iter().map(val).collect::<Vec<_>>(),
        );
        funcs.function(index);
        let mut f = Function::new([]);
        match behaviour(&func.name) {
            Behaviour::Err => f.instruction(&I::I32Const(RESULT)),
            Behaviour::Callback => f.instruction(&I::I32Const(OUTCOME)),
            Behaviour::Loop => f
                .instruction(&I::Loop(wasm_encoder::BlockType::Empty))
                .instruction(&I::Br(0))
                .instruction(&I::End)
                .instruction(&I::Unreachable),
            Behaviour::Trap => f.instruction(&I::Unreachable),
            Behaviour::EatMemory => f
                .instruction(&I::Loop(wasm_encoder::BlockType::Empty))
                .instruction(&I::I32Const(16))
                .instruction(&I::MemoryGrow(0))
                .instruction(&I::I32Const(-1))
                .instruction(&I::I32Ne)
                .instruction(&I::BrIf(0))
                .instruction(&I::End)
                .instruction(&I::Unreachable),
        };
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
        index += 1;
    }

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
        &ConstExpr::i32_const(HEAP),
    );
    let mut data = DataSection::new();
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

    let mut module = Module::new();
    module
        .section(&types)
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
