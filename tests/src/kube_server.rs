//! A small Kubernetes API server for tests: core/v1 Secrets over real HTTP,
//! with the API server's semantics that matter to a writer: resourceVersion
//! on every object, a PUT with a stale version refused with 409 Conflict, a
//! PUT without one applied unconditionally, POST of an existing name refused
//! with 409 AlreadyExists, 404 NotFound, and 422 Invalid for keys and sizes
//! the real server rejects, all as `Status` bodies. Lists (with label
//! selectors) and watches (`?watch=true`, a stream of JSON event lines from a
//! resourceVersion, `410 Gone` for one compacted away, ended by
//! `timeoutSeconds` or by [`FakeKube::drop_watches`]) serve the store
//! objects' watchers.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use serde_json::json;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub gets: usize,
    pub creates: usize,
    pub replaces: usize,
    /// 409s sent for stale resourceVersions and existing names.
    pub conflicts: usize,
    /// PUTs that carried no resourceVersion: a real server applies them
    /// blindly, overwriting concurrent writers.
    pub unconditional_puts: usize,
    pub invalid: usize,
    /// The RBAC verbs of every request received (get, list, watch, create,
    /// update, patch, delete), for checking a Role against real use.
    pub verbs: std::collections::BTreeSet<String>,
    pub lists: usize,
    /// Watch requests (each one a new watch connection).
    pub watches: usize,
    /// For each label selector watches used: the Secrets sent to them.
    pub delivered: BTreeMap<String, std::collections::BTreeSet<String>>,
}

type Body = BoxBody<Bytes, Infallible>;

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    version: u64,
    kind: &'static str,
    namespace: String,
    secret: Secret,
}

/// An open watch: where its events go, and what it selects.
struct Watcher {
    id: u64,
    namespace: String,
    selector: Vec<(String, Option<String>)>,
    /// The selector as sent.
    raw: String,
    /// It asked for bookmarks (`allowWatchBookmarks=true`).
    bookmarks: bool,
    sender: tokio::sync::mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<(String, String), Secret>,
    next_version: u64,
    counters: Counters,
    /// While set, every request gets this status (an API server outage).
    failing: Option<u16>,
    /// While set, writes are denied with 422 Invalid and this message, as a
    /// validating admission policy does.
    denying_writes: Option<String>,
    /// Every change since the last compaction.
    changes: Vec<Change>,
    /// Watches from versions below this get 410 Gone.
    compacted_below: u64,
    watchers: Vec<Watcher>,
    /// While set, open watches are sent nothing (a lagging watch).
    holding: bool,
    /// While set, a write is applied and its answer sent this much later
    /// (an API server or network that stalls after taking the request).
    answering_writes_after: Option<std::time::Duration>,
}

#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl FakeKube {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake kube");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State { next_version: 1000, ..Default::default() }));
        let served = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url: format!("http://{addr}"), state }
    }

    pub fn counters(&self) -> Counters {
        self.state.lock().unwrap().counters.clone()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.state.lock().unwrap().objects.get(&(namespace.into(), name.into())).cloned()
    }

    /// Stores a Secret as another tool would have written it.
    pub fn insert(&self, namespace: &str, secret: Secret) {
        let mut s = self.state.lock().unwrap();
        let mut secret = secret;
        s.next_version += 1;
        secret.metadata.resource_version = Some(s.next_version.to_string());
        secret.metadata.namespace = Some(namespace.into());
        let name = secret.metadata.name.clone().expect("name");
        let kind = if s.objects.contains_key(&(namespace.into(), name.clone())) { "MODIFIED" } else { "ADDED" };
        s.objects.insert((namespace.into(), name), secret.clone());
        record(&mut s, kind, namespace, secret);
    }

    /// Changes a Secret as `kubectl edit` would: a new resourceVersion, and
    /// a MODIFIED event for the watches.
    pub fn edit(&self, namespace: &str, name: &str, edit: impl FnOnce(&mut Secret)) {
        let mut s = self.state.lock().unwrap();
        let key = (namespace.to_string(), name.to_string());
        let mut secret = s.objects.get(&key).cloned().expect("the Secret exists");
        edit(&mut secret);
        s.next_version += 1;
        secret.metadata.resource_version = Some(s.next_version.to_string());
        s.objects.insert(key, secret.clone());
        record(&mut s, "MODIFIED", namespace, secret);
    }

    /// Ends every open watch, as an API server restart or a load balancer
    /// cutting long connections does.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// While `hold`, open watches receive no events (they lag behind).
    pub fn hold_events(&self, hold: bool) {
        self.state.lock().unwrap().holding = hold;
    }

    /// Sends a BOOKMARK with the current resourceVersion to every open
    /// watch that allows bookmarks (as the API server does now and then):
    /// a watch resumed from it needs no history before it. The number of
    /// watches it went to.
    pub fn bookmark(&self) -> usize {
        let s = self.state.lock().unwrap();
        let line = json!({"type": "BOOKMARK", "object": {"kind": "Secret", "apiVersion": "v1",
                          "metadata": {"resourceVersion": s.next_version.to_string()}}});
        s.watchers
            .iter()
            .filter(|w| w.bookmarks)
            .filter(|w| w.sender.send(Bytes::from(format!("{line}\n"))).is_ok())
            .count()
    }

    /// Forgets the history: a watch from any earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.compacted_below = s.next_version + 1;
        s.changes.clear();
    }

    pub fn set_failing(&self, status: Option<u16>) {
        self.state.lock().unwrap().failing = status;
    }

    /// Applies each write at once and answers it `delay` later.
    pub fn answer_writes_after(&self, delay: Option<std::time::Duration>) {
        self.state.lock().unwrap().answering_writes_after = delay;
    }

    pub fn deny_writes(&self, message: Option<&str>) {
        self.state.lock().unwrap().denying_writes = message.map(str::to_owned);
    }

    pub async fn client(&self, namespace: &str) -> kube::Client {
        secret_service::kubernetes::KubernetesBackend::client(
            Some(&self.url),
            namespace,
            std::time::Duration::from_secs(5),
        )
        .await
        .expect("kube client")
    }
}

