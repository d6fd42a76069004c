// A Lambda function in Node.js, made by `sluice new`.
//
// `bootstrap` (next to this file) is the runtime: it asks sluice for each
// event and calls `handler(event, context)` below, as AWS's Node.js runtime
// does. Edit this file; keep `bootstrap`. Modules of your own go in this
// folder; `npm install PACKAGE` here puts packages in its `node_modules`.
//
// What `event` holds depends on who calls:
// - `sluice invoke`: the payload, e.g. `--payload '{"name": "sluice"}'`;
// - a backfill (`sluice backfill`): `{"items": [...], "batch": {...}}`;
// - a Kafka trigger: Lambda's Kafka event, `{"records": {"TOPIC-PARTITION":
//   [{"value": BASE64, "offset": N, ...}]}}`.
//
// Return (or resolve to) anything JSON can hold: it is the call's response.
// Throw to fail the call: it is retried, then sent to the dead-letter file
// or on-failure topic. What you console.log() goes to sluice's log.

/** The items an event carries, whoever called. */
function itemsOf(event) {
  if (Array.isArray(event?.items)) {
    return event.items;
  }
  if (event?.records && typeof event.records === 'object') {
    return Object.values(event.records)
      .flat()
      .map((r) => Buffer.from(r.value || '', 'base64').toString('utf8'));
  }
  return [event];
}

export const handler = async (event, context) => {
  const items = itemsOf(event);
  console.log(`${context.functionName}: ${items.length} item(s)`);
  return { count: items.length, first: items.length ? items[0] : null };
};
