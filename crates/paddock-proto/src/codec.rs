//! Frame codec: from WebSocket frames to typed messages and back.
//!
//! Transport-neutral: the gateway (axum) and the agent (tungstenite) each convert their
//! library's message type into [`Frame`], so session logic is written over
//! `Stream<Item = Frame>` / `Sink<Frame>` and unit-tested with channels. Decoding never
//! panics: oversize and malformed input become [`FrameError`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{AgentMessage, ErrorCode, GatewayMessage};

/// A transport-neutral WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame (all protocol messages are text).
    Text(String),
    /// A binary frame (not used by protocol v1; refused).
    Binary(Vec<u8>),
    /// Transport ping/pong; ignored by the session logic.
    Ping,
    /// The peer closed the connection.
    Close,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame is larger than the configured limit.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Size of the frame.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The frame is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Binary frames are not part of protocol v1.
    #[error("binary frames are not supported")]
    Binary,
}

impl FrameError {
    /// The stable code reported to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::Binary => ErrorCode::MalformedFrame,
        }
    }
}

fn decode<T: DeserializeOwned>(frame: &Frame, max: usize) -> Result<Option<T>, FrameError> {
    match frame {
        Frame::Text(text) => {
            if text.len() > max {
                return Err(FrameError::TooLarge {
                    len: text.len(),
                    max,
                });
            }
            serde_json::from_str(text)
                .map(Some)
                .map_err(|e| FrameError::Malformed(e.to_string()))
        }
        Frame::Binary(b) if b.len() > max => Err(FrameError::TooLarge { len: b.len(), max }),
        Frame::Binary(_) => Err(FrameError::Binary),
        Frame::Ping | Frame::Close => Ok(None),
    }
}

/// Decodes a frame sent by an agent. `Ok(None)` for control frames.
///
/// # Errors
/// Oversize, binary or malformed frames.
pub fn decode_agent(frame: &Frame, max: usize) -> Result<Option<AgentMessage>, FrameError> {
    decode(frame, max)
}

/// Decodes a frame sent by a gateway. `Ok(None)` for control frames.
///
/// # Errors
/// Oversize, binary or malformed frames.
pub fn decode_gateway(frame: &Frame, max: usize) -> Result<Option<GatewayMessage>, FrameError> {
    decode(frame, max)
}

/// Encodes a message as a text frame.
pub fn encode<T: Serialize>(msg: &T) -> Frame {
    // Serialising these plain data types cannot fail (no maps with non-string keys).
    Frame::Text(serde_json::to_string(msg).unwrap_or_else(|_| String::from("{}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    #[test]
    fn hello_round_trip_uses_documented_field_names() {
        let msg = AgentMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            capabilities: Capabilities {
                kinds: vec!["agent.execute".into()],
                connectors: vec![],
                tags: vec!["east".into()],
                max_in_flight: 4,
                backends: vec!["host".into()],
            },
            running: vec![],
        });
        let Frame::Text(text) = encode(&msg) else {
            panic!("text frame expected")
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "hello");
        assert_eq!(v["capabilities"]["maxInFlight"], 4);
        assert_eq!(v["agentVersion"], "0.1.0");
        let back = decode_agent(&Frame::Text(text), DEFAULT_MAX_FRAME_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn hello_defaults_max_in_flight_to_ten() {
        let f = Frame::Text(
            r#"{"type":"hello","protocol":1,"agentVersion":"x","capabilities":{}}"#.into(),
        );
        let Some(AgentMessage::Hello(h)) = decode_agent(&f, 1024).unwrap() else {
            panic!("hello expected")
        };
        assert_eq!(h.capabilities.max_in_flight, 10);
    }

    #[test]
    fn oversize_and_malformed_frames_are_errors() {
        let big = Frame::Text("x".repeat(2048));
        assert_eq!(
            decode_agent(&big, 1024).unwrap_err(),
            FrameError::TooLarge {
                len: 2048,
                max: 1024
            }
        );
        for bad in [
            "",
            "{",
            "null",
            "[]",
            r#"{"type":"nope"}"#,
            r#"{"type":"result"}"#,
            r#"{"type":"accepted","taskId":1,"attempt":"x"}"#,
        ] {
            let err = decode_agent(&Frame::Text(bad.into()), 1024).unwrap_err();
            assert_eq!(err.code(), ErrorCode::MalformedFrame, "input {bad:?}");
        }
        assert_eq!(
            decode_gateway(&Frame::Binary(vec![1, 2]), 1024).unwrap_err(),
            FrameError::Binary
        );
        assert_eq!(decode_gateway(&Frame::Ping, 1024).unwrap(), None);
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes() {
        // A small deterministic generator: xorshift over printable and JSON-ish bytes.
        let alphabet = br#"{}[]":,.0123456789abcdefghijklmnopqrstuvwxyz_-\ tnfu"#;
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let mut s = String::new();
            for _ in 0..(len % 97) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push(alphabet[(state % alphabet.len() as u64) as usize] as char);
            }
            let _ = decode_agent(&Frame::Text(s.clone()), 64);
            let _ = decode_gateway(&Frame::Text(s), 64);
        }
    }
}
