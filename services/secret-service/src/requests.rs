//! Idempotency keys: a create, update or delete that carries a
//! `request_id` is recorded in its store object, in the same write as the
//! change, so the record and the change land together or not at all. A
//! retry with the same id and the same request gets the first outcome and
//! changes nothing; with a different request it is refused naming the id.
//!
//! Records hold the operation, the key, when, and the times the change
//! gave the secret; never a value or a digest of one. Whether a retried
//! value is the same is decided by comparing it with the stored value,
//! while the secret still holds what that request wrote. Records are kept
//! [`KEEP_FOR`], at most [`MAX_PER_OBJECT`] per object (the latest).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use secrets_common::{SecretValue, validate::FieldViolation};
use serde::{Deserialize, Serialize};

use crate::{
    Error, Result,
    backend::{Entries, Entry, REQUESTS_ENTRY},
    store::{Scope, SecretInfo},
};

pub const KEEP_FOR: chrono::Duration = chrono::Duration::hours(24);
pub const MAX_PER_OBJECT: usize = 256;
pub const MAX_ID_LEN: usize = 128;

/// What a request did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    Update,
    Delete,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One request as recorded: times in Unix milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    op: Op,
    key: String,
    at: i64,
    /// The secret's times after the change (create and update).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    times: Option<(i64, i64)>,
}

/// Checks a request id: empty means none.
pub fn validate(field: &str, id: &str) -> Result<(), FieldViolation> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if id.len() > MAX_ID_LEN || !id.chars().all(ok) {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters of letters, digits, '-', '_', '.' and ':' (a UUID fits)"),
        ));
    }
    Ok(())
}

