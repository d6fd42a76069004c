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

pub use codec::attachment_head;
pub use codec::{DecodeError, FrameDecoder, encode, invoke_head, read_message, write_message};
pub use message::{ExitStatus, LogStream, Message, SEED_LEN, StartConfig};

/// The build identity of this protocol: an FNV-1a hash of its source
/// (`message.rs` and `codec.rs`), so that any change to the frames or their
/// fields gives another value without anyone remembering to bump a number.
///
/// The host sends it in the start frame and the agent refuses a start frame
/// with another one (or none) before reading the configuration, naming both:
/// a `sluice-agent` left over from another build then fails with "come from
/// different builds" rather than with whichever field happens to differ.
pub const PROTOCOL_FINGERPRINT: u64 =
    fnv1a(&[include_bytes!("message.rs"), include_bytes!("codec.rs")]);

const fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut p = 0;
    while p < parts.len() {
        let bytes = parts[p];
        let mut i = 0;
        while i < bytes.len() {
            hash ^= bytes[i] as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        p += 1;
    }
    hash
}

/// Default upper bound of one frame: Lambda's 6 MB synchronous payload limit
/// plus room for the headers that travel with it.
pub const DEFAULT_MAX_FRAME: usize = 6 * 1024 * 1024 + 64 * 1024;

/// Lambda's limit for a synchronous request or response payload (6 MB).
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;

/// Upper bound of an invocation's attachment ([`Message::Attachment`]): a
/// columnar payload delivered as a file in the sandbox rather than inside
/// the event (Lambda's equivalent is a payload staged in `/tmp` or S3).
pub const MAX_ATTACHMENT: usize = 128 * 1024 * 1024;

/// Upper bound of one frame the agent reads from the host: an attachment
/// plus room for its head.
pub const MAX_HOST_FRAME: usize = MAX_ATTACHMENT + 64 * 1024;

/// The host uid and gid that sandbox root maps to when the host runs as
/// root (the function's own user, 993:990, maps to one less).
pub const SANDBOX_ROOT_HOST_ID: u32 = 65534;

/// Where the agent puts an invocation's attachment inside the sandbox: a
/// file the function may read (not write) until its next invocation. The
/// event names it, e.g. `{"parquet_file": "/run/sluice/payload"}`.
pub const ATTACHMENT_PATH: &str = "/run/sluice/payload";
