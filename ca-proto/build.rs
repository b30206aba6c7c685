//! Generates the CA API from `proto/` with the system `protoc` (Debian: protobuf-compiler and
//! libprotobuf-dev for the well-known types; scripts/deps installs both).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let feature = |name: &str| std::env::var_os(format!("CARGO_FEATURE_{name}")).is_some();
    tonic_prost_build::configure()
        .build_client(feature("CLIENT"))
        .build_server(feature("SERVER"))
        .compile_protos(&["proto/istio/v1/auth/ca.proto"], &["proto"])?;
    Ok(())
}
