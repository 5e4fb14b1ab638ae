//! Compiles `proto/edge.proto` with protox (pure Rust): building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["edge.proto"], ["proto"])?;
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::EdgeCodec")
        .bytes([".edge.v1.PurgeBatch.encoded"])
        .compile_fds(fds)?;
    Ok(())
}
