//! Paddock wire protocol, version [`PROTOCOL_VERSION`].
//!
//! Everything that crosses a process boundary between a gateway and an agent is defined
//! here: the WebSocket messages ([`AgentMessage`], [`GatewayMessage`]), the frame codec
//! that turns bytes into messages ([`codec`]), the task specification submitted through
//! the API ([`task`]) and the stable error codes ([`ErrorCode`]). `docs/protocol.md` is the
//! prose version of this crate; keep the two in step.

pub mod codec;
pub mod codes;
pub mod messages;
pub mod task;

pub use codec::{Frame, FrameError, decode_agent, decode_gateway, encode};
pub use codes::ErrorCode;
pub use messages::*;
pub use task::*;

/// Version of the executor WebSocket protocol spoken by this build. Sent in `hello` and
/// `hello_ok`; a gateway refuses an agent whose version it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Oldest protocol version a gateway of this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Default upper bound on one WebSocket frame, in bytes. Output is chunked well below it, and
/// a `result` (two streams of at most [`MAX_OUTPUT_CHARS`] characters, at most 6 bytes each
/// once JSON-escaped) always fits.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Upper bound on an agent's per-stream output cap, so a result always fits in one frame.
pub const MAX_OUTPUT_CHARS: usize = 256 * 1024;

/// Milliseconds since the Unix epoch: the one time representation on the wire and on disk.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
