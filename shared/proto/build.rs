//! Compiles `proto/` with a vendored protoc, so a fresh machine needs none.

use std::{env, path::PathBuf};

/// Messages that carry secret values: their `Debug` is written by hand in
/// `lib.rs` so that a value can never be printed.
const REDACTED: &[&str] = &[
    ".iomete.secrets.v1.CreateSecretRequest",
    ".iomete.secrets.v1.CreateSecretRequest.value",
    ".iomete.secrets.v1.UpdateSecretRequest",
    ".iomete.secrets.v1.UpdateSecretRequest.value",
    ".iomete.secrets.v1.SecretLookupResult",
    ".iomete.secrets.v1.ResolvedItem",
    ".iomete.secrets.v1.ResolvedItem.result",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("PROTOC", protoc) };
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let files = [
        "iomete/secrets/v1/common.proto",
        "iomete/secrets/v1/secret_service.proto",
        "iomete/secrets/v1/secret_reader.proto",
        "iomete/secrets/v1/authz.proto",
        "iomete/secrets/v1/gateway.proto",
    ]
    .map(|f| proto_root.join(f));
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("secrets_descriptor.bin"))
        .skip_debug(REDACTED.iter().copied())
        .compile_protos(&files, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
