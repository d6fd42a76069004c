//! TPC-H Query 1 as MapReduce functions for `sluice mapreduce` with
//! `payload = "parquet"` (or `"arrow"`); the `handler` setting picks the
//! role.
//!
//! ```sql
//! select l_returnflag, l_linestatus, sum(l_quantity), sum(l_extendedprice),
//!        sum(l_extendedprice * (1 - l_discount)),
//!        sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)),
//!        avg(l_quantity), avg(l_extendedprice), avg(l_discount), count(*)
//! from lineitem where l_shipdate <= date '1998-12-01' - interval '90' day
//! group by l_returnflag, l_linestatus
//! ```
//!
//! - `map`: `lineitem` rows (Parquet row groups or Arrow batches, in the
//!   event or staged as a file with `payload_file = true`) → one
//!   record per group, keyed
//!   `"R|S"`, with exact partial sums as decimal integer strings: `sum_qty`,
//!   `sum_base_price`, `sum_disc` (scale 2), `sum_disc_price` (scale 4),
//!   `sum_charge` (scale 6), and `count`.
//! - `combine`: adds the partials of each group.
//! - `reduce`: adds them too, and answers `avg_qty`, `avg_price` and
//!   `avg_disc` as decimal strings with 4 places, rounded half up.

use std::borrow::Cow;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Decimal64Type, Decimal128Type, Int32Type};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::{DataType, Schema};
use base64::Engine;
use bytes::Bytes;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use parquet::arrow::arrow_reader::{
    ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use parquet::basic::Type as PhysicalType;
use serde_json::{Value, json};

/// `date '1998-12-01' - interval '90' day`, in days since 1970-01-01.
const SHIP_CUTOFF: i32 = 10_471;

/// The partial aggregates of one group.
#[derive(Default, Clone, Copy)]
struct Partial {
    qty: i128,
    base: i128,
    disc: i128,
    disc_price: i128,
    charge: i128,
    count: i128,
}

const FIELDS: [&str; 6] = [
    "sum_qty",
    "sum_base_price",
    "sum_disc",
    "sum_disc_price",
    "sum_charge",
    "count",
];

impl Partial {
    fn values(&self) -> [i128; 6] {
        [
            self.qty,
            self.base,
            self.disc,
            self.disc_price,
            self.charge,
            self.count,
        ]
    }

    fn from_json(v: &Value) -> Result<Partial, Error> {
        let get = |k: &str| -> Result<i128, Error> {
            v[k].as_str()
                .ok_or_else(|| Error::from(format!("missing {k} in {v}")))?
                .parse::<i128>()
                .map_err(|e| Error::from(format!("{k}: {e}")))
        };
        Ok(Partial {
            qty: get("sum_qty")?,
            base: get("sum_base_price")?,
            disc: get("sum_disc")?,
            disc_price: get("sum_disc_price")?,
            charge: get("sum_charge")?,
            count: get("count")?,
        })
    }

    fn add(&mut self, o: &Partial) {
        self.qty += o.qty;
        self.base += o.base;
        self.disc += o.disc;
        self.disc_price += o.disc_price;
        self.charge += o.charge;
        self.count += o.count;
    }

    fn to_json(self) -> Value {
        let mut m = serde_json::Map::new();
        for (k, v) in FIELDS.iter().zip(self.values()) {
            m.insert((*k).to_owned(), json!(v.to_string()));
        }
        Value::Object(m)
    }
}

/// A text column as small integer codes per row and the texts they stand
/// for: a dictionary column's keys and values as they are, any other text
/// column interned (Q1's texts have a handful of values).
struct Codes<'a> {
    codes: Cow<'a, [i32]>,
    texts: Vec<&'a str>,
}

