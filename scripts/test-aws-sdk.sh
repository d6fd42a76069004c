#!/usr/bin/env bash
# `sluice serve` against a real AWS SDK: boto3's `lambda` client (from
# PyPI) calls the example Python handler through Lambda's Invoke API as a
# user's code would, and every answer must be what botocore expects of
# Lambda: the response, a function error, the log tail, a streamed
# response (InvokeWithResponseStream), asynchronous calls (one failing into
# the --on-failure file), a dry run,
# ListFunctions, GetFunction(Configuration), and the service's errors
# raised as their modelled exceptions.
#
# A step of scripts/test.sh. Installs boto3 in a venv the first time (in
# SLUICE_TOOLS, default ~/.cache/sluice-tools; about ten seconds). Needs
# python3 with the venv module (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${SLUICE_TOOLS:-$HOME/.cache/sluice-tools}"
venv="$tools/boto3"
if ! "$venv/bin/python" -c 'import boto3' 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'boto3==1.*'
fi

cargo build --quiet -p sluice -p sluice-agent
work=$(mktemp -d)
log="$work/serve.log"
serve_pid=
trap '[ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null; rm -rf "$work"' EXIT

cat >"$work/pipeline.toml" <<EOF
[functions.python]
path = "$PWD/examples/functions/python"
handler = "handler.handler"
timeout = "5s"

[functions.layered]
path = "$PWD/examples/functions/python"
handler = "layered.handler"
layers = ["$PWD/examples/layers/text-tools"]
timeout = "5s"
EOF

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/sluice serve "$work/pipeline.toml" --addr "127.0.0.1:$port" \
    --on-failure "$work/failed.jsonl" --on-success "$work/succeeded.jsonl" \
    --max-retry-attempts 0 --max-event-age 10m >"$log" 2>&1 &
serve_pid=$!
for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    kill -0 "$serve_pid" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done

"$venv/bin/python" - "http://127.0.0.1:$port" <<'EOF'
import base64, json, sys

import boto3
import botocore.exceptions

client = boto3.client(
    "lambda",
    endpoint_url=sys.argv[1],
    region_name="us-east-1",
    aws_access_key_id="sluice",
    aws_secret_access_key="sluice",
)

def check(what, ok, detail):
    if not ok:
        sys.exit(f"error: {what}: {detail}")
    print(f"ok: {what}")

r = client.invoke(FunctionName="python", Payload=json.dumps({"text": "to be or not to be"}))
answer = json.loads(r["Payload"].read())
check("RequestResponse by name", r["StatusCode"] == 200 and answer["words"] == 6, (r, answer))
check("no function error", "FunctionError" not in r, r)

arn = "arn:aws:lambda:us-east-1:123456789012:function:layered"
r = client.invoke(FunctionName=arn, Payload=json.dumps({"text": "not a longer word"}))
answer = json.loads(r["Payload"].read())
check("by ARN, importing from a layer", answer == {"longest": "longer"}, answer)

r = client.invoke(FunctionName="python", Payload=json.dumps({"text": "log me"}), LogType="Tail")
tail = base64.b64decode(r["LogResult"]).decode()
request_id = r["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
check(
    "LogType=Tail",
    f"START RequestId: {request_id}" in tail
    and "2 words in 1 lines" in tail
    and f"REPORT RequestId: {request_id}" in tail,
    tail,
)

r = client.invoke(FunctionName="python", Payload=json.dumps({"nothing": 1}), LogType="Tail")
error = json.loads(r["Payload"].read())
check(
    "a function error",
    r["FunctionError"] == "Unhandled" and error["errorType"] == "ValueError",
    (r, error),
)
check("its log tail", "ValueError" in base64.b64decode(r["LogResult"]).decode(), r["LogResult"])

r = client.invoke_with_response_stream(
    FunctionName="python", Payload=json.dumps({"text": "a streamed answer"}), LogType="Tail"
)
events = list(r["EventStream"])
chunks = b"".join(e["PayloadChunk"]["Payload"] for e in events if "PayloadChunk" in e)
complete = events[-1].get("InvokeComplete", {})
check(
    "InvokeWithResponseStream",
    json.loads(chunks)["words"] == 3
    and "REPORT RequestId" in base64.b64decode(complete["LogResult"]).decode(),
    events,
)
r = client.invoke_with_response_stream(FunctionName="python", Payload=b"{}")
complete = list(r["EventStream"])[-1]["InvokeComplete"]
check(
    "a function error, streamed",
    complete["ErrorCode"] == "ValueError" and "expected" in complete["ErrorDetails"],
    complete,
)

r = client.invoke(FunctionName="python", InvocationType="Event", Payload=b'{"text": "later"}')
check("Event", r["StatusCode"] == 202, r)
r = client.invoke(FunctionName="python", InvocationType="Event", Payload=b'{"no": "text"}')
check("Event that fails", r["StatusCode"] == 202, r)
r = client.invoke(FunctionName="python", InvocationType="DryRun")
check("DryRun", r["StatusCode"] == 204, r)

names = [f["FunctionName"] for f in client.list_functions()["Functions"]]
check("ListFunctions", names == ["layered", "python"], names)
config = client.get_function_configuration(FunctionName="layered")
check(
    "GetFunctionConfiguration",
    config["Handler"] == "layered.handler"
    and config["Timeout"] == 5
    and len(config["Layers"]) == 1
    and config["State"] == "Active",
    config,
)
function = client.get_function(FunctionName=arn)
check("GetFunction by ARN", function["Configuration"]["FunctionName"] == "layered", function)

for what, kwargs, expected in [
    ("an unknown function", {"FunctionName": "nope", "Payload": b"{}"}, "ResourceNotFoundException"),
    ("a body that is not JSON", {"FunctionName": "python", "Payload": b"not json"}, "InvalidRequestContentException"),
    ("a payload over 6 MB", {"FunctionName": "python", "Payload": b'"' + b"x" * (7 << 20) + b'"'}, "RequestTooLargeException"),
]:
    try:
        client.invoke(**kwargs)
        sys.exit(f"error: {what}: no exception")
    except botocore.exceptions.ClientError as e:
        code = e.response["Error"]["Code"]
        check(f"{what} raises {expected}", code == expected, e.response)
EOF
kill -INT "$serve_pid"
wait "$serve_pid" || { echo "error: sluice serve did not stop cleanly" >&2; cat "$log"; exit 1; }
serve_pid=
grep -qF '[python] 1 words in 1 lines' "$log" || { echo "error: the Event call never ran" >&2; cat "$log"; exit 1; }
# The failed Event call, in Lambda's on-failure destination format.
python3 - "$work/failed.jsonl" "$work/succeeded.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
assert len(records) == 1, records
r = records[0]
assert r["requestContext"]["condition"] == "RetriesExhausted", r
assert r["requestPayload"] == {"no": "text"}, r
assert r["responsePayload"]["errorType"] == "ValueError", r
print("ok: the failed Event call recorded in --on-failure")
records = [json.loads(line) for line in open(sys.argv[2])]
assert len(records) == 1, records
assert records[0]["requestContext"]["condition"] == "Success", records
assert records[0]["responsePayload"]["words"] == 1, records
print("ok: the Event call that succeeded recorded in --on-success")
EOF
echo "boto3 against sluice serve: ok"