/// Whether `secret` carries every `key=value` of `selector`, and no label
/// a `!key` requirement (value `None`) names.
fn selected(secret: &Secret, selector: &[(String, Option<String>)]) -> bool {
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    selector.iter().all(|(k, v)| labels.get(k) == v.as_ref())
}

fn event_line(kind: &str, secret: &Secret) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": secret})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

/// Keeps `change` for later watches and sends it to the open ones.
fn record(s: &mut State, kind: &'static str, namespace: &str, secret: Secret) {
    let version = s.next_version;
    let holding = s.holding;
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut sent_to = Vec::new();
    s.watchers.retain(|w| {
        if holding {
            return true;
        }
        if w.namespace != namespace || !selected(&secret, &w.selector) {
            return !w.sender.is_closed();
        }
        sent_to.push(w.raw.clone());
        w.sender.send(event_line(kind, &secret)).is_ok()
    });
    for raw in sent_to {
        s.counters.delivered.entry(raw).or_default().insert(name.clone());
    }
    s.changes.push(Change { version, kind, namespace: namespace.to_string(), secret });
}

/// `key=value`, `key==value` and `!key` requirements, as the API server
/// reads them.
fn parse_selector(query: &BTreeMap<String, String>) -> Vec<(String, Option<String>)> {
    query
        .get("labelSelector")
        .map(|sel| {
            sel.split(',')
                .filter_map(|p| match p.strip_prefix('!') {
                    Some(absent) => Some((absent.to_string(), None)),
                    None => {
                        p.split_once('=').map(|(k, v)| (k.to_string(), Some(v.trim_start_matches('=').to_string())))
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn object(code: StatusCode, secret: &Secret) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(secret).unwrap())).boxed())
        .unwrap()
}

/// The checks the real API server makes on a Secret.
fn validate(name: &str, secret: &mut Secret) -> Result<(), String> {
    // stringData is merged into data on write and never stored.
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in strings {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
    let data = secret.data.clone().unwrap_or_default();
    for key in data.keys() {
        let ok = !key.is_empty()
            && key.len() <= 253
            && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && key != "."
            && key != ".."
            && !key.starts_with("..");
        if !ok {
            return Err(format!(
                "Secret {name:?} is invalid: data[{key}]: Invalid value: {key:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
            ));
        }
    }
    let total: usize = data.values().map(|v| v.0.len()).sum();
    if total > 1024 * 1024 {
        return Err(format!("Secret {name:?} is invalid: data: Too long: must have at most 1048576 bytes"));
    }
    let annotations: usize = secret.metadata.annotations.iter().flatten().map(|(k, v)| k.len() + v.len()).sum();
    if annotations > 256 * 1024 {
        return Err(format!(
            "Secret {name:?} is invalid: metadata.annotations: Too long: must have at most 262144 bytes"
        ));
    }
    Ok(())
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let write = matches!(*req.method(), Method::POST | Method::PUT | Method::DELETE);
    let answer = answer(state.clone(), req).await;
    let late = state.lock().unwrap().answering_writes_after;
    if let (true, Some(delay)) = (write, late) {
        tokio::time::sleep(delay).await;
    }
    answer
}

async fn answer(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_owned);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (namespace, name) = match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "secrets"] => (ns.to_string(), None),
        ["api", "v1", "namespaces", ns, "secrets", name] => (ns.to_string(), Some(name.to_string())),
        _ => {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    let mut s = state.lock().unwrap();
    let watching = query.as_deref().is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match (&method, &name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    };
    s.counters.verbs.insert(verb.to_string());
    if let Some(code) = s.failing {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return Ok(status(code, "ServiceUnavailable", "the API server is shutting down".into()));
    }
    if let Some(m) = s.denying_writes.clone()
        && matches!(method, Method::POST | Method::PUT)
    {
        s.counters.invalid += 1;
        return Ok(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m));
    }
    let parse = |body: &Bytes| serde_json::from_slice::<Secret>(body);
    let params: BTreeMap<String, String> = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            let decode = |t: &str| percent_decode(t);
            (decode(k), decode(v))
        })
        .collect();
    Ok(match (method, name) {
        (Method::GET, None) if watching => {
            s.counters.watches += 1;
            let selector = parse_selector(&params);
            let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            if from != 0 && from + 1 < s.compacted_below {
                let gone = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
                let _ = sender.send(Bytes::from(format!("{gone}\n")));
                drop(sender);
            } else {
                let raw = params.get("labelSelector").cloned().unwrap_or_default();
                let mut replayed = Vec::new();
                for c in s.changes.iter().filter(|c| c.version > from && c.namespace == namespace) {
                    if selected(&c.secret, &selector) {
                        let _ = sender.send(event_line(c.kind, &c.secret));
                        replayed.push(c.secret.metadata.name.clone().unwrap_or_default());
                    }
                }
                s.counters.delivered.entry(raw.clone()).or_default().extend(replayed);
                let timeout: u64 = params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300);
                // Only the list holds the sender: removing it ends the stream.
                let id = s.counters.watches as u64;
                let bookmarks = params.get("allowWatchBookmarks").is_some_and(|v| v == "true");
                s.watchers.push(Watcher { id, namespace, selector, raw, bookmarks, sender });
                let state = state.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(timeout)).await;
                    state.lock().unwrap().watchers.retain(|w| w.id != id);
                });
            }
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver)
                .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        (Method::GET, None) => {
            s.counters.lists += 1;
            let selector = parse_selector(&params);
            let items: Vec<&Secret> = s
                .objects
                .iter()
                .filter(|((ns, _), secret)| *ns == namespace && selected(secret, &selector))
                .map(|(_, secret)| secret)
                .collect();
            let list = json!({"kind": "SecretList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": s.next_version.to_string()}, "items": items});
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(list.to_string())).boxed())
                .unwrap()
        }
        (Method::GET, Some(name)) => {
            s.counters.gets += 1;
            match s.objects.get(&(namespace, name.clone())) {
                Some(secret) => object(StatusCode::OK, secret),
                None => status(StatusCode::NOT_FOUND, "NotFound", format!("secrets {name:?} not found")),
            }
        }
        (Method::POST, None) => {
            let Ok(mut secret) = parse(&body) else {
                return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "invalid Secret body".into()));
            };
            let name = secret.metadata.name.clone().unwrap_or_default();
            if let Err(m) = validate(&name, &mut secret) {
                s.counters.invalid += 1;
                return Ok(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m));
            }
            let key = (namespace.clone(), name.clone());
            if s.objects.contains_key(&key) {
                s.counters.conflicts += 1;
                return Ok(status(StatusCode::CONFLICT, "AlreadyExists", format!("secrets {name:?} already exists")));
            }
            s.counters.creates += 1;
            s.next_version += 1;
            secret.metadata.resource_version = Some(s.next_version.to_string());
            secret.metadata.namespace = Some(namespace);
            secret.metadata.uid = Some(format!("uid-{}", s.next_version));
            secret.metadata.creation_timestamp = Some(Time(jiff_now()));
            s.objects.insert(key.clone(), secret.clone());
            record(&mut s, "ADDED", &key.0, secret.clone());
            object(StatusCode::CREATED, &secret)
        }
        (Method::PUT, Some(name)) => {
            let Ok(mut secret) = parse(&body) else {
                return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "invalid Secret body".into()));
            };
            if let Err(m) = validate(&name, &mut secret) {
                s.counters.invalid += 1;
                return Ok(status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m));
            }
            let key = (namespace, name.clone());
            let Some(current) = s.objects.get(&key).cloned() else {
                return Ok(status(StatusCode::NOT_FOUND, "NotFound", format!("secrets {name:?} not found")));
            };
            match &secret.metadata.resource_version {
                None => s.counters.unconditional_puts += 1,
                Some(v) if Some(v) != current.metadata.resource_version.as_ref() => {
                    s.counters.conflicts += 1;
                    return Ok(status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on secrets {name:?}: the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    ));
                }
                Some(_) => {}
            }
            s.counters.replaces += 1;
            s.next_version += 1;
            secret.metadata.resource_version = Some(s.next_version.to_string());
            secret.metadata.uid = current.metadata.uid.clone();
            secret.metadata.creation_timestamp = current.metadata.creation_timestamp.clone();
            secret.metadata.namespace = current.metadata.namespace.clone();
            s.objects.insert(key.clone(), secret.clone());
            record(&mut s, "MODIFIED", &key.0, secret.clone());
            object(StatusCode::OK, &secret)
        }
        (Method::DELETE, Some(name)) => match s.objects.remove(&(namespace.clone(), name.clone())) {
            Some(mut gone) => {
                s.next_version += 1;
                gone.metadata.resource_version = Some(s.next_version.to_string());
                record(&mut s, "DELETED", &namespace, gone);
                status(StatusCode::OK, "", String::new())
            }
            None => status(StatusCode::NOT_FOUND, "NotFound", format!("secrets {name:?} not found")),
        },
        (m, _) => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{m} is not supported here")),
    })
}

/// `%XX` escapes, as label selectors arrive in a query string.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
