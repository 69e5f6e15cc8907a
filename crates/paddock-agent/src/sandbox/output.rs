//! Output capture shared by every backend.
//!
//! A task's standard output and standard error are read from pipes in chunks, decoded as
//! UTF-8 incrementally (a character split across two reads is never cut; invalid bytes
//! become U+FFFD) and kept up to a cap counted in characters. Chunks are forwarded live
//! until the cap; past it the pipe is still read to EOF and discarded, so the task never
//! blocks on a full pipe and the agent's memory stays bounded whatever the task prints.
//!
//! [`Capture`] is the synchronous state machine (for backends that receive bytes rather
//! than a reader, e.g. a multiplexed container log stream); [`capture_stream`] and
//! [`capture_stream_until`] drive it from an [`AsyncRead`].

use paddock_proto::Stream;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::OutputChunk;

/// Size of one read from a pipe, in bytes.
pub const READ_CHUNK_BYTES: usize = 8 * 1024;

/// What was captured from one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The text, at most the cap in characters.
    pub text: String,
    /// More output than the cap was produced; the rest was read and discarded.
    pub truncated: bool,
}

/// Incremental, lossy UTF-8 decoder: keeps an incomplete trailing sequence for the next
/// call and replaces invalid bytes with U+FFFD.
#[derive(Debug, Default)]
struct Utf8Decoder {
    /// Bytes of a character whose remaining bytes have not arrived yet (at most 3).
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// Decodes `bytes` (after any pending bytes) and appends the text to `out`.
    fn decode(&mut self, bytes: &[u8], out: &mut String) {
        let joined;
        let mut input: &[u8] = if self.pending.is_empty() {
            bytes
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(bytes);
            joined = buf;
            &joined
        };
        loop {
            match std::str::from_utf8(input) {
                Ok(text) => {
                    out.push_str(text);
                    return;
                }
                Err(err) => {
                    let (valid, rest) = input.split_at(err.valid_up_to());
                    if let Ok(text) = std::str::from_utf8(valid) {
                        out.push_str(text);
                    }
                    match err.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            input = &rest[bad..];
                        }
                        None => {
                            // A valid prefix of a character cut by the end of the input.
                            self.pending.extend_from_slice(rest);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends the input: an incomplete trailing sequence becomes U+FFFD.
    fn finish(&mut self, out: &mut String) {
        if !self.pending.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.pending));
            self.pending.clear();
        }
    }
}

/// Capture state of one stream: decodes bytes, counts characters and enforces the cap.
#[derive(Debug)]
pub struct Capture {
    max_chars: usize,
    chars: usize,
    text: String,
    truncated: bool,
    decoder: Utf8Decoder,
}

impl Capture {
    /// A capture that keeps at most `max_chars` characters.
    pub fn new(max_chars: usize) -> Self {
        Capture {
            max_chars,
            chars: 0,
            text: String::new(),
            truncated: false,
            decoder: Utf8Decoder::default(),
        }
    }

    /// Feeds raw bytes. Returns the text newly kept (to be forwarded live), if any. Once the
    /// cap has been passed, bytes are discarded without being decoded.
    pub fn push(&mut self, bytes: &[u8]) -> Option<String> {
        if self.truncated || bytes.is_empty() {
            return None;
        }
        let mut decoded = String::new();
        self.decoder.decode(bytes, &mut decoded);
        self.accept(decoded)
    }

    /// Ends the stream: an incomplete trailing character becomes U+FFFD. Returns the text
    /// newly kept, if any.
    pub fn finish(&mut self) -> Option<String> {
        if self.truncated {
            return None;
        }
        let mut decoded = String::new();
        self.decoder.finish(&mut decoded);
        self.accept(decoded)
    }

    /// Whether output past the cap was seen.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Number of characters kept so far.
    pub fn chars(&self) -> usize {
        self.chars
    }

    /// The captured text and truncation flag.
    pub fn into_captured(self) -> Captured {
        Captured {
            text: self.text,
            truncated: self.truncated,
        }
    }

