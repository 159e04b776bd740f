//! Admission control: a server takes at most `max_in_flight` calls of one
//! gRPC service at a time and lets at most `max_queued` more wait, each at
//! most `queue_wait_ms` (less when its own deadline comes sooner). Past that
//! a call is answered at once with `RESOURCE_EXHAUSTED` and a `RetryInfo`,
//! instead of piling up until every caller times out. In flight, queued and
//! shed calls are metrics (`secrets_admission_*`).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::observe::Metrics;

/// How long a shed caller is told to wait before it retries.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

/// The bounds of one server, the same for each of its gRPC services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_queued: usize,
    pub queue_wait: Duration,
}

/// Why a call was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// `max_queued` calls were already waiting.
    QueueFull,
    /// It waited `queue_wait` (or until its deadline was near) for a turn.
    WaitedTooLong(Duration),
}

/// One gRPC service's turns and counts.
struct Class {
    permits: Arc<Semaphore>,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
}

/// The settings a refusal names, so the operator knows what to raise.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub in_flight: &'static str,
    pub queued: &'static str,
    pub wait: &'static str,
}

/// A server's own bounds: the `[server]` table.
pub const SERVER_SETTINGS: Settings =
    Settings { in_flight: "server.max_in_flight", queued: "server.max_queued", wait: "server.queue_wait_ms" };

/// One server's admission, by gRPC service (or one backend's, by kind of
/// call).
pub struct Admission {
    server: &'static str,
    settings: Settings,
    limits: Limits,
    metrics: Metrics,
    classes: Mutex<HashMap<String, Arc<Class>>>,
}

/// A call's turn: in flight until dropped.
pub struct Turn {
    _permit: OwnedSemaphorePermit,
    class: Arc<Class>,
    metrics: Metrics,
    rpc_service: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let in_flight = self.class.in_flight.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.admission_state(&self.rpc_service, in_flight, self.class.queued.load(Ordering::SeqCst));
    }
}

