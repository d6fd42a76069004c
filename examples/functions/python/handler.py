"""A plain Lambda handler in Python: counts the words it is given.

- `sluice invoke ... python --payload '{"text": "to be or not to be"}'`
- a backfill of text lines (`--format text`): `{"items": [line, ...], "batch": {...}}`
- a Kafka trigger's batch (Lambda's Kafka event, values in base64): each
  record's value is text; a value that is not UTF-8 is reported back in
  `batchItemFailures` (with `report_batch_item_failures = true`, only that
  record is retried, then sent to the on-failure topic)
- anything else is an error, reported to the caller as Lambda reports one.
"""

import base64
import collections
import json
import re

WORD = re.compile(r"[\w']+")


def kafka_lines(event, failures):
    """The text of each record of a Kafka event, in order; records whose
    value is not UTF-8 text go to `failures` as Lambda item identifiers."""
    lines = []
    for records in event["records"].values():
        for r in records:
            item = f"{r['topic']}-{r['partition']}@{r['offset']}"
            try:
                text = base64.b64decode(r.get("value") or "").decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                failures.append({"itemIdentifier": item})
                continue
            print(f"SEEN {item} {text}")
            lines.append(text)
    return lines


def handler(event, context):
    failures = []
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        lines = [event["text"]]
    elif isinstance(event, dict) and isinstance(event.get("items"), list):
        lines = [i if isinstance(i, str) else json.dumps(i) for i in event["items"]]
    elif isinstance(event, dict) and isinstance(event.get("records"), dict):
        lines = kafka_lines(event, failures)
    else:
        raise ValueError(
            'expected {"text": "..."}, a backfill call\'s {"items": [...]} '
            'or a Kafka event\'s {"records": {...}}'
        )
    counts = collections.Counter(w.lower() for line in lines for w in WORD.findall(line))
    print(f"{sum(counts.values())} words in {len(lines)} lines")
    answer = {
        "words": sum(counts.values()),
        "top": counts.most_common(3),
        "request_id": context.aws_request_id,
        "has_time_left": context.get_remaining_time_in_millis() > 0,
    }
    if failures:
        answer["batchItemFailures"] = failures
    return answer
