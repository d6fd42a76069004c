#!/usr/bin/env bash
# The test command: formatting, lints, then every test of the workspace.
# Tests start real sandboxes (namespaces, cgroups), so run as root on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
