//! A lean HTTP/1.1 client for the round-trip measurement: one kept-alive loopback connection
//! driven by the measuring task itself, as the floor's WebSocket client is. `reqwest` hands
//! each request to a connection task (one more task wake per request and per response); this
//! client writes the request and reads the response in place, so the round trip measures the
//! gateway and the agent, not the client library.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One kept-alive HTTP/1.1 connection.
pub(crate) struct Conn {
    tcp: TcpStream,
    host: String,
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) async fn connect(port: u16) -> Conn {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        Conn {
            tcp,
            host: format!("127.0.0.1:{port}"),
            buf: Vec::with_capacity(4096),
        }
    }

    /// `POST path` with a JSON body and extra headers (`name: value` lines); returns the
    /// status and the body. Panics on anything but a `Content-Length` response.
    pub(crate) async fn post_json(
        &mut self,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\n{headers}content-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.tcp.write_all(&req).await.unwrap();
        self.buf.clear();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = resp.parse(&self.buf).unwrap() {
                let status = resp.code.unwrap();
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                    .expect("a content-length response");
                while self.buf.len() < head + len {
                    self.read_more().await;
                }
                let body = self.buf[head..head + len].to_vec();
                self.buf.drain(..head + len);
                return (status, body);
            }
            self.read_more().await;
        }
    }

    async fn read_more(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = self.tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the gateway closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }
}
