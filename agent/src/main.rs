//! `sluice-agent`: see the crate documentation of `sluice_agent`.
//!
//! Usage (started by the sluice executor, never by hand):
//! `sluice-agent [--channel stdio|unix:PATH|file:PATH]`; the first frame on the
//! channel is the `Start` configuration. `--stage1` is internal.
//! `--init` (or running as `/init`, in a microVM guest) mounts the guest's
//! file systems first, serves on `/dev/hvc0` unless `--channel` says
//! otherwise, and reboots the guest at the end. `--entropy PATH` (default
//! `/dev/urandom`) is where a restored clone's seed is written (for tests).

use std::process::ExitCode;

use sluice_agent::init::{GUEST_CHANNEL, run_init};
use sluice_agent::{Channel, ENTROPY_SINK, run_stage0, run_stage1};

fn main() -> ExitCode {
    let argv0 = std::env::args().next().unwrap_or_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut channel = None;
    let mut stage1 = false;
    let mut entropy = std::path::PathBuf::from(ENTROPY_SINK);
    // The guest kernel runs the initramfs's /init with argv[0] "/init".
    let mut init = argv0 == "/init";
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--stage1" => stage1 = true,
            "--init" => init = true,
            "--channel" => {
                i += 1;
                match args.get(i).map(|s| Channel::parse(s)) {
                    Some(Ok(c)) => channel = Some(c),
                    Some(Err(e)) => {
                        eprintln!("sluice-agent: {e}");
                        return ExitCode::from(2);
                    }
                    None => {
                        eprintln!("sluice-agent: --channel needs a value");
                        return ExitCode::from(2);
                    }
                }
            }
            "--entropy" => {
                i += 1;
                match args.get(i) {
                    Some(p) => entropy = p.into(),
                    None => {
                        eprintln!("sluice-agent: --entropy needs a path");
                        return ExitCode::from(2);
                    }
                }
            }
            "--version" | "-V" => {
                // The protocol's fingerprint tells whether this agent was
                // built with a given sluice (their start frames must match).
                println!(
                    "sluice-agent {} (protocol {:016x})",
                    env!("CARGO_PKG_VERSION"),
                    sluice_protocol::PROTOCOL_FINGERPRINT
                );
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                eprintln!(
                    "usage: sluice-agent [--init] [--channel stdio|unix:PATH|file:PATH] [--entropy PATH] | --version"
                );
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("sluice-agent: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
        i += 1;
    }
    let code = if stage1 {
        run_stage1()
    } else if init {
        run_init(channel.unwrap_or_else(|| Channel::File(GUEST_CHANNEL.into())))
    } else {
        run_stage0(channel.unwrap_or(Channel::Stdio), &entropy, false)
    };
    ExitCode::from(code)
}
