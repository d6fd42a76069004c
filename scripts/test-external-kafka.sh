#!/usr/bin/env bash
# The Kafka tests against an external broker of another implementation than
# librdkafka's mock cluster: tansu (a Kafka-compatible broker written in
# Rust, from crates.io), started here in memory on a free port, reached
# through SLUICE_TEST_KAFKA as any external cluster would be. This exercises
# what the mock cannot: topics created with the admin API (CreateTopics),
# another broker's group coordinator, fetch and commit handling.
#
# The last step of scripts/test.sh. Building tansu takes about 15 minutes
# the first time; tansu 0.6.0 has gaps that some tests hit (they are skipped,
# each with its reason, below). Needs python3 (to find a free port).
# Honours SLUICE_TOOLS (where tansu is installed; default ~/.cache/sluice-tools).
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
tansu="$tools/bin/tansu"
if [ ! -x "$tansu" ]; then
    # The memory storage engine needs the `dynostore` feature.
    cargo install tansu --version 0.6.0 --locked --features dynostore --root "$tools"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$tansu" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 100); do
    grep -q "ready in" "$log" && break
    kill -0 $broker 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
echo "tansu on 127.0.0.1:$port"

# Skipped, with why (each passes against the mock cluster in scripts/test.sh):
# * tansu 0.6.0 returns no records to a fetch whose offset falls inside a
#   record batch (a plain rdkafka consumer assigned at offset 1024 of a
#   3,000-record batch gets nothing). Every test that resumes from a
#   committed offset in the middle of a producer's batch stalls on it: after
#   a pause, a kill -9, or a takeover.
# * Its high watermark after a batch of N records is the batch's first
#   offset + 1, not + N (10 records in one batch: watermarks (0, 1)), so a
#   test comparing committed offsets with the end offsets fails when the
#   producer batched.
# * The exactly-once test's transactions never finish against it (every
#   record is received, none is ever finished); not investigated further.
skip=(
    --skip backlog_pause_and_resume_loses_nothing
    --skip graceful_shutdown_commits_end_offsets
    --skip exactly_once_produces_each_output_once_through_transactions
    --skip kill_9_mid_batch_then_restart_loses_nothing
    --skip two_processes_share_partitions_and_take_over_after_a_kill
    --skip running_sum_per_key_survives_kill_9
    --skip state_moves_with_its_partition_through_the_changelog
)
export SLUICE_TEST_KAFKA="127.0.0.1:$port"
# --workspace: the same selection as scripts/test.sh's `cargo test
# --workspace`, so cargo resolves the same features and reuses its build
# (with -p it would compile most dependencies again, with other features).
cargo test --workspace --test kafka_semantics --test changelog --test kafka_cli --test state_cli -- "${skip[@]}"
