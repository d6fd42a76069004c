use std::io::{self, Read, Write};

use bytes::Bytes;
use thiserror::Error;

use crate::PROTOCOL_FINGERPRINT;
use crate::message::{ExitStatus, LogStream, Message, SEED_LEN, StartConfig};

const K_START: u8 = 1;
const K_INVOKE: u8 = 2;
const K_SHUTDOWN: u8 = 3;
const K_PROCEED: u8 = 4;
const K_RESTORED: u8 = 5;
const K_ATTACHMENT: u8 = 6;
const K_UNSHARED: u8 = 16;
const K_READY: u8 = 17;
const K_RESPONSE: u8 = 18;
const K_ERROR: u8 = 19;
const K_INIT_ERROR: u8 = 20;
const K_LOG: u8 = 21;
const K_EXITED: u8 = 22;
const K_FATAL: u8 = 23;

/// Why a frame could not be decoded. Every variant means the peer broke the
/// protocol (or the transport corrupted it); the channel cannot be trusted
/// afterwards.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The length prefix announces more than the reader accepts.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// A frame with length 0 (no kind byte).
    #[error("empty frame")]
    Empty,
    /// The kind byte is not a known message.
    #[error("unknown message kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// A field runs past the end of the frame.
    #[error("{kind} frame truncated while reading {field}")]
    Truncated {
        /// Message kind being decoded.
        kind: &'static str,
        /// Field being decoded.
        field: &'static str,
    },
    /// Bytes left over after the last field.
    #[error("{kind} frame has {extra} trailing bytes")]
    Trailing {
        /// Message kind.
        kind: &'static str,
        /// Number of unread bytes.
        extra: usize,
    },
    /// A string field is not UTF-8.
    #[error("{kind} frame: field {field} is not UTF-8")]
    Utf8 {
        /// Message kind.
        kind: &'static str,
        /// Field.
        field: &'static str,
    },
    /// A field has a value outside its domain.
    #[error("{kind} frame: field {field} is invalid: {reason}")]
    Invalid {
        /// Message kind.
        kind: &'static str,
        /// Field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The start frame comes from a build of the protocol other than this
    /// one: the host and the agent were not built together.
    #[error(
        "sluice and sluice-agent come from different builds (this side speaks protocol {ours:016x}, the start frame carries {}): build both from one checkout (`cargo build --release --workspace`), or point SLUICE_AGENT at the agent built with this sluice",
        match theirs { Some(t) => format!("{t:016x}"), None => "none".to_owned() }
    )]
    ProtocolMismatch {
        /// This side's [`PROTOCOL_FINGERPRINT`](crate::PROTOCOL_FINGERPRINT).
        ours: u64,
        /// The start frame's, if it has one.
        theirs: Option<u64>,
    },
    /// The stream ended in the middle of a frame.
    #[error("channel closed in the middle of a frame")]
    UnexpectedEof,
}

