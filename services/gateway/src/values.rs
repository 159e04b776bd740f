//! Secret values kept in the gateway's memory under a value lease from the
//! secret-service (`ValueLeases` in `secret_reader.proto`): a create,
//! update or delete returns only once this memory has forgotten every value
//! from before it, or its lease has run out, so a resolve after a write
//! never sees the old value. Only values of allowed lookups reach it (the
//! resolver asks for permission first, on every resolve); it is bounded in
//! entries and bytes, oldest first out; values are zeroized when they go.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use secrets_common::{
    SecretValue,
    auth::InternalClient,
    leases::{Giver, Leased, Memory},
    observe::{Metrics, TracedChannel},
};
use serde::Deserialize;
use tonic::Status;

use crate::resolution::{Read, Source, Target};

/// The `[value_cache]` table: how much of the secret-service's values the
/// gateway keeps in memory under a value lease.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueCacheConfig {
    /// Values (and answers that a key does not exist) kept at most.
    pub max_entries: usize,
    /// Bytes of keys and values kept at most.
    pub max_bytes: usize,
}

impl Default for ValueCacheConfig {
    fn default() -> Self {
        Self { max_entries: 100_000, max_bytes: 64 * 1024 * 1024 }
    }
}

impl ValueCacheConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_entries == 0 || self.max_bytes == 0 {
            anyhow::bail!(
                "value_cache.max_entries and value_cache.max_bytes must be at least 1 (turn the cache off with value_leases = false)"
            );
        }
        Ok(())
    }
}

type Key = (Target, String);

/// What an entry costs besides its key and value (counted twice: the map
/// and the eviction order each hold the key).
const ENTRY_OVERHEAD: usize = 128;

/// The remembered answers of the secret-service: a value, or `None` for a
/// key that does not exist.
#[derive(Default)]
pub struct Values {
    entries: HashMap<Key, Option<Arc<SecretValue>>>,
    /// Insertion order, for eviction; may name keys already gone.
    order: VecDeque<Key>,
    bytes: usize,
    limits: (usize, usize),
    evicted: u64,
    /// Where the entries, bytes and evictions are shown.
    metrics: Option<Metrics>,
}

fn weight(key: &Key, value: &Option<Arc<SecretValue>>) -> usize {
    let target = match &key.0 {
        Target::Domain(d) | Target::Vault(d) => d.len(),
        Target::Admin => 0,
    };
    ENTRY_OVERHEAD + 2 * (target + key.1.len()) + value.as_ref().map_or(0, |v| v.expose().len())
}

impl Memory for Values {
    fn clear(&mut self) {
        // Dropping the last Arc zeroizes each value (SecretValue).
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
        self.report(0);
    }
}

impl Values {
    fn insert(&mut self, key: Key, value: Option<Arc<SecretValue>>) {
        let (max_entries, max_bytes) = self.limits;
        let cost = weight(&key, &value);
        if cost > max_bytes {
            // Never kept; nor is what was kept under the key before.
            if let Some(old) = self.entries.remove(&key) {
                self.bytes -= weight(&key, &old);
            }
            self.evicted += 1;
            return;
        }
        if let Some(old) = self.entries.insert(key.clone(), value) {
            self.bytes -= weight(&key, &old);
        } else {
            self.order.push_back(key);
        }
        self.bytes += cost;
        while self.entries.len() > max_entries || self.bytes > max_bytes {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= weight(&oldest, &gone);
                self.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.order.retain(|k| entries.contains_key(k));
        }
    }

    /// Shows the entries and bytes now, and `evicted` more evictions.
    fn report(&self, evicted: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.value_cache(self.entries.len(), self.bytes, evicted);
        }
    }
}

/// A source whose answers are remembered under a value lease.
pub struct LeasedSource {
    inner: Arc<dyn Source>,
    leased: Leased<Values>,
}

impl LeasedSource {
    /// Remembers `inner`'s answers within `config`'s bounds; call
    /// [`Self::watch`] to hold the lease they need.
    pub fn new(inner: Arc<dyn Source>, config: &ValueCacheConfig, metrics: Metrics) -> Self {
        let values =
            Values { limits: (config.max_entries, config.max_bytes), metrics: Some(metrics), ..Values::default() };
        Self { inner, leased: Leased::new(values) }
    }

    /// Holds a value lease from the secret-service at `channel` for as long
    /// as the returned task runs.
    pub fn watch(&self, channel: TracedChannel, client: InternalClient) -> tokio::task::JoinHandle<()> {
        self.leased.watch(Giver::Values, channel, client)
    }
}

