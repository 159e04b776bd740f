//! Changes made to the store while no secret-service watched it. The store
//! watch reports what changes while a replica runs; what changed while none
//! ran (all stopped, an upgrade that replaced every pod) is found on start by
//! comparing the store objects with their baselines: each object's
//! resourceVersion and key names as last recorded in the change log (never
//! a value). Every replica records what it holds one interval late, and
//! leaves out objects whose announcements are still on their way or wait
//! for the change log, so a baseline never covers a change before that
//! change was announced.
//!
//! An object whose version moved past its baseline reports its added keys as
//! created, its removed keys as deleted, and every other key as presumed
//! updated: the old values are not known, so more is reported than may have
//! happened, never less. A replica that starts while others run compares
//! only after their recorders have caught up with what it listed, so it
//! reports nothing they watched.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Weak},
    time::Duration,
};

use secrets_common::changes::ChangeLogClient;
use secrets_proto::internal::v1 as internal;
use secrets_store::{KeyChange, Snapshot};
use serde::Deserialize;

use crate::secrets::Secrets;

/// The `[changes]` table of the secret-service's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesConfig {
    /// How often each replica records the store objects as it holds them
    /// (default 10 s). A replica that starts compares the store with the
    /// baselines two intervals and 5 s after its first list.
    pub baseline_interval_seconds: u64,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        Self { baseline_interval_seconds: 10 }
    }
}

impl ChangesConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=3_600).contains(&self.baseline_interval_seconds) {
            anyhow::bail!("changes.baseline_interval_seconds must be 1 to 3600");
        }
        Ok(())
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(self.baseline_interval_seconds)
    }
}

/// One key of an object that changed while no secret-service watched it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwatched {
    pub object: String,
    pub key: String,
    pub change: KeyChange,
    /// The object's version now; for a `gone` object, its baseline's.
    pub version: u64,
    /// The whole object went.
    pub gone: bool,
}

/// object → (version, keys).
type States = HashMap<String, (u64, BTreeSet<String>)>;

fn states(snapshot: &Snapshot) -> States {
    snapshot.objects.iter().map(|o| (o.object.clone(), (o.version, o.keys.iter().cloned().collect()))).collect()
}

/// What changed while no replica watched: `listed` is the store as this
/// replica first listed it, `now` as it holds it at the comparison (the
/// watch reported what changed between the two), `baselines` as recorded.
pub fn unwatched(listed: &Snapshot, now: &Snapshot, baselines: &[internal::StoreBaseline]) -> Vec<Unwatched> {
    let (listed, current) = (states(listed), states(now));
    let unknown: BTreeSet<&str> = now.unknown.iter().map(String::as_str).collect();
    let recorded: BTreeMap<&str, &internal::StoreBaseline> = baselines.iter().map(|b| (b.object.as_str(), b)).collect();
    let mut found = Vec::new();
    let mut add = |object: &str, key: &str, change, version, gone| {
        found.push(Unwatched { object: object.to_string(), key: key.to_string(), change, version, gone })
    };
    for (object, (version, keys)) in &current {
        // Absent from the first list: the watch reported its arrival.
        let Some((first, _)) = listed.get(object) else { continue };
        let before = recorded.get(object.as_str());
        if before.is_some_and(|b| b.version >= *first) {
            continue;
        }
        let old: BTreeSet<&str> = before.map(|b| b.keys.iter().map(String::as_str).collect()).unwrap_or_default();
        for key in keys {
            let change = if old.contains(key.as_str()) { KeyChange::Updated } else { KeyChange::Created };
            add(object, key, change, *version, false);
        }
        for key in old.iter().filter(|k| !keys.contains(**k)) {
            add(object, key, KeyChange::Deleted, *version, false);
        }
    }
    for (object, (first, keys)) in &listed {
        // Listed, then gone or no longer decoding: the watch reported what
        // it held; the keys removed before the list are reported here.
        if current.contains_key(object) {
            continue;
        }
        let Some(b) = recorded.get(object.as_str()).filter(|b| b.version < *first) else { continue };
        for key in b.keys.iter().filter(|k| !keys.contains(*k)) {
            add(object, key, KeyChange::Deleted, *first, false);
        }
    }
    for (object, b) in &recorded {
        // Gone before this replica listed; one gone since, the watch reported.
        if object.is_empty()
            || listed.contains_key(*object)
            || current.contains_key(*object)
            || unknown.contains(object)
        {
            continue;
        }
        for key in &b.keys {
            add(object, key, KeyChange::Deleted, b.version, true);
        }
    }
    found
}

