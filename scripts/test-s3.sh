#!/usr/bin/env bash
# The object-store tests of the backfill and of object-store triggers
# against a real S3-protocol server
# instead of object_store's in-memory store: moto's server (from PyPI),
# started here on a free port, reached the way `sluice backfill` users reach
# S3: an `s3://` URL, with the endpoint, region and credentials in the usual
# AWS_* variables. That covers the HTTP client, request signing, listing and
# the ranged reads of Parquet footers and column chunks.
#
# A step of scripts/test.sh. Installing moto takes about half a minute the
# first time (a virtualenv in SLUICE_TOOLS, default ~/.cache/sluice-tools).
# Needs python3 with the venv module (Debian: python3-venv) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
venv="$tools/moto"
if [ ! -x "$venv/bin/moto_server" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.*'
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
endpoint="http://127.0.0.1:$port"
for _ in $(seq 100); do
    curl -s -o /dev/null "$endpoint" && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
# moto creates buckets on an unsigned PUT.
bucket=sluice-test
curl -sf -X PUT "$endpoint/$bucket" >/dev/null
echo "moto S3 on $endpoint, bucket $bucket"

export AWS_ENDPOINT="$endpoint" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=sluice AWS_SECRET_ACCESS_KEY=sluice
export SLUICE_TEST_S3="s3://$bucket"
cargo test -p sluice-taskgen --test object_store s3
cargo test -p sluice-ingest --test object_trigger s3
cargo test --test bench_cli s3
# The tests skip themselves without SLUICE_TEST_S3: make sure they ran here.
grep -q "GET /$bucket/sluice-test-[0-9]" "$log" || {
    echo "error: the backfill S3 test sent no request to moto" >&2
    exit 1
}
grep -q "GET /$bucket?list-type=2&prefix=sluice-test-objects-" "$log" || {
    echo "error: the object-store trigger S3 test listed nothing on moto" >&2
    exit 1
}
grep -q "PUT /$bucket/sluice-test-bench/sluice-bench-objects-" "$log" || {
    echo "error: sluice bench objects wrote nothing on moto" >&2
    exit 1
}