impl<'a> Codes<'a> {
    fn of(col: &'a dyn Array, name: &str) -> Result<Self, Error> {
        if let Some(dict) = col.as_any_dictionary_opt() {
            let keys = dict.keys().as_primitive_opt::<Int32Type>();
            let (Some(keys), Some(texts)) = (keys, dict.values().as_string_opt::<i32>()) else {
                return Err(Error::from(format!(
                    "{name}: expected a dictionary of Int32 keys and Utf8 texts, found {}",
                    col.data_type()
                )));
            };
            return Ok(Codes {
                codes: Cow::Borrowed(keys.values()),
                texts: texts.iter().map(|t| t.unwrap_or("")).collect(),
            });
        }
        let text = |i: usize| -> &'a str {
            match col.data_type() {
                DataType::Utf8View => col.as_string_view().value(i),
                DataType::LargeUtf8 => col.as_string::<i64>().value(i),
                _ => col.as_string::<i32>().value(i),
            }
        };
        if !matches!(
            col.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        ) {
            return Err(Error::from(format!(
                "{name}: expected a text column, found {}",
                col.data_type()
            )));
        }
        let mut texts: Vec<&'a str> = Vec::new();
        let codes = (0..col.len())
            .map(|i| {
                let t = text(i);
                let at = texts.iter().position(|&x| x == t).unwrap_or_else(|| {
                    texts.push(t);
                    texts.len() - 1
                });
                at as i32
            })
            .collect();
        Ok(Codes {
            codes: Cow::Owned(codes),
            texts,
        })
    }
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array, Error> {
    batch
        .column_by_name(name)
        .map(AsRef::as_ref)
        .ok_or_else(|| Error::from(format!("the batch has no column {name}")))
}

/// Rows per record batch decoded from a Parquet payload.
const PARQUET_BATCH_ROWS: usize = 8 * 1024;

/// The record batches of the event: `{"parquet": "<base64 Parquet file>"}`
/// (`payload = "parquet"`) or `{"arrow": "<base64 Arrow IPC stream>"}`
/// (`payload = "arrow"`); with `payload_file = true`, `{"parquet_file":
/// "<path>"}` or `{"arrow_file": "<path>"}`, the data staged in the sandbox.
fn batches(event: &Value) -> Result<Box<dyn Iterator<Item = Result<RecordBatch, Error>>>, Error> {
    let bytes = |inline: &str, file: &str| -> Result<Option<Vec<u8>>, Error> {
        if let Some(b64) = event[inline].as_str() {
            return Ok(Some(base64::engine::general_purpose::STANDARD.decode(b64)?));
        }
        match event[file].as_str() {
            Some(path) => Ok(Some(
                std::fs::read(path).map_err(|e| format!("{path}: {e}"))?,
            )),
            None => Ok(None),
        }
    };
    if let Some(parquet) = bytes("parquet", "parquet_file")? {
        let reader = parquet_reader(Bytes::from(parquet))?;
        return Ok(Box::new(reader.map(|b| b.map_err(Error::from))));
    }
    let arrow = bytes("arrow", "arrow_file")?.ok_or(
        "expected a Parquet or Arrow payload: set payload = \"parquet\" or \"arrow\" on the job",
    )?;
    let reader = StreamReader::try_new(std::io::Cursor::new(arrow), None)?;
    Ok(Box::new(reader.map(|b| b.map_err(Error::from))))
}

/// A reader of a Parquet file that reads 64-bit integer decimals as
/// `Decimal64` (their stored values as they are) rather than widening each
/// to 128 bits, and texts as dictionaries (keys, not a string per row).
fn parquet_reader(file: Bytes) -> Result<ParquetRecordBatchReader, Error> {
    let plain = ParquetRecordBatchReaderBuilder::try_new(file.clone())?;
    let (schema, columns) = (plain.schema().clone(), plain.parquet_schema());
    // Flat files only: then field i is leaf column i.
    let flat = columns.num_columns() == schema.fields().len();
    let mut hinted = false;
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| match f.data_type() {
            DataType::Decimal128(p, s)
                if flat && columns.column(i).physical_type() == PhysicalType::INT64 =>
            {
                hinted = true;
                Arc::new(
                    f.as_ref()
                        .clone()
                        .with_data_type(DataType::Decimal64(*p, *s)),
                )
            }
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
                hinted = true;
                let dict =
                    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8));
                Arc::new(f.as_ref().clone().with_data_type(dict))
            }
            _ => f.clone(),
        })
        .collect();
    let builder = if hinted {
        let hint = Schema::new_with_metadata(fields, schema.metadata().clone());
        let options = ArrowReaderOptions::new().with_schema(Arc::new(hint));
        ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)?
    } else {
        plain
    };
    Ok(builder.with_batch_size(PARQUET_BATCH_ROWS).build()?)
}