/// Encode one message as a complete frame (length prefix included), in one
/// buffer of exactly the frame's size.
pub fn encode(msg: &Message) -> Vec<u8> {
    if let Message::Invoke {
        request_id,
        deadline_ms,
        invoked_function_arn,
        trace_id,
        client_context,
        payload,
    } = msg
    {
        let mut frame = invoke_head(
            request_id,
            *deadline_ms,
            invoked_function_arn,
            trace_id,
            client_context,
            payload.len(),
        );
        frame.extend_from_slice(payload);
        return frame;
    }
    // Length prefix and kind byte, filled in at the end.
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&[0; 5]);
    let kind = match msg {
        Message::Start(cfg) => {
            let json = serde_json::to_vec(cfg).expect("StartConfig serializes");
            put_bytes(&mut frame, &json);
            frame.extend_from_slice(&PROTOCOL_FINGERPRINT.to_be_bytes());
            K_START
        }
        Message::Invoke { .. } => unreachable!("encoded above"),
        Message::Attachment { data } => {
            frame.reserve_exact(4 + data.len());
            put_bytes(&mut frame, data);
            K_ATTACHMENT
        }
        Message::Shutdown => K_SHUTDOWN,
        Message::Proceed => K_PROCEED,
        Message::Restored {
            seed,
            sandbox_id,
            log_stream,
            unix_time_ns,
        } => {
            frame.extend_from_slice(seed);
            put_bytes(&mut frame, sandbox_id.as_bytes());
            put_bytes(&mut frame, log_stream.as_bytes());
            frame.extend_from_slice(&unix_time_ns.to_be_bytes());
            K_RESTORED
        }
        Message::Unshared => K_UNSHARED,
        Message::Ready { init_us } => {
            frame.extend_from_slice(&init_us.to_be_bytes());
            K_READY
        }
        Message::Response {
            request_id,
            body: b,
        } => {
            frame.reserve_exact(9 + request_id.len() + b.len());
            put_bytes(&mut frame, request_id.as_bytes());
            put_bytes(&mut frame, b);
            K_RESPONSE
        }
        Message::Error {
            request_id,
            error_type,
            body: b,
        } => {
            put_bytes(&mut frame, request_id.as_bytes());
            put_bytes(&mut frame, error_type.as_bytes());
            put_bytes(&mut frame, b);
            K_ERROR
        }
        Message::InitError {
            error_type,
            body: b,
        } => {
            put_bytes(&mut frame, error_type.as_bytes());
            put_bytes(&mut frame, b);
            K_INIT_ERROR
        }
        Message::Log { stream, line } => {
            frame.push(match stream {
                LogStream::Stdout => 1,
                LogStream::Stderr => 2,
                LogStream::Agent => 3,
            });
            put_bytes(&mut frame, line);
            K_LOG
        }
        Message::Exited(status) => {
            let (tag, v) = match status {
                ExitStatus::Code(c) => (0u8, *c),
                ExitStatus::Signal(s) => (1u8, *s),
            };
            frame.push(tag);
            frame.extend_from_slice(&v.to_be_bytes());
            K_EXITED
        }
        Message::Fatal { message } => {
            put_bytes(&mut frame, message.as_bytes());
            K_FATAL
        }
    };
    frame[4] = kind;
    let len = u32::try_from(frame.len() - 4).expect("frame fits in u32");
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame
}

/// The start of an `Invoke` frame whose payload (`payload_len` bytes)
/// follows: write this, then the payload, and the frame is complete. Lets a
/// sender put a large event on the channel without copying it into a frame
/// buffer first.
pub fn invoke_head(
    request_id: &str,
    deadline_ms: u64,
    invoked_function_arn: &str,
    trace_id: &str,
    client_context: &str,
    payload_len: usize,
) -> Vec<u8> {
    let fields = 4 * 5
        + 8
        + request_id.len()
        + invoked_function_arn.len()
        + trace_id.len()
        + client_context.len();
    let len = u32::try_from(1 + fields + payload_len).expect("frame fits in u32");
    let mut head = Vec::with_capacity(5 + fields + payload_len);
    head.extend_from_slice(&len.to_be_bytes());
    head.push(K_INVOKE);
    put_bytes(&mut head, request_id.as_bytes());
    head.extend_from_slice(&deadline_ms.to_be_bytes());
    put_bytes(&mut head, invoked_function_arn.as_bytes());
    put_bytes(&mut head, trace_id.as_bytes());
    put_bytes(&mut head, client_context.as_bytes());
    let payload_len = u32::try_from(payload_len).expect("field fits in u32");
    head.extend_from_slice(&payload_len.to_be_bytes());
    head
}

/// The head of an `Attachment` frame whose `len` bytes follow: write this,
/// then the bytes (no copy of a large attachment into a frame buffer).
pub fn attachment_head(len: usize) -> Vec<u8> {
    let len32 = u32::try_from(len).expect("field fits in u32");
    let frame_len = u32::try_from(1 + 4 + len).expect("frame fits in u32");
    let mut head = Vec::with_capacity(9);
    head.extend_from_slice(&frame_len.to_be_bytes());
    head.push(K_ATTACHMENT);
    head.extend_from_slice(&len32.to_be_bytes());
    head
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).expect("field fits in u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(b);
}

