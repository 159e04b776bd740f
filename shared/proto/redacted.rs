/// Messages (and oneofs) that carry secret values: their `Debug` is written
/// by hand in `lib.rs` so that a value can never be printed. A test walks
/// the descriptor sets and fails when a field that can carry a value is in
/// a message missing here.
pub const REDACTED: &[&str] = &[
    ".iomete.secrets.v1.SecretValue",
    ".iomete.secrets.v1.SecretValue.kind",
    ".iomete.secrets.v1.ResolvedItem",
    ".iomete.secrets.v1.ResolvedItem.result",
    ".iomete.secrets.v1.ResolveItem",
    ".iomete.secrets.v1.ResolveItem.reference",
    ".iomete.secrets.v1.ConfigValue",
    ".iomete.secrets.v1.ConfigValue.value",
    ".iomete.secrets.v1.StorageConfigPayload",
    ".iomete.secrets.internal.v1.SecretLookupResult",
    ".iomete.secrets.internal.v1.VaultLookupResult",
    ".iomete.secrets.internal.v1.VaultLookupResult.result",
    ".iomete.secrets.v1.VaultCredentials",
    ".iomete.secrets.v1.VaultCredentials.method",
    ".iomete.secrets.v1.AppRoleCredentials",
];