/// Takes a waiting call off the queue when it stops waiting, however it stops.
struct Waiting<'a> {
    class: &'a Class,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.class.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(server: &'static str, limits: Limits, metrics: Metrics) -> Self {
        Self::with_settings(server, SERVER_SETTINGS, limits, metrics)
    }

    /// Bounds named by other settings: a backend's (`kubernetes.*`).
    pub fn with_settings(server: &'static str, settings: Settings, limits: Limits, metrics: Metrics) -> Self {
        Self { server, settings, limits, metrics, classes: Mutex::default() }
    }

    fn class(&self, rpc_service: &str) -> Arc<Class> {
        let mut classes = self.classes.lock().unwrap_or_else(|e| e.into_inner());
        classes
            .entry(rpc_service.to_string())
            .or_insert_with(|| {
                Arc::new(Class {
                    permits: Arc::new(Semaphore::new(self.limits.max_in_flight)),
                    in_flight: AtomicUsize::new(0),
                    queued: AtomicUsize::new(0),
                })
            })
            .clone()
    }

    /// A turn for a call of `rpc_service`, at once or after waiting in the
    /// queue; or why not.
    pub async fn admit(&self, rpc_service: &str, deadline: Option<Instant>) -> Result<Turn, Shed> {
        let class = self.class(rpc_service);
        let permit = match class.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if class.queued.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queued {
                    class.queued.fetch_sub(1, Ordering::SeqCst);
                    return Err(self.shed(rpc_service, Shed::QueueFull));
                }
                let waiting = Waiting { class: &class };
                self.metrics.admission_state(
                    rpc_service,
                    class.in_flight.load(Ordering::SeqCst),
                    class.queued.load(Ordering::SeqCst),
                );
                let wait = deadline
                    .map(crate::deadline::for_a_hop)
                    .map_or(self.limits.queue_wait, |left| left.min(self.limits.queue_wait));
                let got = tokio::time::timeout(wait, class.permits.clone().acquire_owned()).await;
                drop(waiting);
                match got {
                    Ok(Ok(permit)) => permit,
                    _ => return Err(self.shed(rpc_service, Shed::WaitedTooLong(wait))),
                }
            }
        };
        let in_flight = class.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.admission_state(rpc_service, in_flight, class.queued.load(Ordering::SeqCst));
        Ok(Turn { _permit: permit, class, metrics: self.metrics.clone(), rpc_service: rpc_service.to_string() })
    }

    fn shed(&self, rpc_service: &str, shed: Shed) -> Shed {
        let reason = match shed {
            Shed::QueueFull => "queue_full",
            Shed::WaitedTooLong(_) => "waited_too_long",
        };
        self.metrics.admission_shed(rpc_service, reason);
        shed
    }

    /// What a shed caller hears: `RESOURCE_EXHAUSTED` naming this server
    /// and the bound, with a `RetryInfo`.
    pub fn refusal(&self, rpc_service: &str, shed: Shed) -> Status {
        let Limits { max_in_flight, max_queued, .. } = self.limits;
        let Settings { in_flight, queued, wait } = self.settings;
        let why = match shed {
            Shed::QueueFull => format!(
                "{max_in_flight} calls of {rpc_service} are in flight and {max_queued} more are waiting \
                 ({in_flight}, {queued})"
            ),
            Shed::WaitedTooLong(waited) => format!(
                "waited {} ms for one of the {max_in_flight} turns of {rpc_service} ({wait}, or the call's deadline)",
                waited.as_millis()
            ),
        };
        Status::with_error_details(
            Code::ResourceExhausted,
            format!("{}: too busy: {why}; retry in {} ms", self.server, RETRY_AFTER.as_millis()),
            ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_in_flight: usize, max_queued: usize, queue_wait_ms: u64) -> Arc<Admission> {
        let limits = Limits { max_in_flight, max_queued, queue_wait: Duration::from_millis(queue_wait_ms) };
        Arc::new(Admission::new("test-service", limits, Metrics::new()))
    }

    #[tokio::test]
    async fn past_the_turns_calls_wait_in_a_bounded_queue_and_past_that_are_shed_at_once() {
        let a = admission(1, 1, 60_000);
        let first = a.admit("svc.A", None).await.unwrap();
        let queued = tokio::spawn({
            let a = a.clone();
            async move { a.admit("svc.A", None).await.map(|_| ()) }
        });
        while a.class("svc.A").queued.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.admit("svc.A", None).await.err(), Some(Shed::QueueFull), "one waits already");
        assert!(a.admit("svc.B", None).await.is_ok(), "another gRPC service has turns of its own");
        drop(first);
        assert_eq!(queued.await.unwrap(), Ok(()), "the waiting call gets the freed turn");
        let text = a.metrics.render();
        assert!(text.contains("secrets_admission_shed_total{rpc_service=\"svc.A\",reason=\"queue_full\"} 1"), "{text}");
    }

    #[tokio::test]
    async fn a_call_waits_no_longer_than_the_bound_or_its_deadline() {
        let a = admission(1, 8, 50);
        let _first = a.admit("svc.A", None).await.unwrap();
        assert_eq!(a.admit("svc.A", None).await.err(), Some(Shed::WaitedTooLong(Duration::from_millis(50))));
        let near = Instant::now() + Duration::from_millis(30);
        match a.admit("svc.A", Some(near)).await.err() {
            Some(Shed::WaitedTooLong(waited)) => assert!(waited < Duration::from_millis(50), "{waited:?}"),
            other => panic!("expected a shed call, got {other:?}"),
        }
        assert_eq!(a.class("svc.A").queued.load(Ordering::SeqCst), 0, "nobody is left counted as waiting");
        let refusal = a.refusal("svc.A", Shed::QueueFull);
        assert_eq!(refusal.code(), Code::ResourceExhausted);
        assert!(
            refusal.message().starts_with("test-service: too busy: 1 calls of svc.A are in flight"),
            "{}",
            refusal.message()
        );
        assert_eq!(refusal.get_error_details().retry_info().and_then(|r| r.retry_delay), Some(RETRY_AFTER));
    }
}
