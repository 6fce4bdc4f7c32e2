//! TLS on the client side: HTTP/2 and HTTP/1.1 chosen by ALPN, the
//! upstream told `x-forwarded-proto: https`, a client that does not speak
//! TLS dropped, and bad certificate settings refused with their key.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-cert.pem");
const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-key.pem");
const CERT_2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/test-cert-2.pem"
);
const KEY_2: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/test-key-2.pem");
const CERT_API: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/test-cert-api.pem"
);
const KEY_API: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/test-key-api.pem"
);

fn tls_settings(upstream: &str, extra: serde_json::Value) -> shoal_core::settings::GatewaySettings {
    let mut overrides = json!({"tls_cert_file": CERT, "tls_key_file": KEY});
    for (k, v) in extra.as_object().unwrap() {
        overrides[k] = v.clone();
    }
    settings(&[upstream.to_string()], overrides)
}

fn der(file: &str) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(file).unwrap()
}

/// A TLS connection to the gateway that trusts the test certificate and
/// offers `alpn`.
async fn connect(
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    connect_as(addr, alpn, "localhost").await
}

/// [`connect`], asking for `name` (SNI) and checking the certificate
/// against it.
async fn connect_as(
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
    name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for file in [CERT, CERT_2, CERT_API] {
        roots.add(der(file)).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn http2_and_http1_over_tls_are_chosen_by_alpn_and_the_upstream_hears_https() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(&up.url(), json!({}))).await;

    // HTTP/2, as a browser would ask for it.
    let tls = connect(gw.addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = send.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    // HSTS on TLS, a year by default.
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");

    // HTTP/1.1 when the client offers only that.
    let tls = connect(gw.addr, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let response = http1_over(tls, Request::get("/y").header("host", "localhost")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert!(response.headers().contains_key("strict-transport-security"));
    assert_eq!(up.hits(), 2);

    // Never in the clear, and off with 0.
    let plain = TestGateway::start(settings(&[up.url()], json!({}))).await;
    let r = TestClient::default().get(&plain.url("/z")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key("strict-transport-security"));
    let off = TestGateway::start(tls_settings(&up.url(), json!({"hsts_max_age_secs": 0}))).await;
    let tls = connect(off.addr, &[b"http/1.1"]).await;
    let response = http1_over(tls, Request::get("/w").header("host", "localhost")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!response.headers().contains_key("strict-transport-security"));
}

#[tokio::test]
async fn a_tls_client_that_stops_reading_is_disconnected_after_send_timeout() {
    // As limits.rs's test, over TLS: the send timeout sits on the socket
    // under TLS (listener.rs), where it sees the bytes the client takes.
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(
        &up.url(),
        json!({"send_timeout_ms": 300, "max_body_bytes": 64 << 20}),
    ))
    .await;
    let size = 32usize << 20;
    let mut tls = connect(gw.addr, &[b"http/1.1"]).await;
    tls.write_all(
        format!("POST /echo HTTP/1.1\r\nHost: localhost\r\ncontent-length: {size}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    tls.write_all(&vec![b'x'; size]).await.unwrap();
    tls.flush().await.unwrap();
    // The instance's in-flight count, read over TLS like everything on
    // this listener.
    let in_flight = || async {
        let admin = connect(gw.addr, &[b"http/1.1"]).await;
        let r = http1_over(
            admin,
            Request::get("/_gateway/pools")
                .header("host", "localhost")
                .header("authorization", format!("Bearer {ADMIN_TOKEN}")),
        )
        .await;
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let pools: serde_json::Value = serde_json::from_slice(&body).unwrap();
        pools["pools"][0]["instances"][0]["in_flight"].as_u64()
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight().await == Some(0) && up.hits() == 1
        })
        .await,
        "the stalled response was dropped"
    );
    let (got, closed) = read_raw(&mut tls, Duration::from_secs(10), None).await;
    assert!(closed, "the connection was closed");
    assert!(
        got.len() < size,
        "only what was in the buffers arrived: {} bytes",
        got.len()
    );
}

#[tokio::test]
async fn a_plain_http_client_on_a_tls_listener_is_dropped_without_reaching_an_upstream() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(&up.url(), json!({}))).await;
    let mut plain = TcpStream::connect(gw.addr).await.unwrap();
    plain
        .write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection is closed, not left hanging");
    assert!(
        !got.starts_with(b"HTTP/"),
        "no HTTP answer in the clear, of any status: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn past_max_connections_a_tls_listener_closes_without_answering_in_the_clear() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(&up.url(), json!({"max_connections": 1}))).await;
    let held = connect(gw.addr, &[b"http/1.1"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = TcpStream::connect(gw.addr).await.unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), refused.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "closed at once");
    assert!(got.is_empty(), "no plain-text 503 on a TLS port: {got:?}");
    drop(held);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_dropped_after_the_header_read_timeout() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(
        &up.url(),
        json!({"header_read_timeout_ms": 300}),
    ))
    .await;
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "the connection is closed");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_tls_settings_are_refused_with_their_key() {
    let cases = [
        (json!({"tls_cert_file": CERT}), "gateway.tls_key_file"),
        (json!({"tls_key_file": KEY}), "gateway.tls_cert_file"),
        (
            json!({"tls_cert_file": "/nonexistent/cert.pem", "tls_key_file": KEY}),
            "gateway.tls_cert_file",
        ),
        // A key file that holds a certificate, not a key.
        (
            json!({"tls_cert_file": CERT, "tls_key_file": CERT}),
            "gateway.tls_key_file",
        ),
    ];
    for (overrides, key) in cases {
        let s = settings(&["http://127.0.0.1:9".to_string()], overrides.clone());
        let err = shoal_gateway::Gateway::bind(s)
            .await
            .err()
            .unwrap_or_else(|| panic!("{overrides} was accepted"));
        assert!(err.to_string().contains(key), "{overrides}: {err}");
    }
}