struct Fields<'a> {
    kind: &'static str,
    buf: &'a [u8],
    /// The frame as shared bytes, when the caller has it so: large fields
    /// are then sliced out of it instead of copied.
    owner: Option<&'a Bytes>,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                kind: self.kind,
                field,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        self.take(len, field)
    }
    fn shared(&mut self, field: &'static str) -> Result<Bytes, DecodeError> {
        let b = self.bytes(field)?;
        Ok(match self.owner {
            Some(owner) => owner.slice_ref(b),
            None => Bytes::copy_from_slice(b),
        })
    }
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes(field)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8 {
            kind: self.kind,
            field,
        })
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

/// Decode the contents of one frame (kind byte and body, without the length
/// prefix). With `owner` (the same bytes, shared), an invocation's payload
/// is a slice of it rather than a copy.
fn decode_frame(frame: &[u8], owner: Option<&Bytes>) -> Result<Message, DecodeError> {
    let (&kind, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    let name = match kind {
        K_START => "start",
        K_INVOKE => "invoke",
        K_SHUTDOWN => "shutdown",
        K_PROCEED => "proceed",
        K_RESTORED => "restored",
        K_ATTACHMENT => "attachment",
        K_UNSHARED => "unshared",
        K_READY => "ready",
        K_RESPONSE => "response",
        K_ERROR => "error",
        K_INIT_ERROR => "init-error",
        K_LOG => "log",
        K_EXITED => "exited",
        K_FATAL => "fatal",
        other => return Err(DecodeError::UnknownKind { kind: other }),
    };
    let mut f = Fields {
        kind: name,
        buf: body,
        owner,
    };
    let msg = match kind {
        K_START => {
            let json = f.bytes("config")?;
            // Checked before the configuration is parsed: across builds its
            // fields are what differs, and the fingerprint names the cause.
            // A start frame from before fingerprints ends after `config`.
            let theirs = if f.buf.is_empty() {
                None
            } else {
                Some(f.u64("protocol")?)
            };
            if theirs != Some(PROTOCOL_FINGERPRINT) {
                return Err(DecodeError::ProtocolMismatch {
                    ours: PROTOCOL_FINGERPRINT,
                    theirs,
                });
            }
            let cfg: StartConfig =
                serde_json::from_slice(json).map_err(|e| DecodeError::Invalid {
                    kind: name,
                    field: "config",
                    reason: e.to_string(),
                })?;
            Message::Start(Box::new(cfg))
        }
        K_INVOKE => Message::Invoke {
            request_id: f.string("request_id")?,
            deadline_ms: f.u64("deadline_ms")?,
            invoked_function_arn: f.string("invoked_function_arn")?,
            trace_id: f.string("trace_id")?,
            client_context: f.string("client_context")?,
            payload: f.shared("payload")?,
        },
        K_ATTACHMENT => Message::Attachment {
            data: f.shared("data")?,
        },
        K_SHUTDOWN => Message::Shutdown,
        K_PROCEED => Message::Proceed,
        K_RESTORED => Message::Restored {
            seed: f
                .take(SEED_LEN, "seed")?
                .try_into()
                .expect("take returns SEED_LEN bytes"),
            sandbox_id: f.string("sandbox_id")?,
            log_stream: f.string("log_stream")?,
            unix_time_ns: f.u64("unix_time_ns")?,
        },
        K_UNSHARED => Message::Unshared,
        K_READY => Message::Ready {
            init_us: f.u64("init_us")?,
        },
        K_RESPONSE => Message::Response {
            request_id: f.string("request_id")?,
            body: f.bytes("body")?.to_vec(),
        },
        K_ERROR => Message::Error {
            request_id: f.string("request_id")?,
            error_type: f.string("error_type")?,
            body: f.bytes("body")?.to_vec(),
        },
        K_INIT_ERROR => Message::InitError {
            error_type: f.string("error_type")?,
            body: f.bytes("body")?.to_vec(),
        },
        K_LOG => {
            let stream = match f.u8("stream")? {
                1 => LogStream::Stdout,
                2 => LogStream::Stderr,
                3 => LogStream::Agent,
                other => {
                    return Err(DecodeError::Invalid {
                        kind: name,
                        field: "stream",
                        reason: format!("unknown stream {other}"),
                    });
                }
            };
            Message::Log {
                stream,
                line: f.bytes("line")?.to_vec(),
            }
        }
        K_EXITED => {
            let tag = f.u8("status")?;
            let v = f.u32("value")? as i32;
            let status = match tag {
                0 => ExitStatus::Code(v),
                1 => ExitStatus::Signal(v),
                other => {
                    return Err(DecodeError::Invalid {
                        kind: name,
                        field: "status",
                        reason: format!("unknown status tag {other}"),
                    });
                }
            };
            Message::Exited(status)
        }
        K_FATAL => Message::Fatal {
            message: f.string("message")?,
        },
        _ => unreachable!("kind checked above"),
    };
    f.finish()?;
    Ok(msg)
}

/// Incremental decoder: feed it bytes as they arrive, take whole messages out.
///
/// It never buffers more than one frame header plus `max_frame` bytes: a
/// length prefix above the limit is an error as soon as it is seen.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_frame: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder that rejects frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_frame,
            failed: false,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After
    /// an error the decoder stays failed.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Invalid {
                kind: "channel",
                field: "stream",
                reason: "decoder already failed".into(),
            });
        }
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max_frame {
            self.failed = true;
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = decode_frame(&self.buf[4..4 + len], None);
        self.buf.drain(..4 + len);
        if result.is_err() {
            self.failed = true;
        }
        result.map(Some)
    }

    /// Call when the stream ended: an error if a partial frame is buffered.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedEof)
        }
    }
}

