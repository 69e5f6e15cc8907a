//! The floor: one WebSocket request/reply between two processes on loopback, with the sizes
//! of the frames one no-op task puts on the agent connection (a `dispatch` out, a `result`
//! back). The server is this bench binary re-executed with `--echo-server <reply bytes>`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Serves WebSocket connections on a free loopback port (printed on stdout), answering every
/// text frame with `reply_bytes` bytes. Runs until killed.
pub(crate) async fn serve(reply_bytes: usize) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    let reply = "r".repeat(reply_bytes);
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let reply = reply.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(Message::text(reply.clone())).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Round trips from a client in this process to the echo server in another one.
pub(crate) async fn measure(request_bytes: usize, reply_bytes: usize, n: usize) -> Vec<Duration> {
    let mut server = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--echo-server", &reply_bytes.to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let port: u16 = lines.next_line().await.unwrap().unwrap().parse().unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
        .await
        .unwrap();
    let request = "q".repeat(request_bytes);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        ws.send(Message::text(request.clone())).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        let dt = t0.elapsed();
        assert_eq!(reply.len(), reply_bytes);
        // The first tenth warms up.
        if i >= n / 10 {
            samples.push(dt);
        }
    }
    let _ = server.kill().await;
    samples
}