/// The records of one object.
#[derive(Default)]
pub struct Requests(BTreeMap<String, Record>);

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl Requests {
    /// The records kept in `entries`. Unreadable records are treated as
    /// none (they only make retries safe), and said so in the log.
    pub fn of(entries: &Entries) -> Self {
        let Some(entry) = entries.get(REQUESTS_ENTRY) else { return Self::default() };
        match serde_json::from_slice(entry.value.expose()) {
            Ok(records) => Self(records),
            Err(e) => {
                tracing::warn!(error = %e, "the idempotency records of a store object are unreadable; starting anew");
                Self::default()
            }
        }
    }

    /// The outcome of an earlier request with this id, if there was one:
    /// `Some(Ok(..))` to answer again, `Some(Err(..))` when the id was used
    /// for a different request. For create and update, `value` is compared
    /// with the stored one while the secret holds what that request wrote.
    pub fn replay(
        &self,
        id: &str,
        op: Op,
        scope: &Scope,
        key: &str,
        value: Option<&SecretValue>,
        entries: &Entries,
    ) -> Option<Result<Option<SecretInfo>>> {
        let record = self.0.get(id)?;
        let different = || {
            Err(Error::InvalidArgument(FieldViolation::new(
                "request_id",
                format!(
                    "{id:?} was used for another request ({} of {:?} in {scope}); use a new request_id for a new request",
                    record.op.name(),
                    record.key
                ),
            )))
        };
        if record.op != op || record.key != key {
            return Some(different());
        }
        let Some((created, updated)) = record.times else { return Some(Ok(None)) };
        if let (Some(stored), Some(value)) = (entries.get(key), value)
            && millis(stored.updated_at) == updated
            && stored.value.expose() != value.expose()
        {
            return Some(different());
        }
        Some(Ok(Some(SecretInfo {
            key: key.to_string(),
            scope: scope.clone(),
            created_at: time(created),
            updated_at: time(updated),
        })))
    }

    /// Records a request and keeps the records within their bounds.
    pub fn add(&mut self, id: &str, op: Op, key: &str, info: Option<&SecretInfo>, now: DateTime<Utc>) {
        let times = info.map(|i| (millis(i.created_at), millis(i.updated_at)));
        self.0.insert(id.to_string(), Record { op, key: key.to_string(), at: millis(now), times });
        let oldest_kept = millis(now - KEEP_FOR);
        self.0.retain(|_, r| r.at >= oldest_kept);
        if self.0.len() > MAX_PER_OBJECT {
            let mut ages: Vec<(i64, String)> = self.0.iter().map(|(id, r)| (r.at, id.clone())).collect();
            ages.sort();
            for (_, id) in ages.into_iter().take(self.0.len() - MAX_PER_OBJECT) {
                self.0.remove(&id);
            }
        }
    }

    /// Puts the records back into the object's entries.
    pub fn store(&self, entries: &mut Entries, now: DateTime<Utc>) -> Result<()> {
        let json = serde_json::to_vec(&self.0)
            .map_err(|e| Error::Internal(format!("cannot encode idempotency records: {e}")))?;
        entries.insert(
            REQUESTS_ENTRY.to_string(),
            Entry { value: SecretValue::new(json), created_at: now, updated_at: now },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &str, at: DateTime<Utc>) -> Entry {
        Entry { value: SecretValue::from(value.to_string()), created_at: at, updated_at: at }
    }

    #[test]
    fn a_retry_gets_the_first_outcome_and_another_request_with_the_id_is_refused_naming_it() {
        let scope = Scope::Domain("sales".into());
        let now = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        let mut entries = Entries::new();
        entries.insert("db".into(), entry("pw-1", now));
        let info = SecretInfo { key: "db".into(), scope: scope.clone(), created_at: now, updated_at: now };
        let mut requests = Requests::default();
        requests.add("r-1", Op::Create, "db", Some(&info), now);
        requests.store(&mut entries, now).unwrap();

        let requests = Requests::of(&entries);
        let same = requests.replay("r-1", Op::Create, &scope, "db", Some(&"pw-1".to_string().into()), &entries);
        assert_eq!(same.unwrap().unwrap(), Some(info.clone()));
        assert!(requests.replay("r-2", Op::Create, &scope, "db", None, &entries).is_none(), "a new id");
        for (op, key, value) in
            [(Op::Update, "db", "pw-1"), (Op::Create, "other", "pw-1"), (Op::Create, "db", "another value")]
        {
            let refused = requests.replay("r-1", op, &scope, key, Some(&value.to_string().into()), &entries);
            match refused {
                Some(Err(Error::InvalidArgument(v))) => {
                    assert_eq!(v.field, "request_id");
                    assert!(v.description.contains("\"r-1\" was used for another request (create of \"db\""), "{v}");
                    assert!(!v.description.contains("pw-1") && !v.description.contains("another value"), "{v}");
                }
                _ => panic!("{op:?} {key} with r-1 must be refused"),
            }
        }
        // Once the secret has changed since, the value cannot be compared:
        // the same operation on the same key is taken as the retry.
        entries.insert("db".into(), entry("pw-2", now + chrono::Duration::seconds(5)));
        let later = requests.replay("r-1", Op::Create, &scope, "db", Some(&"pw-x".to_string().into()), &entries);
        assert_eq!(later.unwrap().unwrap(), Some(info));
    }

    #[test]
    fn records_are_kept_a_day_and_at_most_the_latest_256_per_object() {
        let start = DateTime::from_timestamp_millis(1_800_000_000_000).unwrap();
        let mut requests = Requests::default();
        for i in 0..300 {
            requests.add(&format!("r-{i}"), Op::Delete, "k", None, start + chrono::Duration::seconds(i));
        }
        assert_eq!(requests.0.len(), MAX_PER_OBJECT);
        assert!(
            !requests.0.contains_key("r-43") && requests.0.contains_key("r-44") && requests.0.contains_key("r-299")
        );
        requests.add("late", Op::Delete, "k", None, start + KEEP_FOR + chrono::Duration::seconds(100));
        assert!(!requests.0.contains_key("r-99") && requests.0.contains_key("r-100"), "older than a day: gone");
    }

    #[test]
    fn request_ids_are_checked_naming_the_field() {
        assert!(validate("request_id", "").is_ok());
        assert!(validate("request_id", "6f1c2d3e-0a1b-4c5d-8e9f-001122334455").is_ok());
        assert!(validate("request_id", "job:42.retry_1").is_ok());
        assert_eq!(validate("request_id", "has space").unwrap_err().field, "request_id");
        assert!(validate("request_id", &"x".repeat(129)).is_err());
    }
}
