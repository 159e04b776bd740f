//! Input rules shared by every service; each failure names the field and the rule.

use std::fmt;

/// Kubernetes Secret data keys: `[-._a-zA-Z0-9]+`.
pub const MAX_KEY_LEN: usize = 253;
/// A DNS label.
pub const MAX_DOMAIN_LEN: usize = 63;
/// A workload's id, as the platform names it.
pub const MAX_WORKLOAD_ID_LEN: usize = 128;
/// A workload's name, for people.
pub const MAX_WORKLOAD_NAME_LEN: usize = 256;
/// Decoded values of one store object, in total: the Kubernetes Secret limit.
pub const MAX_OBJECT_VALUE_BYTES: usize = 1024 * 1024;

/// One problem with one field of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Characters of a caller's input an error message repeats.
pub const MAX_ECHO_CHARS: usize = 100;
/// Bound on a violation's field and description, whatever they repeat: an
/// error must fit in gRPC's headers however long the input was.
pub const MAX_DESCRIPTION_CHARS: usize = 1_000;

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: cap(field.into(), 300), description: cap(description.into(), MAX_DESCRIPTION_CHARS) }
    }
}

fn cap(text: String, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// A caller's input as an error repeats it: quoted, its first
/// [`MAX_ECHO_CHARS`] characters, then `…` and the full length.
pub fn echo(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        Some((at, _)) => format!("{:?}… ({} characters)", &text[..at], text.chars().count()),
        None => format!("{text:?}"),
    }
}

/// As [`echo`], unquoted.
pub fn echo_plain(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

impl fmt::Display for FieldViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

impl std::error::Error for FieldViolation {}

/// A secret key: 1..253 characters of `[-._a-zA-Z0-9]`, not `.` or `..`, not
/// starting with `..` (the Kubernetes Secret data-key rule).
pub fn secret_key(field: &str, key: &str) -> Result<(), FieldViolation> {
    let rule = "secret keys are 1 to 253 characters of letters, digits, '-', '_' and '.'";
    if key.is_empty() {
        return Err(FieldViolation::new(field, format!("must not be empty; {rule}")));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(FieldViolation::new(field, format!("is {} characters long; {rule}", key.chars().count())));
    }
    if let Some(bad) = key.chars().find(|c| !is_key_char(*c)) {
        return Err(FieldViolation::new(field, format!("contains {bad:?}; {rule}")));
    }
    if key == "." || key == ".." || key.starts_with("..") {
        return Err(FieldViolation::new(field, "must not be '.' or '..' or start with '..'"));
    }
    Ok(())
}

/// A workload id: 1..128 characters, no control characters (platform ids
/// are UUIDs or names).
pub fn workload_id(field: &str, id: &str) -> Result<(), FieldViolation> {
    if id.is_empty() || id.chars().count() > MAX_WORKLOAD_ID_LEN || id.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            format!("must be 1 to {MAX_WORKLOAD_ID_LEN} characters without control characters"),
        ));
    }
    Ok(())
}

/// A Vault config id, as the vault-config-service makes them: a UUID in its
/// hyphenated form (`0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b`). The one rule
/// every service checks such an id with.
pub fn vault_config_id(field: &str, id: &str) -> Result<(), FieldViolation> {
    let bytes = id.as_bytes();
    let hyphenated = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if hyphenated {
        Ok(())
    } else {
        Err(FieldViolation::new(
            field,
            format!("{} is not a vault config id (a UUID such as 0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b)", echo(id)),
        ))
    }
}

/// A workload name: at most 256 characters, no control characters.
pub fn workload_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    if name.chars().count() > MAX_WORKLOAD_NAME_LEN || name.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_WORKLOAD_NAME_LEN} characters without control characters"),
        ));
    }
    Ok(())
}

pub fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Domain names that would map onto another scope's store object
/// (`{prefix}-admin` holds the admin secrets).
pub const RESERVED_DOMAINS: &[&str] = &["admin"];

