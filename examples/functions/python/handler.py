"""A plain Lambda handler in Python: counts the words it is given.

- `sluice invoke ... python --payload '{"text": "to be or not to be"}'`
- a backfill of text lines (`--format text`): `{"items": [line, ...], "batch": {...}}`
- anything else is an error, reported to the caller as Lambda reports one.
"""

import collections
import json
import re

WORD = re.compile(r"[\w']+")


def handler(event, context):
    if isinstance(event, dict) and isinstance(event.get("text"), str):
        lines = [event["text"]]
    elif isinstance(event, dict) and isinstance(event.get("items"), list):
        lines = [i if isinstance(i, str) else json.dumps(i) for i in event["items"]]
    else:
        raise ValueError('expected {"text": "..."} or a backfill call\'s {"items": [...]}')
    counts = collections.Counter(w.lower() for line in lines for w in WORD.findall(line))
    print(f"{sum(counts.values())} words in {len(lines)} lines")
    return {
        "words": sum(counts.values()),
        "top": counts.most_common(3),
        "request_id": context.aws_request_id,
        "has_time_left": context.get_remaining_time_in_millis() > 0,
    }
