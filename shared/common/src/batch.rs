//! Queues for group commit: callers queue work per key; the first caller of
//! an idle key starts a worker task, which takes the queue in arrival order,
//! a batch at a time, until it is empty. The store's group commit and the
//! usage index's saves are built on it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

/// Work waiting, per key; a key is present while its worker runs.
pub struct Queues<T> {
    inner: Arc<Mutex<HashMap<String, VecDeque<T>>>>,
}

impl<T> Clone for Queues<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<T> Default for Queues<T> {
    fn default() -> Self {
        Self { inner: Arc::default() }
    }
}

impl<T> Queues<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<T>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; true when `key` had no worker and the caller must
    /// start one (which then calls [`Queues::worker`]).
    pub fn push(&self, key: &str, item: T) -> bool {
        let mut queues = self.lock();
        match queues.get_mut(key) {
            Some(queue) => {
                queue.push_back(item);
                false
            }
            None => {
                queues.insert(key.to_string(), VecDeque::from([item]));
                true
            }
        }
    }

    /// Items waiting for `key`'s worker (not those it is working on).
    pub fn queued(&self, key: &str) -> usize {
        self.lock().get(key).map_or(0, VecDeque::len)
    }

    /// Whether `key`'s worker is running.
    pub fn working(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// The worker's side of `key`'s queue. When the worker ends for any
    /// reason (a panic, its runtime going away), the key is free again and
    /// callers still queued are answered by whatever their dropped items
    /// drop.
    pub fn worker(&self, key: &str) -> Worker<T> {
        Worker { queues: self.clone(), key: key.to_string(), done: false }
    }
}

pub struct Worker<T> {
    queues: Queues<T>,
    key: String,
    done: bool,
}

impl<T> Worker<T> {
    /// The next batch, at most `max` items in arrival order; `None` when the
    /// queue is empty and the worker must stop (the key is free from then on).
    pub fn next_batch(&mut self, max: usize) -> Option<Vec<T>> {
        let mut queues = self.queues.lock();
        match queues.get_mut(&self.key) {
            Some(queue) if !queue.is_empty() => {
                let n = queue.len().min(max.max(1));
                Some(queue.drain(..n).collect())
            }
            _ => {
                queues.remove(&self.key);
                self.done = true;
                None
            }
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if !self.done {
            self.queues.lock().remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_has_one_worker_at_a_time_and_is_free_once_its_worker_ends() {
        let queues = Queues::default();
        assert!(queues.push("a", 1), "the first item of an idle key starts a worker");
        assert!(!queues.push("a", 2) && !queues.push("a", 3), "later items join the queue");
        assert!(queues.push("b", 9), "another key is independent");
        let mut worker = queues.worker("a");
        assert_eq!(worker.next_batch(2), Some(vec![1, 2]), "in arrival order, at most max");
        assert!(!queues.push("a", 4), "the worker still runs");
        assert_eq!(worker.next_batch(10), Some(vec![3, 4]));
        assert_eq!(worker.next_batch(10), None);
        assert!(queues.push("a", 5), "an emptied key needs a new worker");

        // A worker that ends without emptying its queue (a panic) frees the key.
        drop(queues.worker("a"));
        assert_eq!(queues.queued("a"), 0);
        assert!(queues.push("a", 6));
    }
}
