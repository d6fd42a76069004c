//! # sluice-agent: the guest agent
//!
//! The agent is the first process inside every sandbox. It serves the AWS
//! Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`) to the function's
//! `bootstrap`, and relays everything over one framed channel
//! (`sluice-protocol`) to the host: invocations in; responses, errors, init
//! errors, log lines and the exit of `bootstrap` out. Beside it, Lambda's
//! Extensions API, for the external extensions (`/opt/extensions/*`) it
//! starts before `bootstrap` and for internal ones.
//!
//! In the process sandbox the agent also builds the sandbox itself
//! ([`isolate`]): namespaces, a private read-only root, loopback networking,
//! rlimits, landlock and seccomp. In a microVM (later) the VM is the sandbox
//! and the agent runs as `/init`.
//!
//! A microVM sandbox may be a clone restored from a function snapshot taken
//! while `bootstrap` waited at `/invocation/next`. The host then sends
//! `Restored` (a fresh seed, the clone's sandbox id and log stream): the
//! agent writes the seed to `/dev/urandom`, which mixes it into the
//! kernel's input pool (without crediting entropy: an `RNDADDENTROPY` or
//! `RNDRESEEDCRNG` ioctl needs `unsafe`, which this crate forbids, so the
//! kernel's CRNG takes it up at its next reseed), names the clone in the
//! `Sluice-Sandbox-Id` and `Sluice-Log-Stream` headers of every later
//! `next` (its environment is the snapshotted process's), logs it, and
//! answers `Ready`.
//!
//! The channel transport is pluggable ([`Channel`]): the standard input and
//! output pipes of the agent (process sandbox), or a path to a Unix socket or
//! a character device (a virtio console in a microVM).

pub mod attachment;
mod extensions;
pub mod init;
pub mod isolate;
mod logs;
mod netlink;
pub mod runtime_api;
mod supervisor;
mod telemetry;

pub use supervisor::{Channel, ENTROPY_SINK, run_stage0, run_stage1};