#[tonic::async_trait]
impl Source for LeasedSource {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn read(
        &self,
        lookups: &[&(Target, String)],
        presence_only: bool,
        within: Option<Duration>,
    ) -> Result<Vec<Option<Read>>, Status> {
        if presence_only {
            return self.inner.read(lookups, presence_only, within).await;
        }
        let mut answers: Vec<Option<Option<Read>>> = Vec::with_capacity(lookups.len());
        let epoch = {
            let state = self.leased.lock();
            let memory = state.memory();
            for lookup in lookups {
                let hit = memory.and_then(|m| m.entries.get(*lookup));
                answers.push(hit.map(|v| v.as_ref().map(|v| Read::Found((**v).clone()))));
            }
            state.epoch()
        };
        let missing: Vec<&(Target, String)> =
            lookups.iter().zip(&answers).filter(|(_, a)| a.is_none()).map(|(l, _)| *l).collect();
        if missing.is_empty() {
            return Ok(answers.into_iter().flatten().collect());
        }
        let read = self.inner.read(&missing, presence_only, within).await?;
        if read.len() != missing.len() {
            return Err(Status::internal(format!(
                "{}: answered {} of {} lookups",
                self.inner.name(),
                read.len(),
                missing.len()
            )));
        }
        let mut read = read.into_iter();
        let mut out = Vec::with_capacity(lookups.len());
        {
            let mut state = self.leased.lock();
            let mut memory = state.memory_since(epoch);
            let evicted_before = memory.as_ref().map_or(0, |m| m.evicted);
            for (lookup, answer) in lookups.iter().zip(answers) {
                let answer = match answer {
                    Some(hit) => hit,
                    None => {
                        let fresh = read.next().flatten();
                        if let Some(m) = memory.as_deref_mut() {
                            match &fresh {
                                Some(Read::Found(v)) => m.insert((*lookup).clone(), Some(Arc::new(v.clone()))),
                                None => m.insert((*lookup).clone(), None),
                                // Withheld (past the budget) and failures
                                // are answers of this call only.
                                Some(Read::Withheld | Read::Failed(_)) => {}
                            }
                        }
                        fresh
                    }
                };
                out.push(answer);
            }
            if let Some(m) = memory {
                m.report(m.evicted - evicted_before);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        (Target::Domain("finance".into()), k.to_string())
    }

    fn value(text: &str) -> Option<Arc<SecretValue>> {
        Some(Arc::new(SecretValue::from(text.to_string())))
    }

    fn values(max_entries: usize, max_bytes: usize) -> Values {
        Values { limits: (max_entries, max_bytes), ..Values::default() }
    }

    /// The bytes counted are the bytes held.
    fn consistent(v: &Values) {
        let held: usize = v.entries.iter().map(|(k, val)| weight(k, val)).sum();
        assert_eq!(v.bytes, held);
    }

    #[test]
    fn past_max_entries_the_oldest_go_first_and_are_counted() {
        let mut v = values(3, usize::MAX);
        for i in 0..5 {
            v.insert(key(&format!("k-{i}")), value("x"));
            consistent(&v);
        }
        assert_eq!(v.entries.len(), 3);
        assert!(!v.entries.contains_key(&key("k-0")) && !v.entries.contains_key(&key("k-1")));
        assert!(v.entries.contains_key(&key("k-4")));
        assert_eq!(v.evicted, 2);
    }

    #[test]
    fn past_max_bytes_values_go_until_the_rest_fits_and_one_too_large_is_never_kept() {
        let one = weight(&key("k-0"), &value("0123456789"));
        let mut v = values(100, 2 * one);
        for i in 0..3 {
            v.insert(key(&format!("k-{i}")), value("0123456789"));
            consistent(&v);
        }
        assert_eq!(v.entries.len(), 2);
        assert!(v.bytes <= 2 * one);
        assert_eq!(v.evicted, 1);
        v.insert(key("big"), value(&"x".repeat(3 * one)));
        assert!(!v.entries.contains_key(&key("big")));
        assert_eq!((v.entries.len(), v.evicted), (2, 2));
        consistent(&v);
    }

    #[test]
    fn replacing_an_entry_counts_its_bytes_once_and_not_found_is_remembered() {
        let mut v = values(10, usize::MAX);
        v.insert(key("a"), value("short"));
        v.insert(key("a"), value("a longer value"));
        v.insert(key("gone"), None);
        consistent(&v);
        assert_eq!(v.entries.len(), 2);
        assert_eq!(v.entries[&key("gone")], None);
        for _ in 0..100 {
            v.insert(key("a"), value("again"));
        }
        assert!(v.order.len() <= 2 * v.entries.len() + 16, "the eviction order does not grow with rewrites");
        v.clear();
        assert_eq!((v.entries.len(), v.bytes, v.order.len()), (0, 0, 0));
    }
}