    /// Keeps as much of `decoded` as the cap allows.
    fn accept(&mut self, mut decoded: String) -> Option<String> {
        if decoded.is_empty() {
            return None;
        }
        let remaining = self.max_chars.saturating_sub(self.chars);
        let count = decoded.chars().count();
        if count <= remaining {
            self.chars += count;
        } else {
            let cut = decoded
                .char_indices()
                .nth(remaining)
                .map_or(decoded.len(), |(idx, _)| idx);
            decoded.truncate(cut);
            self.chars += remaining;
            self.truncated = true;
            self.decoder.pending = Vec::new();
        }
        if decoded.is_empty() {
            return None;
        }
        self.text.push_str(&decoded);
        Some(decoded)
    }
}

/// Reads `reader` to EOF, keeping at most `max_chars` characters and forwarding chunks of
/// kept text to `tx`. Output past the cap is read and discarded. A closed `tx` does not
/// stop the capture; a read error ends it (as EOF would).
pub async fn capture_stream<R: AsyncRead + Unpin>(
    reader: R,
    stream: Stream,
    max_chars: usize,
    tx: mpsc::Sender<OutputChunk>,
) -> Captured {
    capture_stream_until(reader, stream, max_chars, tx, CancellationToken::new()).await
}

/// Like [`capture_stream`], but also stops (returning what was kept) when `stop` fires:
/// for a pipe that a process which escaped the sandbox may hold open forever. A send to
/// `tx` that waits for room is abandoned as well when `stop` fires.
pub async fn capture_stream_until<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    max_chars: usize,
    tx: mpsc::Sender<OutputChunk>,
    stop: CancellationToken,
) -> Captured {
    let mut capture = Capture::new(max_chars);
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut tx = Some(tx);
    loop {
        let read = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            read = reader.read(&mut buf) => read,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => {
                tracing::debug!(stream = stream.as_str(), error = %err, "output read failed");
                break;
            }
        };
        if let Some(data) = capture.push(&buf[..n]) {
            forward(&mut tx, stream, data, &stop).await;
        }
    }
    if let Some(data) = capture.finish() {
        forward(&mut tx, stream, data, &stop).await;
    }
    capture.into_captured()
}

