"""A Lambda function in Python, made by `sluice new`.

`bootstrap` (next to this file) is the runtime: it asks sluice for each
event and calls `handler(event, context)` below, as AWS's Python runtime
does. Edit this file; keep `bootstrap`. Modules of your own go in this
folder; vendor packages into it with `pip install --target . PACKAGE`.

What `event` holds depends on who calls:
- `sluice invoke`: the payload, e.g. `--payload '{"name": "sluice"}'`;
- a backfill (`sluice backfill`): `{"items": [...], "batch": {...}}`;
- a Kafka trigger: Lambda's Kafka event, `{"records": {"TOPIC-PARTITION":
  [{"value": BASE64, "offset": N, ...}]}}`.

Return anything JSON can hold: it is the call's response. Raise to fail
the call: it is retried, then sent to the dead-letter file or on-failure
topic. What you print goes to sluice's log.
"""

import base64


def items_of(event):
    """The items an event carries, whoever called."""
    if isinstance(event, dict) and isinstance(event.get("items"), list):
        return event["items"]
    if isinstance(event, dict) and isinstance(event.get("records"), dict):
        return [
            base64.b64decode(r.get("value") or "").decode("utf-8", "replace")
            for records in event["records"].values()
            for r in records
        ]
    return [event]


def handler(event, context):
    items = items_of(event)
    print(f"{context.function_name}: {len(items)} item(s)")
    return {"count": len(items), "first": items[0] if items else None}
