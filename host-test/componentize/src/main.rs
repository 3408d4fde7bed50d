//! `componentize <core.wasm> <out.wasm>`: wraps a core wasm module (with its embedded WIT
//! metadata, as wit-bindgen emits it) into a component, without the wasm-tools CLI.

use anyhow::{Context as _, Result, bail};
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("componentize: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: componentize <core.wasm> <out.wasm>");
    };
    let core = std::fs::read(input).with_context(|| format!("reading {input}"))?;
    let component = wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&core)
        .context("reading the core module's component metadata")?
        .encode()
        .context("encoding the component")?;
    let component = strip_component_names(&component)?;
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&component)
        .context("validating the component without its names")?;
    // Write then rename: a build interrupted halfway must not leave a truncated component
    // at the stable path.
    let tmp = format!("{output}.tmp");
    std::fs::write(&tmp, &component).with_context(|| format!("writing {tmp}"))?;
    std::fs::rename(&tmp, output).with_context(|| format!("renaming {tmp} to {output}"))?;
    Ok(())
}

/// Drops the component's top-level `component-name` custom section: debug names of its
/// instances, functions and types (about 6.6 KB of the plugin), which nothing reads at run
/// time. The core module inside is built with `strip = true` already.
fn strip_component_names(wasm: &[u8]) -> Result<Vec<u8>> {
    let Some((header, mut rest)) = wasm.split_at_checked(8) else {
        bail!("not a component: {} bytes", wasm.len());
    };
    let mut out = header.to_vec();
    while let Some((&id, after_id)) = rest.split_first() {
        let (len, used) = leb_u32(after_id)?;
        let end = 1 + used + len as usize;
        let Some(section) = rest.get(..end) else {
            bail!("a section runs past the end of the component");
        };
        let payload = &section[1 + used..];
        if !(id == 0 && custom_section_name(payload)? == b"component-name") {
            out.extend_from_slice(section);
        }
        rest = &rest[end..];
    }
    Ok(out)
}

fn custom_section_name(payload: &[u8]) -> Result<&[u8]> {
    let (len, used) = leb_u32(payload)?;
    payload
        .get(used..used + len as usize)
        .context("a custom section's name runs past its end")
}

/// An unsigned LEB128 u32 and the bytes it took.
fn leb_u32(bytes: &[u8]) -> Result<(u32, usize)> {
    let mut value = 0u32;
    for (i, &b) in bytes.iter().take(5).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    bail!("malformed section length")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(name: &str, body: &[u8]) -> Vec<u8> {
        let mut payload = vec![name.len() as u8];
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(body);
        let mut s = vec![0];
        let mut len = payload.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                s.push(byte);
                break;
            }
            s.push(byte | 0x80);
        }
        s.extend(payload);
        s
    }

    #[test]
    fn only_the_component_name_section_is_dropped() {
        let header = b"\0asm\x0d\0\x01\0";
        let other = [7u8, 0x82, 0x01].iter().copied().chain([0u8; 130]);
        let mut wasm = header.to_vec();
        wasm.extend(custom("producers", b"p"));
        wasm.extend(custom("component-name", &[1; 200]));
        wasm.extend(other.clone());
        let mut want = header.to_vec();
        want.extend(custom("producers", b"p"));
        want.extend(other);
        assert_eq!(strip_component_names(&wasm).unwrap(), want);
        assert!(strip_component_names(&wasm[..wasm.len() - 1]).is_err());
    }
}
