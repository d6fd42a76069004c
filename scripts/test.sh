#!/usr/bin/env bash
# The test command: formatting, lints, the docs, every test of the workspace (Kafka
# tests against librdkafka's mock cluster), the object-store tests against
# S3 and Azure servers (scripts/test-object-stores.sh: moto from PyPI,
# Azurite from npm), boto3 (from PyPI) against `sluice serve`
# (scripts/test-aws-sdk.sh), then the Kafka
# tests again against an independent broker (scripts/test-external-kafka.sh:
# tansu, built from crates.io on first use, about 15 minutes).
# Tests start real sandboxes (namespaces, cgroups), so run as root on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean build gains nothing from incremental compilation, whose caches were
# a quarter of the target directory (about 2 GB).
export CARGO_INCREMENTAL=0
# A run from a fresh clone fills about 3 GB of target/, and building tansu the
# first time about 1.5 GB more in the temp folder: say so before a full disk
# breaks a build halfway.
avail_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${avail_kb:-0}" -lt $((5 * 1024 * 1024)) ]; then
  echo "warning: $((avail_kb / 1024)) MB free on $(df -P . | awk 'NR == 2 {print $6}'); a test run from a fresh clone needs about 5 GB" >&2
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The crates' docs (ARCHITECTURE points into them) build without a broken
# link or a stray HTML tag.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
cargo test --workspace
scripts/test-object-stores.sh
scripts/test-aws-sdk.sh
scripts/test-external-kafka.sh
