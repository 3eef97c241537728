//! Compiles the gRPC contract in `proto/contrastive/v1/` with protox (pure Rust: no system protoc)
//! and generates tonic clients and servers, plus the descriptor set served by reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["contrastive/v1/embedding.proto", "contrastive/v1/finetune.proto"];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("contrastive_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
