//! Compiles the test contracts and writes their descriptor sets for the
//! gateway tests, which load them as extra contracts the way a team fronting
//! its own services would: the echo contract
//! (`proto/meshkit/echo/v1/echo.proto`) and gRPC's interop `TestService`
//! (`proto/grpc/testing/test.proto`, from github.com/grpc/grpc-proto).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    let mut compiler = protox::Compiler::new(["proto", "../../proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(["meshkit/echo/v1/echo.proto"])?;
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("echo_descriptor.bin"), &encoded)?;
    let fds = prost_types::FileDescriptorSet::decode(encoded.as_slice())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .extern_path(".google.api", "::meshkit_proto::google::api")
        .compile_fds(fds)?;

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(["grpc/testing/test.proto"])?;
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("interop_descriptor.bin"), &encoded)?;
    let fds = prost_types::FileDescriptorSet::decode(encoded.as_slice())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
