// A plain Lambda handler in Node.js: counts the words it is given.
//
// - `sluice invoke ... node --payload '{"text": "to be or not to be"}'`
// - a backfill of text lines (`--format text`): `{"items": [line, ...], "batch": {...}}`
// - a Kafka trigger's batch (Lambda's Kafka event, values in base64): each
//   record's value is text; a value that is not UTF-8 is reported back in
//   `batchItemFailures` (with `report_batch_item_failures = true`, only that
//   record is retried, then sent to the on-failure topic)
// - anything else is an error, reported to the caller as Lambda reports one.

const WORD = /[\p{L}\p{N}_']+/gu;

/** The text of each record of a Kafka event; undecodable ones go to `failures`. */
function kafkaLines(event, failures) {
  const lines = [];
  for (const records of Object.values(event.records)) {
    for (const r of records) {
      const item = `${r.topic}-${r.partition}@${r.offset}`;
      const bytes = Buffer.from(r.value || '', 'base64');
      try {
        lines.push(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
      } catch {
        failures.push({ itemIdentifier: item });
      }
    }
  }
  return lines;
}

export const handler = async (event, context) => {
  const failures = [];
  let lines;
  if (typeof event?.text === 'string') {
    lines = [event.text];
  } else if (Array.isArray(event?.items)) {
    lines = event.items.map((i) => (typeof i === 'string' ? i : JSON.stringify(i)));
  } else if (event?.records && typeof event.records === 'object') {
    lines = kafkaLines(event, failures);
  } else {
    throw new TypeError(
      'expected {"text": "..."}, a backfill call\'s {"items": [...]} or a Kafka event\'s {"records": {...}}',
    );
  }
  const counts = new Map();
  for (const line of lines) {
    for (const w of line.match(WORD) ?? []) {
      const word = w.toLowerCase();
      counts.set(word, (counts.get(word) ?? 0) + 1);
    }
  }
  const words = [...counts.values()].reduce((a, b) => a + b, 0);
  console.log(`${words} words in ${lines.length} lines`);
  // Most frequent first; ties in the order first seen.
  const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 3);
  const answer = {
    words,
    top,
    request_id: context.awsRequestId,
    has_time_left: context.getRemainingTimeInMillis() > 0,
  };
  if (failures.length) answer.batchItemFailures = failures;
  return answer;
};