/// Finds and announces what changed while no replica watched, then records
/// the store objects every interval, for as long as `secrets` lives.
pub async fn keep(secrets: Weak<Secrets>, log: ChangeLogClient, config: ChangesConfig) {
    let interval = config.interval();
    // A store without a watch never has a snapshot: ask ever more rarely.
    let mut pause = Duration::from_millis(200);
    let listed = loop {
        let Some(s) = secrets.upgrade() else { return };
        if let Some(snapshot) = s.store.snapshot() {
            break snapshot;
        }
        drop(s);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    };
    // Other replicas record what they hold one interval late, every interval.
    tokio::time::sleep(interval * 2 + Duration::from_secs(5)).await;
    let mut pause = Duration::from_millis(500);
    let (baselines, recorded) = loop {
        match log.baselines().await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot read the store baselines; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
    };
    let now = {
        let Some(s) = secrets.upgrade() else { return };
        let now = s.store.snapshot().unwrap_or_else(|| listed.clone());
        if recorded {
            let found = unwatched(&listed, &now, &baselines);
            if !found.is_empty() {
                tracing::warn!(keys = found.len(), "the store changed while no secret-service watched it; announcing");
            }
            for f in found {
                s.announce_unwatched(f).await;
            }
        }
        now
    };
    // What the log holds; the first round brings it up to `now`.
    let mut held: States = baselines
        .into_iter()
        .filter(|b| !b.object.is_empty())
        .map(|b| (b.object, (b.version, b.keys.into_iter().collect())))
        .collect();
    let mut marked = recorded;
    let mut last = now;
    loop {
        tokio::time::sleep(interval).await;
        let Some(s) = secrets.upgrade() else { return };
        let Some(now) = s.store.snapshot() else { continue };
        drop(s);
        // The snapshot of an interval ago: a change in it is announced,
        // unless its announcement is still on its way or waits for the log
        // (then that object waits for a later round).
        let due = std::mem::replace(&mut last, now);
        let Some(s) = secrets.upgrade() else { return };
        if s.announcer.deferred() > 0 {
            continue;
        }
        let due_states = states(&due);
        let changed: Vec<internal::StoreBaseline> = due
            .objects
            .iter()
            .filter(|o| held.get(&o.object).is_none_or(|(v, _)| *v != o.version))
            .filter(|o| !s.order.busy(&o.object))
            .map(|o| internal::StoreBaseline { object: o.object.clone(), version: o.version, keys: o.keys.clone() })
            .collect();
        let gone: Vec<String> = held
            .keys()
            .filter(|o| !due_states.contains_key(*o) && !due.unknown.contains(o) && !s.order.busy(o))
            .cloned()
            .collect();
        drop(s);
        if changed.is_empty() && gone.is_empty() && marked {
            continue;
        }
        match log.record_baselines(changed.clone(), gone.clone()).await {
            Ok(()) => {
                for b in changed {
                    held.insert(b.object, (b.version, b.keys.into_iter().collect()));
                }
                for o in gone {
                    held.remove(&o);
                }
                marked = true;
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot record the store baselines; trying again next interval")
            }
        }
    }
}

