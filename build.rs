//! Compiles our own .proto subsets with protox (pure Rust, no system protoc) and generates
//! prost messages plus tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/control.proto",
        "proto/gateway.proto",
        "proto/filesync.proto",
        "proto/externalscaler.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
