//! Property tests for the rules without I/O: the placeholder grammar, and
//! the key and domain rules, each checked against a plain statement of the
//! rule on generated input (valid, near-valid and arbitrary).

use proptest::prelude::*;
/// What opens a placeholder.
const OPEN: &str = "${secrets.";

use secrets_types::{
    placeholder::{self, Segment},
    validate,
};

/// The key rule as the spec states it (the Kubernetes Secret data-key rule).
fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        && key != "."
        && key != ".."
        && !key.starts_with("..")
}

/// The domain rule as the spec states it: a lowercase DNS label, and not
/// the reserved `admin`.
fn is_valid_domain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
        && name != "admin"
}

/// The text a parse came from, put back together.
fn join(segments: &[Segment<'_>]) -> String {
    segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => (*l).to_string(),
            Segment::Placeholder(k) => format!("${{secrets.{k}}}"),
        })
        .collect()
}

fn key_strategy() -> impl Strategy<Value = String> {
    "[-._a-zA-Z0-9]{1,40}".prop_filter("the key rule", |k| is_valid_key(k))
}

/// Text that may hold placeholders, near-placeholders and arbitrary bytes.
fn text_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        any::<String>(),
        key_strategy().prop_map(|k| format!("${{secrets.{k}}}")),
        Just("${secrets.".to_string()),
        Just("${env:HOME}".to_string()),
        Just("}".to_string()),
        "[-._a-zA-Z0-9 /]{0,5}".prop_map(|k| format!("${{secrets.{k}}}")),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
}

proptest! {
    #[test]
    fn a_parse_puts_back_together_into_the_text_it_came_from(text in text_strategy()) {
        if let Ok(segments) = placeholder::parse(&text) {
            prop_assert_eq!(join(&segments), text.clone());
            for s in &segments {
                match s {
                    Segment::Placeholder(k) => prop_assert!(is_valid_key(k), "placeholder key {:?}", k),
                    Segment::Literal(l) => prop_assert!(!l.is_empty() && !l.contains(OPEN), "literal {:?}", l),
                }
            }
            prop_assert_eq!(placeholder::count(&segments), segments.iter().filter(|s| matches!(s, Segment::Placeholder(_))).count());
        } else {
            // Refused only when a `${secrets.` is not a well-formed placeholder.
            prop_assert!(text.contains(OPEN), "refused with no placeholder opened: {:?}", text);
        }
    }

    #[test]
    fn every_valid_placeholder_between_plain_text_is_found(
        before in "[^$]{0,20}", key in key_strategy(), after in "[^$]{0,20}", again in any::<bool>(),
    ) {
        let repeat = if again { format!("${{secrets.{key}}}") } else { String::new() };
        let text = format!("{before}${{secrets.{key}}}{after}{repeat}");
        let segments = placeholder::parse(&text).unwrap();
        prop_assert_eq!(placeholder::keys(&segments), vec![key.as_str()]);
        prop_assert_eq!(placeholder::count(&segments), 1 + usize::from(again));
    }

    #[test]
    fn keys_follow_the_kubernetes_data_key_rule(key in prop_oneof![
        key_strategy(),
        "[-._a-zA-Z0-9]{0,260}",
        "\\.{1,3}[a-z]{0,3}",
        any::<String>(),
    ]) {
        prop_assert_eq!(validate::secret_key("key", &key).is_ok(), is_valid_key(&key), "key {:?}", key);
    }

    #[test]
    fn domains_follow_the_dns_label_rule(name in prop_oneof![
        "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?",
        "[-a-z0-9]{0,70}",
        "[a-zA-Z0-9_.-]{0,10}",
        Just("admin".to_string()),
        any::<String>(),
    ]) {
        prop_assert_eq!(validate::domain("domain", &name).is_ok(), is_valid_domain(&name), "domain {:?}", name);
    }

    #[test]
    fn an_echo_is_short_whatever_the_input(text in prop_oneof![any::<String>(), "[a-z]{90,400}"]) {
        // At most 100 characters of the input, each escaped in at most 10
        // bytes, and the count of what was left out.
        prop_assert!(validate::echo(&text).len() <= validate::MAX_ECHO_CHARS * 10 + 40);
        prop_assert!(validate::echo_plain(&text).chars().count() <= validate::MAX_ECHO_CHARS + 1);
    }
}
