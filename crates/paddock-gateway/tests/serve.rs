//! The HTTP server loop's shutdown: new connections are refused as soon as it begins, a
//! request still being received keeps its connection until it ends, idle keep-alive
//! connections are closed, and agents' WebSocket sessions are told to reconnect and closed.
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

/// The next item of `s`, within 10 s.
async fn next_frame<S: futures_util::Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a frame within 10 s")
}

/// An agent's WebSocket session, upgraded through the server loop, is ended by the shutdown:
/// the agent reads `UNAVAILABLE` (reconnect) and a Close, the server stops without waiting
/// for the agent to hang up, and a new upgrade is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_agent_sessions_and_refuses_new_ones() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let dir = tempfile::tempdir().unwrap();
    let cfg = GatewayConfig::new(format!(
        "sqlite://{}",
        dir.path().join("paddock.db").display()
    ));
    let gw = Gateway::start(cfg).await.unwrap();
    let org = gw.state().store.create_org("acme").await.unwrap();
    let (_, token) = gw
        .state()
        .store
        .issue_managed_agent(&org.id, "agent-1", &[])
        .await
        .unwrap();
    let stop = gw.shutdown_token();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(gw.serve(listener, std::future::pending()));
    let request = || {
        let mut r = format!("ws://{addr}/ws/executor")
            .into_client_request()
            .unwrap();
        r.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(request()).await.unwrap();
    let hello = paddock_proto::AgentMessage::Hello(paddock_proto::Hello {
        protocol: paddock_proto::PROTOCOL_VERSION,
        agent_version: "0.0.0-test".into(),
        capabilities: paddock_proto::Capabilities {
            kinds: vec!["agent.noop".into()],
            connectors: vec![],
            tags: vec![],
            max_in_flight: 1,
            backends: vec![],
        },
        running: vec![],
    });
    ws.send(Message::text(serde_json::to_string(&hello).unwrap()))
        .await
        .unwrap();
    let first = next_frame(&mut ws).await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("hello_ok"), "{first:?}");

    stop.cancel();
    let mut told = None;
    loop {
        match next_frame(&mut ws).await {
            Some(Ok(Message::Text(t))) => {
                let msg: serde_json::Value = serde_json::from_str(&t).unwrap();
                if msg["type"] == "error" {
                    told = Some(msg);
                }
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the session ended without a Close: {e}"),
        }
    }
    let told = told.expect("an error before the Close");
    assert_eq!(told["code"], "UNAVAILABLE", "{told}");
    assert!(
        told["message"].as_str().unwrap().contains("reconnect"),
        "{told}"
    );
    tokio::time::timeout(Duration::from_secs(15), serving)
        .await
        .expect("the server stops with the agent still connected")
        .unwrap()
        .unwrap();
    assert!(
        tokio_tungstenite::connect_async(request()).await.is_err(),
        "a new session after the shutdown"
    );
    drop(ws);
}
