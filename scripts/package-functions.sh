#!/usr/bin/env bash
# Builds sluice, sluice-agent and the Rust example/test functions, and copies
# each function binary to <function folder>/bootstrap.
# Usage: scripts/package-functions.sh [release|debug]
# Honours CARGO_TARGET_DIR (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-release}"
flag=(); [ "$profile" = release ] && flag=(--release)
target="${CARGO_TARGET_DIR:-target}"
cargo build "${flag[@]}" -p sluice -p sluice-agent -p echo-function -p fail-function -p orders-function -p noop-function -p arrow-sum-function -p wordcount-function -p tpch-q1-function -p running-sum-function -p line-count-function -p misbehave-function
install -m 0755 "$target/$profile/echo-fn" examples/functions/echo/bootstrap
install -m 0755 "$target/$profile/fail-fn" examples/functions/fail/bootstrap
install -m 0755 "$target/$profile/orders-fn" examples/functions/orders/bootstrap
install -m 0755 "$target/$profile/noop-fn" examples/functions/noop/bootstrap
install -m 0755 "$target/$profile/arrow-sum-fn" examples/functions/arrow-sum/bootstrap
install -m 0755 "$target/$profile/wordcount-fn" examples/functions/wordcount/bootstrap
install -m 0755 "$target/$profile/tpch-q1-fn" examples/functions/tpch-q1/bootstrap
install -m 0755 "$target/$profile/running-sum-fn" examples/functions/running-sum/bootstrap
install -m 0755 "$target/$profile/line-count-fn" examples/functions/line-count/bootstrap
install -m 0755 "$target/$profile/misbehave-fn" tests/functions/misbehave/bootstrap
