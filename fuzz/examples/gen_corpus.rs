//! Writes the seed corpus (`imbridge_fuzz::seeds`) to `fuzz/corpus/<target>/<name>`.
//! Run from `fuzz/`: `cargo +nightly run --example gen_corpus`.

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for s in imbridge_fuzz::seeds::all() {
        let dir = root.join(s.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(&s.name), &s.data)?;
    }
    println!(
        "wrote {} seeds under {}",
        imbridge_fuzz::seeds::all().len(),
        root.display()
    );
    Ok(())
}
