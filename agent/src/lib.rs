//! # sluice-agent: the guest agent
//!
//! The agent is the first process inside every sandbox. It serves the AWS
//! Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`) to the function's
//! `bootstrap`, and relays everything over one framed channel
//! (`sluice-protocol`) to the host: invocations in; responses, errors, init
//! errors, log lines and the exit of `bootstrap` out.
//!
//! In the process sandbox the agent also builds the sandbox itself
//! ([`isolate`]): namespaces, a private read-only root, loopback networking,
//! rlimits, landlock and seccomp. In a microVM (later) the VM is the sandbox
//! and the agent runs as `/init`.
//!
//! The channel transport is pluggable ([`Channel`]): the standard input and
//! output pipes of the agent (process sandbox), or a path to a Unix socket or
//! a character device (a virtio console in a microVM).

pub mod init;
pub mod isolate;
mod netlink;
pub mod runtime_api;
mod supervisor;

pub use supervisor::{Channel, run_stage0, run_stage1};