/// Starts [`keep`] for a store that keeps a copy (the Kubernetes watch).
pub fn start(
    secrets: &Arc<Secrets>,
    log: ChangeLogClient,
    config: ChangesConfig,
) -> Option<tokio::task::JoinHandle<()>> {
    (secrets.store.backend_name() == "kubernetes").then(|| tokio::spawn(keep(Arc::downgrade(secrets), log, config)))
}

#[cfg(test)]
mod tests {
    use secrets_store::ObjectState;

    use super::*;

    fn snap(objects: &[(&str, u64, &[&str])]) -> Snapshot {
        Snapshot {
            objects: objects
                .iter()
                .map(|(o, v, keys)| ObjectState {
                    object: o.to_string(),
                    version: *v,
                    keys: keys.iter().map(|k| k.to_string()).collect(),
                })
                .collect(),
            unknown: Vec::new(),
        }
    }

    fn base(object: &str, version: u64, keys: &[&str]) -> internal::StoreBaseline {
        internal::StoreBaseline { object: object.into(), version, keys: keys.iter().map(|k| k.to_string()).collect() }
    }

    fn found(f: &[Unwatched]) -> Vec<(String, KeyChange, bool)> {
        let mut v: Vec<_> = f.iter().map(|u| (format!("{}/{}", u.object, u.key), u.change, u.gone)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn an_object_that_moved_reports_added_removed_and_presumed_keys() {
        let listed = snap(&[("s-a", 20, &["keep", "new"]), ("s-b", 5, &["x"])]);
        let baselines = [base("", 0, &[]), base("s-a", 10, &["keep", "old"]), base("s-b", 5, &["x"])];
        let f = unwatched(&listed, &listed, &baselines);
        assert_eq!(
            found(&f),
            vec![
                ("s-a/keep".into(), KeyChange::Updated, false),
                ("s-a/new".into(), KeyChange::Created, false),
                ("s-a/old".into(), KeyChange::Deleted, false),
            ]
        );
        assert!(f.iter().all(|u| u.version == 20));
    }

    #[test]
    fn objects_created_or_deleted_while_none_watched_are_reported_whole() {
        let listed = snap(&[("s-new", 7, &["a", "b"])]);
        let baselines = [base("", 0, &[]), base("s-gone", 3, &["c"])];
        let f = unwatched(&listed, &listed, &baselines);
        assert_eq!(
            found(&f),
            vec![
                ("s-gone/c".into(), KeyChange::Deleted, true),
                ("s-new/a".into(), KeyChange::Created, false),
                ("s-new/b".into(), KeyChange::Created, false),
            ]
        );
    }

    #[test]
    fn what_the_watch_saw_after_the_first_list_or_a_baseline_covers_is_not_reported() {
        let listed = snap(&[("s-a", 10, &["k"]), ("s-b", 4, &["k"])]);
        // s-a moved after the list (the watch reported it), s-c arrived, s-b went.
        let now = snap(&[("s-a", 12, &["k"]), ("s-c", 13, &["k"])]);
        // Another replica's recorder had caught up with s-a; s-b's baseline too.
        let baselines = [base("", 0, &[]), base("s-a", 10, &["k"]), base("s-b", 4, &["k"])];
        assert!(unwatched(&listed, &now, &baselines).is_empty());
    }

    #[test]
    fn keys_removed_while_none_watched_from_an_object_gone_since_are_reported() {
        let listed = snap(&[("s-a", 10, &["kept"])]);
        let now = snap(&[]);
        let baselines = [base("", 0, &[]), base("s-a", 4, &["kept", "removed"])];
        let f = unwatched(&listed, &now, &baselines);
        assert_eq!(found(&f), vec![("s-a/removed".into(), KeyChange::Deleted, false)]);
        assert_eq!(f[0].version, 10);
    }

    #[test]
    fn an_object_that_does_not_decode_is_neither_changed_nor_gone() {
        let mut listed = snap(&[]);
        listed.unknown.push("s-odd".into());
        let baselines = [base("", 0, &[]), base("s-odd", 3, &["k"])];
        assert!(unwatched(&listed, &listed, &baselines).is_empty());
    }
}
