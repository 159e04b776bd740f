//! A small Kubernetes API server for tests: core/v1 Secrets over real HTTP,
//! with the API server's semantics that matter to a writer: resourceVersion
//! on every object, a PUT with a stale version refused with 409 Conflict, a
//! PUT without one applied unconditionally, POST of an existing name refused
//! with 409 AlreadyExists, 404 NotFound, and 422 Invalid for keys and sizes
//! the real server rejects, all as `Status` bodies.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
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
        s.objects.insert((namespace.into(), name), secret);
    }

    pub fn set_failing(&self, status: Option<u16>) {
        self.state.lock().unwrap().failing = status;
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

fn status(code: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn object(code: StatusCode, secret: &Secret) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(secret).unwrap())))
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

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
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
    Ok(match (method, name) {
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
            s.objects.insert(key, secret.clone());
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
            s.objects.insert(key, secret.clone());
            object(StatusCode::OK, &secret)
        }
        (Method::DELETE, Some(name)) => match s.objects.remove(&(namespace, name.clone())) {
            Some(_) => status(StatusCode::OK, "", String::new()),
            None => status(StatusCode::NOT_FOUND, "NotFound", format!("secrets {name:?} not found")),
        },
        (m, _) => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{m} is not supported here")),
    })
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
