//! Compiles etcd's .proto files (vendored under `proto/`, see `proto/vendor.py`) with
//! protox (pure Rust): building needs no system `protoc`. Client stubs only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "etcd/api/etcdserverpb/rpc.proto",
            "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        ],
        ["proto"],
    )?;
    tonic_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
