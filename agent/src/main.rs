//! `sluice-agent`: see the crate documentation of `sluice_agent`.
//!
//! Usage (started by the sluice executor, never by hand):
//! `sluice-agent [--channel stdio|unix:PATH|file:PATH]`; the first frame on the
//! channel is the `Start` configuration. `--stage1` is internal.

use std::process::ExitCode;

use sluice_agent::{Channel, run_stage0, run_stage1};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut channel = Channel::Stdio;
    let mut stage1 = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--stage1" => stage1 = true,
            "--channel" => {
                i += 1;
                match args.get(i).map(|s| Channel::parse(s)) {
                    Some(Ok(c)) => channel = c,
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
            "--help" | "-h" => {
                eprintln!("usage: sluice-agent [--channel stdio|unix:PATH|file:PATH]");
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
    } else {
        run_stage0(channel)
    };
    ExitCode::from(code)
}
