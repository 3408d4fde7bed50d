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
    // Write then rename: a build interrupted halfway must not leave a truncated component
    // at the stable path.
    let tmp = format!("{output}.tmp");
    std::fs::write(&tmp, &component).with_context(|| format!("writing {tmp}"))?;
    std::fs::rename(&tmp, output).with_context(|| format!("renaming {tmp} to {output}"))?;
    Ok(())
}
