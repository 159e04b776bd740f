//! The one type that holds a secret value.

use std::fmt;

use zeroize::Zeroizing;

/// A secret value: bytes that redact themselves in `Debug`, have no
/// `Display`, and are wiped from memory when dropped.
///
/// Read it with [`SecretValue::expose`] at the one place that must hand the
/// bytes on (encryption, a Kubernetes Secret body, a resolve response).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Takes ownership of the bytes without copying them.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Hands the bytes on (into a response message) without leaving a copy.
    pub fn into_exposed(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretValue {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl From<String> for SecretValue {
    fn from(text: String) -> Self {
        Self::new(text.into_bytes())
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let v = SecretValue::from("canary-value-91c2".to_string());
        let printed = format!("{v:?} {v:#?} {:?}", Some(&v));
        assert!(!printed.contains("canary-value-91c2"), "{printed}");
        assert!(printed.contains("redacted"));
    }

    #[test]
    fn exposes_exactly_the_bytes_it_was_given() {
        let v = SecretValue::new(vec![0, 159, 146, 150]);
        assert_eq!(v.expose(), &[0, 159, 146, 150]);
        assert_eq!(v.len(), 4);
        assert_eq!(v.into_exposed(), vec![0, 159, 146, 150]);
    }
}