/// Sends one chunk; forgets the sender when the receiver is gone or `stop` fired.
pub(crate) async fn forward(
    tx: &mut Option<mpsc::Sender<OutputChunk>>,
    stream: Stream,
    data: String,
    stop: &CancellationToken,
) {
    let Some(sender) = tx.as_ref() else {
        return;
    };
    let chunk = OutputChunk { stream, data };
    let sent = tokio::select! {
        biased;
        sent = sender.send(chunk) => sent.is_ok(),
        () = stop.cancelled() => false,
    };
    if !sent {
        *tx = None;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use tokio::io::{AsyncWriteExt, ReadBuf};

    use super::*;

    /// Yields its data one byte per read.
    struct OneByte {
        data: Vec<u8>,
        pos: usize,
    }

    impl AsyncRead for OneByte {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.pos < self.data.len() {
                let byte = self.data[self.pos];
                buf.put_slice(&[byte]);
                self.pos += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Produces `remaining` bytes of `b'x'` without holding them, counting what was read.
    struct Flood {
        remaining: usize,
        read: Arc<AtomicUsize>,
    }

    impl AsyncRead for Flood {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.remaining.min(buf.remaining());
            buf.put_slice(&vec![b'x'; n]);
            self.remaining -= n;
            self.read.fetch_add(n, Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
    }

    fn drain(mut rx: mpsc::Receiver<OutputChunk>) -> Vec<OutputChunk> {
        let mut out = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            out.push(chunk);
        }
        out
    }

    fn joined(chunks: &[OutputChunk]) -> String {
        chunks.iter().map(|c| c.data.as_str()).collect()
    }

    #[tokio::test]
    async fn multibyte_chars_split_across_reads_are_kept_whole() {
        let text = "héllo € 𝄞 wörld 日本";
        let reader = OneByte {
            data: text.as_bytes().to_vec(),
            pos: 0,
        };
        let (tx, rx) = mpsc::channel(1024);
        let got = capture_stream(reader, Stream::Stdout, 1000, tx).await;
        assert_eq!(got.text, text);
        assert!(!got.truncated);
        let chunks = drain(rx);
        assert_eq!(joined(&chunks), text);
        assert!(chunks.iter().all(|c| c.stream == Stream::Stdout));
        assert!(chunks.iter().all(|c| !c.data.contains('\u{FFFD}')));
    }

    #[test]
    fn push_holds_incomplete_sequences() {
        let mut cap = Capture::new(10);
        assert_eq!(cap.push(&[0xE2]), None);
        assert_eq!(cap.push(&[0x82]), None);
        assert_eq!(cap.push(&[0xAC, b'a']).as_deref(), Some("€a"));
        assert_eq!(cap.chars(), 2);
        assert_eq!(cap.finish(), None);
        assert_eq!(cap.into_captured().text, "€a");
    }

    #[tokio::test]
    async fn invalid_bytes_become_replacement_characters() {
        let (tx, _rx) = mpsc::channel(16);
        let got = capture_stream(&b"a\xffb\xc3"[..], Stream::Stderr, 100, tx).await;
        assert_eq!(got.text, "a\u{FFFD}b\u{FFFD}");
        assert!(!got.truncated);
    }

    #[tokio::test]
    async fn cap_exactly_at_boundary_is_not_truncated() {
        let (tx, rx) = mpsc::channel(16);
        let got = capture_stream(
            OneByte {
                data: "héllo".into(),
                pos: 0,
            },
            Stream::Stdout,
            5,
            tx,
        )
        .await;
        assert_eq!(got.text, "héllo");
        assert!(!got.truncated);
        assert_eq!(joined(&drain(rx)), "héllo");
    }

    #[tokio::test]
    async fn one_char_past_the_cap_truncates() {
        let (tx, rx) = mpsc::channel(16);
        let got = capture_stream("héllo!".as_bytes(), Stream::Stdout, 5, tx).await;
        assert_eq!(got.text, "héllo");
        assert!(got.truncated);
        assert_eq!(joined(&drain(rx)), "héllo");

        let (tx, _rx) = mpsc::channel(16);
        let got = capture_stream("日本語です".as_bytes(), Stream::Stdout, 3, tx).await;
        assert_eq!(got.text, "日本語");
        assert!(got.truncated);

        let (tx, rx) = mpsc::channel(16);
        let got = capture_stream(&b"x"[..], Stream::Stdout, 0, tx).await;
        assert_eq!(got.text, "");
        assert!(got.truncated);
        assert!(drain(rx).is_empty());
    }

    #[tokio::test]
    async fn forwarding_stops_at_the_cap_across_many_reads() {
        let data = "ab".repeat(20_000);
        let (tx, rx) = mpsc::channel(1024);
        let got = capture_stream(data.as_bytes(), Stream::Stdout, 10_001, tx).await;
        assert_eq!(got.text.chars().count(), 10_001);
        assert!(got.truncated);
        assert_eq!(joined(&drain(rx)), got.text);
    }

    #[tokio::test]
    async fn large_input_is_read_to_eof_and_stays_bounded() {
        let read = Arc::new(AtomicUsize::new(0));
        let total = 50 * 1024 * 1024;
        let reader = Flood {
            remaining: total,
            read: Arc::clone(&read),
        };
        let (tx, rx) = mpsc::channel(1024);
        let got = capture_stream(reader, Stream::Stdout, 1000, tx).await;
        assert_eq!(got.text.len(), 1000);
        assert!(got.text.capacity() < 64 * 1024, "kept memory is bounded");
        assert!(got.truncated);
        assert_eq!(read.load(Ordering::Relaxed), total, "read to EOF");
        let chunks = drain(rx);
        assert_eq!(joined(&chunks).len(), 1000);
    }

    #[tokio::test]
    async fn closed_channel_does_not_stop_capture() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let (mut w, r) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for _ in 0..100 {
                w.write_all(b"0123456789").await.unwrap();
            }
        });
        let got = capture_stream(r, Stream::Stdout, 10_000, tx).await;
        writer.await.unwrap();
        assert_eq!(got.text, "0123456789".repeat(100));
        assert!(!got.truncated);
    }

    #[tokio::test]
    async fn stop_ends_a_stream_that_never_closes() {
        let (mut w, r) = tokio::io::duplex(64);
        w.write_all("partial €".as_bytes()).await.unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(capture_stream_until(
            r,
            Stream::Stdout,
            100,
            tx,
            stop.clone(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stop.cancel();
        let got = tokio::time::timeout(std::time::Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.text, "partial €");
        drop(w);
    }
}
