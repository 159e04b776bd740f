//! Compiles `proto/` with a vendored protoc, so a fresh machine needs none.
//!
//! Two descriptor sets: the public APIs (`iomete.secrets.v1`), which the
//! gateway reflects, and the internal ones (`iomete.secrets.internal.v1`),
//! which only the internal services reflect.

// A build script runs no async code.
#![allow(clippy::disallowed_methods)]

use std::{env, path::PathBuf};

include!("redacted.rs");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PROTOC", protoc) };
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let public = [
        "iomete/secrets/v1/common.proto",
        "iomete/secrets/v1/secret_service.proto",
        "iomete/secrets/v1/authz.proto",
        "iomete/secrets/v1/gateway.proto",
        "iomete/secrets/v1/vault_config.proto",
    ]
    .map(|f| proto_root.join(f));
    let internal = [
        "iomete/secrets/internal/v1/secret_reader.proto",
        "iomete/secrets/internal/v1/resources.proto",
        "iomete/secrets/internal/v1/vault_reader.proto",
        "iomete/secrets/internal/v1/usage.proto",
        "iomete/secrets/internal/v1/decisions.proto",
        "iomete/secrets/internal/v1/changes.proto",
    ]
    .map(|f| proto_root.join(f));
    let configure = || {
        tonic_prost_build::configure()
            // google.rpc.Status and friends come from tonic-types.
            .extern_path(".google.rpc", "::tonic_types::pb")
            .skip_debug(REDACTED.iter().copied())
    };
    configure()
        .file_descriptor_set_path(out.join("secrets_descriptor.bin"))
        .compile_protos(&public, std::slice::from_ref(&proto_root))?;
    // Its own output directory: code generated for the imported public
    // protos must not overwrite the public package's file.
    let internal_out = out.join("internal");
    std::fs::create_dir_all(&internal_out)?;
    configure()
        .extern_path(".iomete.secrets.v1", "crate::v1")
        .out_dir(&internal_out)
        .file_descriptor_set_path(out.join("secrets_internal_descriptor.bin"))
        .compile_protos(&internal, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    println!("cargo:rerun-if-changed=redacted.rs");
    Ok(())
}
