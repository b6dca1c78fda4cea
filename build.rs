//! Compiles `proto/` with protox (no system `protoc` needed) and generates the
//! Tonic servers and clients. The encoded `FileDescriptorSet` is written next to
//! the generated code so reflection and the gateway's transcoding read the same
//! descriptors the code was generated from.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "meshkit/user/v1/user.proto",
    "meshkit/order/v1/order.proto",
    "meshkit/notification/v1/notification.proto",
    "meshkit/scheduler/v1/scheduler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;

    // Encoded by protox itself so custom options (google.api.http) survive.
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out_dir.join("meshkit_descriptor.bin"), &encoded)?;

    let fds = prost_types::FileDescriptorSet::decode(encoded.as_slice())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