/// A domain name: a lowercase DNS label, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, 1..63,
/// and not a reserved name.
pub fn domain(field: &str, name: &str) -> Result<(), FieldViolation> {
    let rule = "domain names are lowercase DNS labels: 1 to 63 of a-z, 0-9 and '-', starting and ending with a letter or digit";
    if name.is_empty() {
        return Err(FieldViolation::new(field, format!("must not be empty; {rule}")));
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(FieldViolation::new(field, format!("is {} characters long; {rule}", name.chars().count())));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if let Some(bad) = name.chars().find(|c| !ok_char(*c)) {
        return Err(FieldViolation::new(field, format!("contains {bad:?}; {rule}")));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(FieldViolation::new(field, format!("starts or ends with '-'; {rule}")));
    }
    if RESERVED_DOMAINS.contains(&name) {
        return Err(FieldViolation::new(
            field,
            format!("{name:?} is reserved: its store object would be the admin secrets' object"),
        ));
    }
    Ok(())
}

/// A secret value: not empty, at most the object limit on its own.
pub fn secret_value(field: &str, len: usize) -> Result<(), FieldViolation> {
    if len == 0 {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if len > MAX_OBJECT_VALUE_BYTES {
        return Err(FieldViolation::new(
            field,
            format!(
                "is {len} bytes; a value may be at most {MAX_OBJECT_VALUE_BYTES} bytes (1 MiB, the Kubernetes Secret size limit)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_config_ids_are_hyphenated_uuids_only() {
        assert!(vault_config_id("id", "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b").is_ok());
        assert!(vault_config_id("id", "0B5F6C1E-6D1A-4A7E-9F55-3C2D1E0F9A8B").is_ok());
        for bad in [
            "",
            "prod",
            "0b5f6c1e6d1a4a7e9f553c2d1e0f9a8b",
            "{0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b}",
            "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8",
            "0b5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8g",
            "0b5f6c1e-6d1a-4a7e-9f553-c2d1e0f9a8b",
            "é5f6c1e-6d1a-4a7e-9f55-3c2d1e0f9a8b",
        ] {
            let e = vault_config_id("source.id", bad).unwrap_err();
            assert_eq!(e.field, "source.id");
            assert!(e.description.contains("is not a vault config id"), "{bad}: {}", e.description);
        }
    }

    #[test]
    fn accepts_kubernetes_style_keys() {
        for key in ["db_password", "a", "S3.access-key", ".hidden", "x".repeat(253).as_str()] {
            assert!(secret_key("key", key).is_ok(), "{key}");
        }
    }

    #[test]
    fn rejects_bad_keys_naming_field_and_rule() {
        let cases = [
            ("", "must not be empty"),
            ("has space", "contains ' '"),
            ("slash/key", "contains '/'"),
            ("ключ", "contains 'к'"),
            (".", "must not be '.'"),
            ("..x", "start with '..'"),
        ];
        for (key, expected) in cases {
            let err = secret_key("key", key).unwrap_err();
            assert_eq!(err.field, "key");
            assert!(err.description.contains(expected), "{key:?}: {}", err.description);
        }
        let long = secret_key("key", &"k".repeat(254)).unwrap_err();
        assert!(long.description.contains("254 characters"), "{}", long.description);
    }

    #[test]
    fn domains_are_dns_labels() {
        for ok in ["finance", "a", "team-1", &"d".repeat(63)] {
            assert!(domain("domain", ok).is_ok(), "{ok}");
        }
        for bad in ["", "Finance", "-a", "a-", "a_b", "a.b", &"d".repeat(64)] {
            let err = domain("domain", bad).unwrap_err();
            assert_eq!(err.field, "domain");
            assert!(err.description.contains("DNS label"), "{bad}: {}", err.description);
        }
        let reserved = domain("source.id", "admin").unwrap_err();
        assert_eq!(reserved.field, "source.id");
        assert!(reserved.description.contains("reserved"), "{}", reserved.description);
    }

    #[test]
    fn values_must_be_non_empty_and_within_one_mebibyte() {
        assert!(secret_value("value", 1).is_ok());
        assert!(secret_value("value", MAX_OBJECT_VALUE_BYTES).is_ok());
        assert!(secret_value("value", 0).unwrap_err().description.contains("empty"));
        let big = secret_value("value", MAX_OBJECT_VALUE_BYTES + 1).unwrap_err();
        assert!(big.description.contains("1 MiB"), "{}", big.description);
    }
}
