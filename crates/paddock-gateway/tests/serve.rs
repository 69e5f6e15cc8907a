//! The HTTP server loop's shutdown: new connections are refused as soon as it begins, a
//! request still being received keeps its connection until it ends, idle keep-alive
//! connections are closed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use paddock_gateway::{Gateway, GatewayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SERVICE_TOKEN: &str = "svc-test-token-0123456789";

/// Reads until the end of an HTTP response head; returns it.
async fn read_head(c: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut byte))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_and_lets_open_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = GatewayConfig::new(format!(
        "sqlite://{}",
        dir.path().join("paddock.db").display()
    ));
    cfg.service_token = Some(SERVICE_TOKEN.into());
    let gw = Gateway::start(cfg).await.unwrap();
    let stop = gw.shutdown_token();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(gw.serve(listener, std::future::pending()));

    // An idle keep-alive connection, after one request.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut idle).await.starts_with("HTTP/1.1 200"));

    // A request whose body is still arriving.
    let body = br#"{"name": "acme"}"#;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/orgs HTTP/1.1\r\nhost: t\r\nx-service-token: {SERVICE_TOKEN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    busy.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    stop.cancel();
    // New connections are refused at once, while the busy one is still open.
    let t0 = std::time::Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            // Refused, or reset when it reached the backlog as the listener closed.
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ),
                    "{e}"
                );
                break;
            }
            Ok(_) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(2),
                    "still accepting connections 2 s into the shutdown"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(!serving.is_finished(), "an open request must be waited for");
    // The idle connection is closed: its reader reaches the end (after the rest of the
    // first response's body).
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), r#"{"status":"ok"}"#);
    // The busy request finishes and is answered.
    busy.write_all(&body[5..]).await.unwrap();
    let head = read_head(&mut busy).await;
    assert!(
        head.starts_with("HTTP/1.1 201") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    tokio::time::timeout(Duration::from_secs(15), serving)
        .await
        .expect("the server stops once its connections are done")
        .unwrap()
        .unwrap();
}
