#!/usr/bin/env bash
# The test command: formatting, lints, every test of the workspace (Kafka
# tests against librdkafka's mock cluster), then the Kafka tests again
# against an independent broker (scripts/test-external-kafka.sh: tansu,
# built from crates.io on first use, about 15 minutes).
# Tests start real sandboxes (namespaces, cgroups), so run as root on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean build gains nothing from incremental compilation, whose caches were
# a quarter of the target directory (about 2 GB).
export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
scripts/test-external-kafka.sh