/// POSTs to `path` over a new HTTP/1.1 TLS connection; returns the status
/// and the certificate the gateway showed.
async fn post_over_tls(
    addr: std::net::SocketAddr,
    path: &str,
) -> (StatusCode, rustls_pki_types::CertificateDer<'static>) {
    let tls = connect(addr, &[b"http/1.1"]).await;
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let req = Request::post(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"));
    (http1_over(tls, req).await.status(), shown)
}

/// Sends `req` (no body) as the only request of an HTTP/1.1 connection
/// over `tls`.
async fn http1_over(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    req: http::request::Builder,
) -> http::Response<hyper::body::Incoming> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    send.send_request(req).await.unwrap()
}

#[tokio::test]
async fn a_renewed_certificate_is_taken_up_by_a_reload_and_a_bad_one_refused() {
    let up = Upstream::start("a").await;
    let dir = std::env::temp_dir().join(format!("shoal-gateway-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(CERT, &cert).unwrap();
    std::fs::copy(KEY, &key).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             [[gateway.pools]]\nname = \"default\"\nupstreams = [\"{}\"]\n",
            cert.display(),
            key.display(),
            up.url()
        ),
    )
    .unwrap();
    let settings = shoal_core::settings::load(Some(&config), Vec::<(String, String)>::new())
        .unwrap()
        .gateway;
    let gateway = shoal_gateway::Gateway::bind(settings)
        .await
        .unwrap()
        .with_config_path(config.clone());
    let addr = gateway.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(gateway.run(stop.clone()));

    let (_, shown) = post_over_tls(addr, "/x").await;
    assert_eq!(shown, der(CERT));
    // Renewed: the files swapped, then a reload.
    std::fs::copy(CERT_2, &cert).unwrap();
    std::fs::copy(KEY_2, &key).unwrap();
    let (status, _) = post_over_tls(addr, "/_gateway/admin/reload").await;
    assert_eq!(status, StatusCode::OK);
    let (_, shown) = post_over_tls(addr, "/x").await;
    assert_eq!(
        shown,
        der(CERT_2),
        "new connections get the renewed certificate"
    );
    // A key that does not go with the certificate: refused, the running
    // certificate stays.
    std::fs::copy(KEY, &key).unwrap();
    let (status, _) = post_over_tls(addr, "/_gateway/admin/reload").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, shown) = post_over_tls(addr, "/x").await;
    assert_eq!((status, shown), (StatusCode::OK, der(CERT_2)));

    stop.cancel();
    let _ = task.await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An instance that speaks HTTP/1.1 over TLS with the test certificate:
/// `/readyz` and every other path answer 200 `secure hello`. Counts the
/// TLS connections it accepted.
async fn tls_instance() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls_pki_types::pem::PemObject;
    let certs = vec![der(CERT)];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(KEY).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        // `/echo` answers with the request's body.
                        if req.uri().path() == "/echo" {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            return Ok(hyper::Response::new(http_body_util::Full::new(
                                body.unwrap_or_default(),
                            )));
                        }
                        let mut response = hyper::Response::new(http_body_util::Full::new(
                            Bytes::from("secure hello"),
                        ));
                        // `/ws` upgrades, then echoes in capitals.
                        if req.uri().path() == "/ws" && req.headers().contains_key("upgrade") {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.expect("upgrade"));
                                let mut buf = [0u8; 256];
                                while let Ok(n @ 1..) = io.read(&mut buf).await {
                                    let up = buf[..n].to_ascii_uppercase();
                                    if io.write_all(&up).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            let headers = response.headers_mut();
                            headers.insert("upgrade", "websocket".parse().unwrap());
                            headers.insert("connection", "upgrade".parse().unwrap());
                            *response.body_mut() = http_body_util::Full::new(Bytes::new());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn a_websocket_upgrade_reaches_an_https_instance_and_bytes_flow_both_ways() {
    let (url, _) = tls_instance().await;
    let gw = TestGateway::start(settings(
        std::slice::from_ref(&url),
        json!({"upstream_ca_file": CERT}),
    ))
    .await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\n", 1))).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    c.write_all(b"over tls").await.unwrap();
    let mut echoed = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"OVER TLS");
}