/// A scale-2 decimal column (at most 18 digits) as its integer values.
fn cents<'a>(batch: &'a RecordBatch, name: &str) -> Result<Cow<'a, [i64]>, Error> {
    let col = column(batch, name)?;
    match col.data_type() {
        DataType::Decimal64(_, 2) => {
            Ok(Cow::Borrowed(col.as_primitive::<Decimal64Type>().values()))
        }
        DataType::Decimal128(p, 2) if *p <= 18 => Ok(Cow::Owned(
            col.as_primitive::<Decimal128Type>()
                .values()
                .iter()
                .map(|&v| v as i64) // at most 18 digits: fits
                .collect(),
        )),
        other => Err(Error::from(format!(
            "{name}: expected a decimal with scale 2 and at most 18 digits, found {other}"
        ))),
    }
}

fn map(event: &Value) -> Result<Value, Error> {
    // Q1 has a handful of groups: a short list searched by the two texts
    // beats building a key string for each of millions of rows.
    let mut groups: Vec<(String, String, Partial)> = Vec::new();
    for batch in batches(event)? {
        let batch = batch?;
        let (qty, price, disc, tax) = (
            cents(&batch, "l_quantity")?,
            cents(&batch, "l_extendedprice")?,
            cents(&batch, "l_discount")?,
            cents(&batch, "l_tax")?,
        );
        let ship = column(&batch, "l_shipdate")?.as_primitive::<Date32Type>();
        let ship = ship.values();
        let flag = Codes::of(column(&batch, "l_returnflag")?, "l_returnflag")?;
        let status = Codes::of(column(&batch, "l_linestatus")?, "l_linestatus")?;
        // Group index by (flag code, status code), filled as codes appear.
        let width = status.texts.len();
        let mut lut = vec![usize::MAX; flag.texts.len() * width];
        for i in 0..batch.num_rows() {
            if ship[i] > SHIP_CUTOFF {
                continue;
            }
            let (f, st) = (flag.codes[i] as usize, status.codes[i] as usize);
            let slot = f * width + st;
            let mut at = lut[slot];
            if at == usize::MAX {
                let (ft, stt) = (flag.texts[f], status.texts[st]);
                at = match groups.iter().position(|(a, b, _)| a == ft && b == stt) {
                    Some(at) => at,
                    None => {
                        groups.push((ft.to_owned(), stt.to_owned(), Partial::default()));
                        groups.len() - 1
                    }
                };
                lut[slot] = at;
            }
            let g = &mut groups[at].2;
            let (p, d, t) = (
                i128::from(price[i]),
                i128::from(disc[i]),
                i128::from(tax[i]),
            );
            g.qty += i128::from(qty[i]);
            g.base += p;
            g.disc += d;
            let disc_price = p * (100 - d);
            g.disc_price += disc_price;
            g.charge += disc_price * (100 + t);
            g.count += 1;
        }
    }
    groups.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    Ok(json!({"records": groups
        .into_iter()
        .map(|(f, st, p)| json!({"key": format!("{f}|{st}"), "value": p.to_json()}))
        .collect::<Vec<_>>()}))
}

fn reduce(event: &Value, finish: bool) -> Result<Value, Error> {
    let mut records = Vec::new();
    for g in event["groups"].as_array().into_iter().flatten() {
        let mut total = Partial::default();
        for v in g["values"].as_array().into_iter().flatten() {
            total.add(&Partial::from_json(v)?);
        }
        let mut value = total.to_json();
        if finish && total.count > 0 {
            // Averages of scale-2 sums, exact as a fraction, and rounded.
            let avg = |sum: i128| {
                let q = (sum * 100 + total.count / 2) / total.count; // scale 4, half up
                format!("{}.{:04}", q / 10_000, q % 10_000)
            };
            value["avg_qty"] = json!(avg(total.qty));
            value["avg_price"] = json!(avg(total.base));
            value["avg_disc"] = json!(avg(total.disc));
        }
        records.push(json!({"key": g["key"], "value": value}));
    }
    Ok(json!({ "records": records }))
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let role = std::env::var("_HANDLER").unwrap_or_default();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let role = role.clone();
        async move {
            match role.as_str() {
                "map" => map(&event.payload),
                "combine" => reduce(&event.payload, false),
                "reduce" => reduce(&event.payload, true),
                other => Err(Error::from(format!(
                    "unknown handler {other:?}: set handler = \"map\", \"combine\" or \"reduce\""
                ))),
            }
        }
    }))
    .await
}
