//! A map-style function for backfills with `payload = "arrow"` or
//! `payload = "parquet"`: each event carries a slice of the data set as an
//! Arrow IPC stream or as a Parquet file of whole row groups (base64, in
//! JSON, so that this is still plain `lambda_runtime` code):
//!
//! ```json
//! {"arrow": "<base64 Arrow IPC stream>", "batch": {"source": "...", "first_item": 0, "count": 1000, "call_id": "..."}}
//! {"parquet": "<base64 Parquet file>", "batch": {"source": "...", "first_item": 0, "count": 7000, "call_id": "..."}}
//! ```
//!
//! With `payload_file = true` the data arrives as a file in the sandbox
//! instead, which the event names (`{"arrow_file": "/run/sluice/payload",
//! ...}` or `{"parquet_file": ...}`).
//!
//! It answers the row count and, for every numeric (integer, float or
//! decimal) column, the sum of its non-null values, decimals in their
//! integer representation (for example cents):
//!
//! ```json
//! {"rows": 1000, "sums": {"l_quantity": 25510.0, "l_extendedprice": 3826738233}}
//! ```

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use base64::Engine;
use bytes::Bytes;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct Event {
    arrow: Option<String>,
    parquet: Option<String>,
    arrow_file: Option<String>,
    parquet_file: Option<String>,
}

/// Rows per record batch decoded from a Parquet payload.
const PARQUET_BATCH_ROWS: usize = 8 * 1024;

/// The event's record batches.
fn batches(event: Event) -> Result<Vec<RecordBatch>, Error> {
    let decode = |b64: String| base64::engine::general_purpose::STANDARD.decode(b64);
    let read = |path: String| std::fs::read(&path).map_err(|e| format!("{path}: {e}"));
    let parquet = match (event.parquet, event.parquet_file) {
        (Some(b64), _) => Some(decode(b64)?),
        (None, Some(path)) => Some(read(path)?),
        (None, None) => None,
    };
    if let Some(parquet) = parquet {
        return Ok(
            ParquetRecordBatchReaderBuilder::try_new(Bytes::from(parquet))?
                .with_batch_size(PARQUET_BATCH_ROWS)
                .build()?
                .collect::<Result<_, _>>()?,
        );
    }
    let arrow = match (event.arrow, event.arrow_file) {
        (Some(b64), _) => decode(b64)?,
        (None, Some(path)) => read(path)?,
        (None, None) => {
            return Err(Error::from(
                "expected {\"arrow\": ...} or {\"parquet\": ...}: set payload = \"arrow\" or \"parquet\"",
            ));
        }
    };
    Ok(StreamReader::try_new(arrow.as_slice(), None)?.collect::<Result<_, _>>()?)
}

/// Sum of one column: floats as f64, integers and decimals exactly.
fn sum(col: &dyn Array) -> Option<Value> {
    Some(match col.data_type() {
        DataType::Float64 => json!(
            col.as_primitive::<Float64Type>()
                .iter()
                .flatten()
                .sum::<f64>()
        ),
        DataType::Int64 => json!(
            col.as_primitive::<Int64Type>()
                .iter()
                .flatten()
                .sum::<i64>()
        ),
        DataType::Int32 => json!(
            col.as_primitive::<Int32Type>()
                .iter()
                .flatten()
                .map(i64::from)
                .sum::<i64>()
        ),
        // i128 does not fit in JSON numbers: a string.
        DataType::Decimal128(_, _) => json!(
            col.as_primitive::<Decimal128Type>()
                .iter()
                .flatten()
                .sum::<i128>()
                .to_string()
        ),
        _ => return None,
    })
}

async fn handler(event: LambdaEvent<Event>) -> Result<Value, Error> {
    let mut rows = 0usize;
    let mut sums: BTreeMap<String, Value> = BTreeMap::new();
    for batch in batches(event.payload)? {
        rows += batch.num_rows();
        for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
            let Some(s) = sum(col.as_ref()) else { continue };
            let total = match (sums.remove(field.name()), s) {
                (None, s) => s,
                (Some(Value::String(a)), Value::String(b)) => {
                    json!((a.parse::<i128>()? + b.parse::<i128>()?).to_string())
                }
                (Some(a), b) if a.is_i64() && b.is_i64() => {
                    json!(a.as_i64().unwrap_or(0) + b.as_i64().unwrap_or(0))
                }
                (Some(a), b) => json!(a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0)),
            };
            sums.insert(field.name().clone(), total);
        }
    }
    Ok(json!({ "rows": rows, "sums": sums }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