#[tokio::test]
async fn https_instances_are_reached_over_tls_with_kept_alive_connections_and_checked() {
    let (url, accepted) = tls_instance().await;
    let gw = TestGateway::start(settings(
        std::slice::from_ref(&url),
        json!({"upstream_ca_file": CERT, "workers": 1, "health_interval_ms": 100}),
    ))
    .await;
    // Health checks over TLS pass: the instance stays available.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = TestClient::default();
    for _ in 0..5 {
        let r = client.get(&gw.url("/a")).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "secure hello")
        );
    }
    let instance = gw.instance(&client, &url).await;
    assert_eq!(instance["healthy"], true, "{instance}");
    // The health checker's connection and the proxy's: the five requests
    // shared one.
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        n <= 2,
        "{n} TLS connections for five requests and the checks"
    );
}

#[tokio::test]
async fn a_large_upload_reaches_an_https_instance_whole_and_comes_back() {
    let (url, _) = tls_instance().await;
    let gw = TestGateway::start(settings(
        std::slice::from_ref(&url),
        json!({"upstream_ca_file": CERT, "max_body_bytes": 16 << 20}),
    ))
    .await;
    // 4 MiB: far more than one TLS record, the inline first write, or
    // the socket buffers, so the body is written over TLS in many steps.
    let body: String = (0..4usize << 20)
        .map(|i| char::from(b'a' + (i % 23) as u8))
        .collect();
    let client = TestClient::default();
    let req = Request::post(gw.url("/echo"))
        .body(http_body_util::Full::new(Bytes::from(body.clone())))
        .unwrap();
    let reply = client.send(req).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "the echoed body differs");
}

#[tokio::test]
async fn an_https_instance_with_an_untrusted_certificate_is_refused_with_the_reason() {
    let (url, _) = tls_instance().await;
    // No upstream_ca_file: the self-signed certificate is not trusted.
    let gw = TestGateway::start(settings(&[url], json!({"health_path": ""}))).await;
    let r = TestClient::default().get(&gw.url("/a")).await;
    assert!(
        r.status == StatusCode::BAD_GATEWAY || r.status == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        r.status
    );
    assert!(r.body.contains("certificate"), "{}", r.body);
}

#[tokio::test]
async fn https_is_refused_for_h2c_pools_and_a_bad_ca_file_with_their_keys() {
    let mut s = settings(&["http://127.0.0.1:9".to_string()], json!({}));
    s.pools[0].upstreams = vec!["https://127.0.0.1:9".into()];
    s.pools[0].protocol = shoal_core::settings::UpstreamProtocol::H2c;
    let err = shoal_gateway::Gateway::bind(s).await.err().unwrap();
    assert!(
        err.to_string().contains("gateway.pools[0].upstreams[0]"),
        "{err}"
    );
    let s = settings(
        &["https://127.0.0.1:9".to_string()],
        json!({"upstream_ca_file": KEY}),
    );
    let err = shoal_gateway::Gateway::bind(s).await.err().unwrap();
    assert!(
        err.to_string().contains("gateway.upstream_ca_file"),
        "{err}"
    );
}

#[tokio::test]
async fn the_certificate_is_chosen_by_the_name_the_client_asks_for() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(tls_settings(
        &up.url(),
        json!({"tls_sni": [{"names": ["api.test", "*.shop.test"], "cert_file": CERT_API, "key_file": KEY_API}]}),
    ))
    .await;
    let shown = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    };
    let tls = connect_as(gw.addr, &[b"http/1.1"], "api.test").await;
    assert_eq!(shown(&tls), der(CERT_API));
    let tls = connect_as(gw.addr, &[b"http/1.1"], "eu.shop.test").await;
    assert_eq!(shown(&tls), der(CERT_API), "a wildcard name");
    let tls = connect_as(gw.addr, &[b"http/1.1"], "localhost").await;
    assert_eq!(shown(&tls), der(CERT), "any other name: the default");
    // And the connection serves requests.
    let tls = connect_as(gw.addr, &[b"http/1.1"], "api.test").await;
    let response = http1_over(tls, Request::get("/x").header("host", "api.test")).await;
    assert_eq!(response.status(), StatusCode::OK);

    // A bad SNI entry is refused with its key.
    let bad = tls_settings(
        &up.url(),
        json!({"tls_sni": [{"names": ["api.test"], "cert_file": CERT_API, "key_file": KEY}]}),
    );
    let err = shoal_gateway::Gateway::bind(bad).await.err().unwrap();
    assert!(
        err.to_string().contains("gateway.tls_sni[0].key_file"),
        "{err}"
    );
}
