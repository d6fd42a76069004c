#!/usr/bin/env bash
# Sets everything up and runs the main example, from a fresh clone:
#   1. installs the few Debian packages needed (when missing, as root),
#   2. builds sluice, its agent and the example functions,
#   3. packages each Rust function as <folder>/bootstrap (as `cargo lambda` would),
#   4. checks the machine (`sluice doctor`) and the pipeline (`sluice validate`),
#   5. invokes each example function, runs the triggers, a backfill, a
#      MapReduce job and a stateful fold, and makes a function with `sluice new`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for cmd in gcc make pkg-config curl; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
# librdkafka is built with OpenSSL (TLS and SASL to real clusters) and zlib.
for lib in openssl zlib; do pkg-config --exists "$lib" 2>/dev/null || need+=("$lib headers"); done
# The python and node examples run the host's python3 and node, which the
# sandbox sees under /usr.
[ -x /usr/bin/python3 ] || [ -x /usr/local/bin/python3 ] || need+=("python3 in /usr")
[ -x /usr/bin/node ] || [ -x /usr/local/bin/node ] || need+=("node in /usr")
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential pkg-config curl zlib1g-dev libssl-dev python3
    [ -x /usr/bin/node ] || [ -x /usr/local/bin/node ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs
  else
    echo "missing tools: ${need[*]} (install them, e.g. apt-get install build-essential pkg-config curl zlib1g-dev libssl-dev python3 nodejs)" >&2
    exit 1
  fi
fi

scripts/package-functions.sh release
SLUICE=target/release/sluice

echo; echo "== sluice doctor"; $SLUICE doctor || true
echo; echo "== sluice validate examples/pipeline.toml"; $SLUICE validate examples/pipeline.toml
echo; echo "== sluice invoke echo"
$SLUICE invoke --pipeline examples/pipeline.toml echo --payload '{"hello": "sluice"}'
echo; echo "== sluice invoke python (a plain Lambda handler in Python)"
$SLUICE invoke --pipeline examples/pipeline.toml python --payload '{"text": "to be or not to be"}'
echo; echo "== sluice invoke layered (a Python handler importing a module from its layer, at /opt)"
$SLUICE invoke --pipeline examples/pipeline.toml layered --payload '{"text": "to be or not to be"}'
echo; echo "== sluice invoke node (the same handler in Node.js)"
$SLUICE invoke --pipeline examples/pipeline.toml node --payload '{"text": "to be or not to be"}'
echo; echo "== sluice invoke shell (payload from stdin)"
echo '{"from": "stdin"}' | $SLUICE invoke --pipeline examples/pipeline.toml shell --payload -
echo; echo "== sluice invoke fail (fails on purpose: exit code 1, error JSON on stderr)"
set +e
$SLUICE invoke --pipeline examples/pipeline.toml fail --payload '{"order": 42}'
echo "exit code: $?"
set -e
echo; echo "== sluice run examples/kafka/pipeline.toml (Kafka-triggered, embedded broker)"
$SLUICE run examples/kafka/pipeline.toml \
  --produce orders=examples/kafka/orders.jsonl --key-field customer --stop-when-idle 2s
echo; echo "== sluice run examples/objects/pipeline.toml (a folder watched like an S3 prefix; binary.dat fails on purpose)"
rm -rf examples/objects/.sluice-state
$SLUICE run examples/objects/pipeline.toml --stop-when-idle 2s
echo "responses:"; cat examples/objects/.sluice-state/count-landing.results.jsonl
echo "dead letters:"; cat examples/objects/.sluice-state/count-landing.dead-letter.jsonl
echo; echo "== sluice backfill examples/objects/pipeline.toml count-all (each file one call, format = \"objects\"; binary.dat fails on purpose)"
set +e
$SLUICE backfill examples/objects/pipeline.toml count-all -q
echo "exit code: $? (1: an item failed)"
set -e
echo "responses:"; cat examples/objects/.sluice-state/count-all.results.jsonl
echo; echo "== sluice backfill (every line of the README through echo, in calls of 20)"
rm -f "${TMPDIR:-/tmp}/sluice-example-backfill.redb" "${TMPDIR:-/tmp}/sluice-example-results.jsonl"
$SLUICE backfill examples/pipeline.toml -f echo --source README.md --format text \
  --max-items-per-call 20 --progress "${TMPDIR:-/tmp}/sluice-example-backfill.redb" -q \
  --results "${TMPDIR:-/tmp}/sluice-example-results.jsonl"
echo "one call's response (echo answers with its event):"
head -c 300 "${TMPDIR:-/tmp}/sluice-example-results.jsonl"; echo " ..."
echo; echo "== sluice mapreduce examples/wordcount/pipeline.toml wordcount (embedded broker as the shuffle)"
$SLUICE mapreduce examples/wordcount/pipeline.toml wordcount -q
head -3 examples/wordcount/out/part-00000.jsonl
echo; echo "== stateful folds: sluice run examples/state/pipeline.toml, then sluice state show"
rm -rf examples/state/.sluice-state
$SLUICE run examples/state/pipeline.toml -q \
  --produce payments=examples/state/payments.jsonl --key-field key --stop-when-idle 3s
$SLUICE state show examples/state/pipeline.toml --trigger sums
echo; echo "== the same fold as a backfill (sluice backfill examples/state/pipeline.toml sums-backfill)"
$SLUICE backfill examples/state/pipeline.toml sums-backfill -q
$SLUICE state show examples/state/pipeline.toml --trigger sums-backfill
echo; echo "== your own function: sluice new hello (in a scratch folder), then sluice invoke"
scratch=$(mktemp -d)
$SLUICE new hello --pipeline "$scratch/pipeline.toml"
$SLUICE invoke --pipeline "$scratch/pipeline.toml" hello --payload '{"hello": "world"}'
rm -rf "$scratch"
echo; echo "Done. Try: $SLUICE bench invoke"