/// Read one message from a blocking reader. `Ok(None)` at a clean end of
/// stream (no partial frame). Reads exactly the frame's bytes, never more, so
/// a process can read one frame and hand the stream to a child.
pub fn read_message<R: Read + ?Sized>(r: &mut R, max_frame: usize) -> io::Result<Option<Message>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(invalid(DecodeError::UnexpectedEof)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max_frame {
        return Err(invalid(DecodeError::FrameTooLarge {
            len,
            max: max_frame,
        }));
    }
    // Read into spare capacity: no zeroing of a buffer about to be
    // overwritten (events are hundreds of KB).
    let mut frame = Vec::with_capacity(len);
    (&mut *r).take(len as u64).read_to_end(&mut frame)?;
    if frame.len() < len {
        return Err(invalid(DecodeError::UnexpectedEof));
    }
    // Shared, so that an invocation's payload is the frame's own bytes.
    let frame = Bytes::from(frame);
    decode_frame(&frame, Some(&frame))
        .map(Some)
        .map_err(invalid)
}

/// Write one message to a blocking writer and flush it.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message) -> io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

fn invalid(e: DecodeError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = ".{0,40}";
        let b = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            (s, any::<u64>(), s, s, s, b.clone()).prop_map(|(r, d, a, t, c, p)| Message::Invoke {
                request_id: r,
                deadline_ms: d,
                invoked_function_arn: a,
                trace_id: t,
                client_context: c,
                payload: p.into()
            }),
            b.clone()
                .prop_map(|d| Message::Attachment { data: d.into() }),
            Just(Message::Shutdown),
            Just(Message::Proceed),
            Just(Message::Unshared),
            (any::<[u8; SEED_LEN]>(), s, s, any::<u64>()).prop_map(
                |(seed, sandbox_id, log_stream, unix_time_ns)| Message::Restored {
                    seed,
                    sandbox_id,
                    log_stream,
                    unix_time_ns,
                }
            ),
            any::<u64>().prop_map(|init_us| Message::Ready { init_us }),
            (s, b.clone()).prop_map(|(request_id, body)| Message::Response { request_id, body }),
            (s, s, b.clone()).prop_map(|(request_id, error_type, body)| Message::Error {
                request_id,
                error_type,
                body
            }),
            (s, b.clone()).prop_map(|(error_type, body)| Message::InitError { error_type, body }),
            (0..3u8, b).prop_map(|(s, line)| Message::Log {
                stream: [LogStream::Stdout, LogStream::Stderr, LogStream::Agent][s as usize],
                line
            }),
            any::<i32>().prop_map(|c| Message::Exited(ExitStatus::Code(c))),
            any::<i32>().prop_map(|c| Message::Exited(ExitStatus::Signal(c))),
            s.prop_map(|message| Message::Fatal { message }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip_in_arbitrary_chunks(msgs in proptest::collection::vec(arb_message(), 1..8), chunk in 1usize..64) {
            let mut wire = Vec::new();
            for m in &msgs { wire.extend(encode(m)); }
            let mut dec = FrameDecoder::new(DEFAULT_MAX);
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(m) = dec.next_message().unwrap() { out.push(m); }
            }
            dec.finish().unwrap();
            prop_assert_eq!(out, msgs);
        }

        /// Random bytes never panic the decoder, and it never buffers a
        /// frame past its limit.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..97) {
            let mut dec = FrameDecoder::new(512);
            for piece in bytes.chunks(chunk) {
                dec.push(piece);
                loop {
                    match dec.next_message() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(dec.buffered() <= 4 + 512 + chunk);
            }
        }

        /// A valid frame with one byte flipped either decodes to something or
        /// is rejected; it never panics. The blocking reader agrees.
        #[test]
        fn mutated_frames_are_rejected_or_decoded(m in arb_message(), pos in any::<usize>(), bit in 0u8..8) {
            let mut wire = encode(&m);
            let i = pos % wire.len();
            wire[i] ^= 1 << bit;
            let mut dec = FrameDecoder::new(DEFAULT_MAX);
            dec.push(&wire);
            let a = dec.next_message();
            let b = read_message(&mut wire.as_slice(), DEFAULT_MAX);
            if let Ok(Some(msg)) = a { prop_assert_eq!(b.unwrap(), Some(msg)); }
        }
    }

    const DEFAULT_MAX: usize = crate::DEFAULT_MAX_FRAME;

    #[test]
    fn attachment_head_then_data_is_the_encoded_frame() {
        let data = bytes::Bytes::from_static(b"PAR1...PAR1");
        let msg = Message::Attachment { data: data.clone() };
        let mut wire = attachment_head(data.len());
        wire.extend_from_slice(&data);
        assert_eq!(wire, encode(&msg));
        assert_eq!(read_message(&mut wire.as_slice(), 1024).unwrap(), Some(msg));
    }

    #[test]
    fn invoke_head_then_payload_is_the_encoded_frame() {
        let payload = bytes::Bytes::from_static(b"{\"records\":{}}");
        let msg = Message::Invoke {
            request_id: "r-1".into(),
            deadline_ms: 7,
            invoked_function_arn: "arn:x".into(),
            trace_id: "Root=1".into(),
            client_context: String::new(),
            payload: payload.clone(),
        };
        let mut wire = invoke_head("r-1", 7, "arn:x", "Root=1", "", payload.len());
        wire.extend_from_slice(&payload);
        assert_eq!(wire, encode(&msg));
        assert_eq!(read_message(&mut wire.as_slice(), 1024).unwrap(), Some(msg));
    }

    #[test]
    fn oversized_frame_rejected_before_body_arrives() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&(1_000_000u32).to_be_bytes());
        assert_eq!(
            dec.next_message(),
            Err(DecodeError::FrameTooLarge {
                len: 1_000_000,
                max: 1024
            })
        );
        // stays failed
        assert!(dec.next_message().is_err());
    }

    #[test]
    fn unknown_kind_and_trailing_bytes() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&[0, 0, 0, 1, 99]);
        assert_eq!(
            dec.next_message(),
            Err(DecodeError::UnknownKind { kind: 99 })
        );

        let mut frame = encode(&Message::Shutdown);
        frame[3] += 1;
        frame.push(7);
        let mut dec = FrameDecoder::new(1024);
        dec.push(&frame);
        assert_eq!(
            dec.next_message(),
            Err(DecodeError::Trailing {
                kind: "shutdown",
                extra: 1
            })
        );
    }

    /// A start frame as some build of the host would send it.
    fn start_frame(config: &[u8], fingerprint: Option<u64>) -> Vec<u8> {
        let mut frame = vec![0; 5];
        put_bytes(&mut frame, config);
        if let Some(fp) = fingerprint {
            frame.extend_from_slice(&fp.to_be_bytes());
        }
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        frame[4] = K_START;
        frame
    }

    #[test]
    fn start_frame_from_another_build_is_refused_before_its_config() {
        // A field this build does not know, as a newer host would send.
        let config = br#"{"from_the_future": true}"#;
        for theirs in [None, Some(PROTOCOL_FINGERPRINT ^ 1)] {
            let wire = start_frame(config, theirs);
            let err = read_message(&mut wire.as_slice(), 1024).unwrap_err();
            let err = err.into_inner().unwrap().downcast::<DecodeError>().unwrap();
            assert_eq!(
                *err,
                DecodeError::ProtocolMismatch {
                    ours: PROTOCOL_FINGERPRINT,
                    theirs
                }
            );
            let text = err.to_string();
            assert!(text.contains("different builds"), "{text}");
            assert!(
                text.contains(&format!("{PROTOCOL_FINGERPRINT:016x}")),
                "{text}"
            );
        }
        // With this build's fingerprint the config itself is read (and here
        // refused for what it is).
        let wire = start_frame(config, Some(PROTOCOL_FINGERPRINT));
        let err = read_message(&mut wire.as_slice(), 1024).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("field config is invalid"), "{text}");
        assert!(text.contains("from_the_future"), "{text}");
    }

    #[test]
    fn blocking_reader_reads_exactly_one_frame() {
        let mut wire = encode(&Message::Shutdown);
        wire.extend(encode(&Message::Unshared));
        let mut r = wire.as_slice();
        assert_eq!(read_message(&mut r, 64).unwrap(), Some(Message::Shutdown));
        assert_eq!(r.len(), 5);
        assert_eq!(read_message(&mut r, 64).unwrap(), Some(Message::Unshared));
        assert_eq!(read_message(&mut r, 64).unwrap(), None);
    }

    #[test]
    fn partial_frame_at_eof_is_an_error() {
        let wire = encode(&Message::Ready { init_us: 5 });
        let mut dec = FrameDecoder::new(64);
        dec.push(&wire[..6]);
        assert_eq!(dec.next_message(), Ok(None));
        assert_eq!(dec.finish(), Err(DecodeError::UnexpectedEof));
        assert!(read_message(&mut &wire[..6], 64).is_err());
    }

    #[test]
    fn restored_frame_layout_and_a_short_seed() {
        let msg = Message::Restored {
            seed: std::array::from_fn(|i| i as u8),
            sandbox_id: "sb-1".into(),
            log_stream: "t/[$LATEST]sb-1".into(),
            unix_time_ns: 1_764_000_000_123_456_789,
        };
        let wire = encode(&msg);
        // length, kind 5, 32 seed bytes, two length-prefixed strings, the
        // host's time.
        assert_eq!(wire.len(), 5 + SEED_LEN + 4 + 4 + 4 + 15 + 8);
        assert_eq!(
            wire[wire.len() - 8..],
            1_764_000_000_123_456_789u64.to_be_bytes()
        );
        assert_eq!(&wire[..5], &[0, 0, 0, (wire.len() - 4) as u8, K_RESTORED]);
        assert_eq!(wire[5..5 + SEED_LEN], msg_seed(&msg));
        assert_eq!(read_message(&mut wire.as_slice(), 1024).unwrap(), Some(msg));
        // A frame whose seed is cut short is rejected, naming the field.
        let short = [0, 0, 0, 11, K_RESTORED, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let mut dec = FrameDecoder::new(1024);
        dec.push(&short);
        assert_eq!(
            dec.next_message(),
            Err(DecodeError::Truncated {
                kind: "restored",
                field: "seed"
            })
        );
    }

    fn msg_seed(m: &Message) -> [u8; SEED_LEN] {
        match m {
            Message::Restored { seed, .. } => *seed,
            _ => unreachable!(),
        }
    }
}
