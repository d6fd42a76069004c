#!/usr/bin/env bash
# The object-store tests of the backfill, of object-store triggers, of
# Kafka triggers' object-store on-failure destinations and of MapReduce
# output to an object store against real servers
# instead of object_store's in-memory store or local folders:
#
# - S3: moto's server (from PyPI), reached the way `sluice backfill` users
#   reach S3: an `s3://` URL, with the endpoint, region and credentials in
#   the usual AWS_* variables. That covers the HTTP client, request signing,
#   listing and the ranged reads of Parquet footers and column chunks.
# - Azure Blob Storage: Azurite (Microsoft's emulator, from npm), reached by
#   an `az://` URL with AZURE_STORAGE_USE_EMULATOR and
#   AZURITE_BLOB_STORAGE_URL. Azure refuses suffix range requests, which
#   Parquet footers were read with until this test found it.
#
# No GCS server that speaks the XML API object_store uses can be installed
# from the package registries: the gs:// tests run only where SLUICE_TEST_GS
# names a bucket (see test-support/src/stores.rs).
#
# A step of scripts/test.sh. Installing moto and Azurite takes about half a
# minute the first time (in SLUICE_TOOLS, default ~/.cache/sluice-tools).
# Needs python3 with the venv module (Debian: python3-venv), npm and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
venv="$tools/moto"
if [ ! -x "$venv/bin/moto_server" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.*'
fi
azurite="$tools/azurite-3.35.0"
if [ ! -x "$azurite/node_modules/.bin/azurite-blob" ]; then
    rm -rf "$azurite"
    npm install --prefix "$azurite" --no-audit --no-fund --silent azurite@3.35.0
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Waits until the server answers HTTP on $1, or fails with its log if it died.
wait_http() {
    for _ in $(seq 100); do
        curl -s -o /dev/null "$1" && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3"; exit 1; }
        sleep 0.1
    done
    echo "error: nothing answers on $1" >&2
    cat "$3"
    exit 1
}

s3_log=$(mktemp)
az_log=$(mktemp)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -f "$s3_log" "$az_log"' EXIT

s3_port=$(free_port)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$s3_log" 2>&1 &
pids+=($!)
s3="http://127.0.0.1:$s3_port"
wait_http "$s3" "${pids[-1]}" "$s3_log"
# moto creates buckets on an unsigned PUT.
bucket=sluice-test
curl -sf -X PUT "$s3/$bucket" >/dev/null
echo "moto S3 on $s3, bucket $bucket"

az_port=$(free_port)
"$azurite/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$az_port" \
    --inMemoryPersistence --disableTelemetry --skipApiVersionCheck --debug "$az_log" \
    >/dev/null 2>&1 &
pids+=($!)
az="http://127.0.0.1:$az_port"
wait_http "$az" "${pids[-1]}" "$az_log"
# Azurite needs a signed request to create a container (object_store cannot
# create one): Shared Key with the emulator's published account key.
container=sluice-test
python3 - "$az/devstoreaccount1" "$container" <<'EOF'
import base64, hashlib, hmac, http.client, sys
from email.utils import formatdate
from urllib.parse import urlsplit

endpoint, container = sys.argv[1], sys.argv[2]
account = "devstoreaccount1"
key = base64.b64decode(
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
u = urlsplit(endpoint)
headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
canonical = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
resource = f"/{account}{u.path}/{container}\nrestype:container"
signed = "PUT\n" + "\n" * 11 + canonical + resource
signature = base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest()).decode()
c = http.client.HTTPConnection(u.hostname, u.port)
c.request(
    "PUT",
    f"{u.path}/{container}?restype=container",
    body=b"",
    headers={**headers, "Authorization": f"SharedKey {account}:{signature}"},
)
r = c.getresponse()
if r.status != 201:
    sys.exit(f"error: creating container {container} on Azurite: {r.status} {r.reason}")
EOF
echo "Azurite Blob on $az, container $container"

export AWS_ENDPOINT="$s3" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=sluice AWS_SECRET_ACCESS_KEY=sluice
export SLUICE_TEST_S3="s3://$bucket"
export AZURE_STORAGE_USE_EMULATOR=true AZURITE_BLOB_STORAGE_URL="$az"
export SLUICE_TEST_AZ="az://$container"
cargo test -p sluice-taskgen --test object_store -- s3 azure
cargo test -p sluice-ingest --test object_trigger -- s3 azure
cargo test -p sluice-ingest --test kafka_semantics -- failure_destination
cargo test --test bench_cli s3
cargo test -p sluice-mapreduce --test wordcount -- output_to_s3 output_to_azure
cargo test --test mapreduce_cli s3
cargo test --test backfill_distributed s3
# The tests skip themselves without their variables: make sure they ran here.
# ran LOG PATTERN WHAT: the server's LOG has a request matching PATTERN.
ran() {
    grep -q "$2" "$1" || {
        echo "error: $3" >&2
        exit 1
    }
}
ran "$s3_log" "GET /$bucket/sluice-test-[0-9]" "the backfill S3 test sent no request to moto"
ran "$s3_log" "PUT /$bucket/sluice-test-[0-9][^ ]*/out/results.jsonl" \
    "the backfill S3 test uploaded no results to moto"
ran "$s3_log" "GET /$bucket/sluice-test-[0-9][^ ]*/objects/a.txt" \
    "the backfill of objects fetched nothing from moto"
ran "$s3_log" "GET /$bucket?list-type=2&prefix=sluice-test-objects-" \
    "the object-store trigger S3 test listed nothing on moto"
ran "$s3_log" "PUT /$bucket/sluice-test-bench/sluice-bench-objects-" \
    "sluice bench objects wrote nothing on moto"
ran "$s3_log" "PUT /$bucket/sluice-test-dlq-" "the Kafka on-failure S3 test wrote nothing on moto"
ran "$az_log" "/devstoreaccount1/$container/sluice-test-[0-9].*a.parquet" \
    "the backfill Azure test read nothing from Azurite"
ran "$az_log" "/devstoreaccount1/$container/sluice-test-[0-9].*out/results.jsonl" \
    "the backfill Azure test uploaded no results to Azurite"
ran "$az_log" "/devstoreaccount1/$container/sluice-test-[0-9].*objects/a.txt" \
    "the backfill of objects fetched nothing from Azurite"
ran "$az_log" "/devstoreaccount1/$container?.*prefix=sluice-test-objects-" \
    "the object-store trigger Azure test listed nothing on Azurite"
ran "$az_log" "/devstoreaccount1/$container/sluice-test-dlq-" \
    "the Kafka on-failure Azure test wrote nothing on Azurite"
ran "$s3_log" "PUT /$bucket/sluice-mapreduce-[0-9][^ ]*/counts/_SUCCESS" \
    "the MapReduce S3 test put no _SUCCESS on moto"
ran "$s3_log" "PUT /$bucket/sluice-distributed-[0-9][^ ]*/results.jsonl" \
    "the distributed backfill S3 test uploaded no results to moto"
ran "$s3_log" "PUT /$bucket/sluice-mapreduce-cli-[0-9][^ ]*/counts/_SUCCESS" \
    "the sluice mapreduce S3 test put no _SUCCESS on moto"
ran "$az_log" "/devstoreaccount1/$container/sluice-mapreduce-[0-9].*counts/_SUCCESS" \
    "the MapReduce Azure test put no _SUCCESS on Azurite"
