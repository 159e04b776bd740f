//! An OpenID Connect provider for tests: a discovery document and a JWKS
//! over HTTP, ES256 keys made in the test, and tokens it signs. The same
//! server stands for Keycloak (user tokens) and for a Kubernetes API
//! server's service-account issuer.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// One signing key: its id, private key (PKCS#8) and public JWK.
pub struct SigningKey {
    pub kid: String,
    pkcs8: Vec<u8>,
    pub jwk: Value,
}

impl SigningKey {
    pub fn generate(kid: &str) -> Self {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..]),
        });
        Self { kid: kid.to_string(), pkcs8: pair.serialize_der(), jwk }
    }

    /// The public key's raw bytes (for the HS256-with-a-public-key attack).
    pub fn public_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.jwk).unwrap()
    }

    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8)).expect("sign")
    }
}

struct State {
    keys: Vec<Value>,
}

/// The provider; `issuer` is its URL and the `iss` of its tokens.
#[derive(Clone)]
pub struct FakeOidc {
    pub issuer: String,
    state: Arc<Mutex<State>>,
    down: Arc<AtomicBool>,
    /// GETs of the key set so far.
    pub key_fetches: Arc<AtomicUsize>,
}

impl FakeOidc {
    /// Serves the public halves of `keys`.
    pub async fn start(keys: &[&SigningKey]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind oidc");
        let addr: SocketAddr = listener.local_addr().unwrap();
        let oidc = Self {
            issuer: format!("http://{addr}/realms/platform"),
            state: Arc::new(Mutex::new(State { keys: keys.iter().map(|k| k.jwk.clone()).collect() })),
            down: Arc::new(AtomicBool::new(false)),
            key_fetches: Arc::new(AtomicUsize::new(0)),
        };
        let served = oidc.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let oidc = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let oidc = oidc.clone();
                        async move { Ok::<_, std::convert::Infallible>(oidc.handle(req.uri().path())) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        oidc
    }

    fn handle(&self, path: &str) -> hyper::Response<Full<Bytes>> {
        let respond = |status: u16, body: Value| {
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        if self.down.load(Ordering::SeqCst) {
            return respond(503, json!({"error": "unavailable"}));
        }
        let base = self.issuer.clone();
        match path.strip_prefix("/realms/platform") {
            Some("/.well-known/openid-configuration") => respond(
                200,
                json!({"issuer": base, "jwks_uri": format!("{base}/protocol/openid-connect/certs"),
                       "id_token_signing_alg_values_supported": ["ES256"]}),
            ),
            Some("/protocol/openid-connect/certs") => {
                self.key_fetches.fetch_add(1, Ordering::SeqCst);
                respond(200, json!({"keys": self.state.lock().unwrap().keys}))
            }
            _ => respond(404, json!({"error": "not found"})),
        }
    }

    /// Publishes `keys` instead (a key rotation).
    pub fn publish(&self, keys: &[&SigningKey]) {
        self.state.lock().unwrap().keys = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    /// While down, every request gets 503.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn fetches(&self) -> usize {
        self.key_fetches.load(Ordering::SeqCst)
    }

    /// Claims of a token from this issuer for `aud`, valid for an hour.
    pub fn claims(&self, aud: &str, sub: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({"iss": self.issuer, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + 3600})
    }
}
