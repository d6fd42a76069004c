//! # sluice-protocol: the agent channel
//!
//! One framed, bidirectional byte channel connects the host (the executor) with
//! the guest agent that runs inside every sandbox. The agent serves the AWS
//! Lambda Runtime API to the function's `bootstrap` and relays everything to
//! the host over this channel. The transport is pluggable: a pipe pair (the
//! process sandbox), a Unix socket, or later a virtio-console/vsock stream in a
//! microVM. Only bytes cross it, so the same codec serves every transport.
//!
//! ## Wire format
//! Every frame is `u32 length (big endian) | u8 kind | body`, where `length`
//! counts `kind` and `body`. Bodies are sequences of fields: integers are
//! big-endian, byte strings and strings carry a `u32` length prefix. A frame
//! longer than the reader's limit is rejected *before* its body is read, so a
//! hostile peer cannot make the host allocate more than the limit.
//!
//! The host treats any decoding error as fatal for the sandbox: it is killed
//! and the error recorded (see `sluice-executor`).

mod codec;
mod message;

pub use codec::{DecodeError, FrameDecoder, encode, invoke_head, read_message, write_message};
pub use message::{ExitStatus, LogStream, Message, SEED_LEN, StartConfig};

/// Default upper bound of one frame: Lambda's 6 MB synchronous payload limit
/// plus room for the headers that travel with it.
pub const DEFAULT_MAX_FRAME: usize = 6 * 1024 * 1024 + 64 * 1024;

/// Lambda's limit for a synchronous request or response payload (6 MB).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
