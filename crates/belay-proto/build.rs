//! Compiles `proto/belay/v1/*.proto` with protox (pure Rust), so building the
//! workspace never needs a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // Canonical so protox can map each opened file back to its include root.
    let proto_root = manifest_dir.join("../../proto").canonicalize()?;
    let v1 = proto_root.join("belay/v1");

    // Sorted so the descriptor set (and thus the build) is reproducible.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&v1)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|ext| ext == "proto"));
    files.sort();

    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let mut compiler = protox::Compiler::new([&proto_root])?;
    compiler.include_imports(true).open_files(&files)?;

    // compile_fds does not write the descriptor set; server reflection needs it.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("belay_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure().compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
