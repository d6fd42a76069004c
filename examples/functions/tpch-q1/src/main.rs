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
//! - `map`: `lineitem` rows (Parquet row groups or Arrow batches) → one
//!   record per group, keyed
//!   `"R|S"`, with exact partial sums as decimal integer strings: `sum_qty`,
//!   `sum_base_price`, `sum_disc` (scale 2), `sum_disc_price` (scale 4),
//!   `sum_charge` (scale 6), and `count`.
//! - `combine`: adds the partials of each group.
//! - `reduce`: adds them too, and answers `avg_qty`, `avg_price` and
//!   `avg_disc` as decimal strings with 4 places, rounded half up.

use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Decimal128Type};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use base64::Engine;
use bytes::Bytes;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
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

/// A Utf8, Utf8View or LargeUtf8 column, its type resolved once.
enum Text<'a> {
    Utf8(&'a arrow_array::StringArray),
    View(&'a arrow_array::StringViewArray),
    Large(&'a arrow_array::LargeStringArray),
}

impl<'a> Text<'a> {
    fn of(col: &'a dyn Array) -> Result<Self, Error> {
        match col.data_type() {
            DataType::Utf8 => Ok(Text::Utf8(col.as_string::<i32>())),
            DataType::Utf8View => Ok(Text::View(col.as_string_view())),
            DataType::LargeUtf8 => Ok(Text::Large(col.as_string::<i64>())),
            other => Err(Error::from(format!(
                "expected a string column, found {other}"
            ))),
        }
    }

    /// The view of text `i` when it is a short one held inline (at most
    /// 12 bytes: then equal views are equal texts).
    fn inline_view(&self, i: usize) -> Option<u128> {
        match self {
            Text::View(a) => Some(a.views()[i]).filter(|&v| v as u32 <= 12),
            _ => None,
        }
    }

    fn value(&self, i: usize) -> &'a str {
        match self {
            Text::Utf8(a) => a.value(i),
            Text::View(a) => a.value(i),
            Text::Large(a) => a.value(i),
        }
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
/// (`payload = "arrow"`).
fn batches(event: &Value) -> Result<Box<dyn Iterator<Item = Result<RecordBatch, Error>>>, Error> {
    let decode = |b64: &str| base64::engine::general_purpose::STANDARD.decode(b64);
    if let Some(b64) = event["parquet"].as_str() {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(decode(b64)?))?
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()?;
        return Ok(Box::new(reader.map(|b| b.map_err(Error::from))));
    }
    let b64 = event["arrow"].as_str().ok_or(
        "expected a Parquet or Arrow payload: set payload = \"parquet\" or \"arrow\" on the job",
    )?;
    let reader = StreamReader::try_new(std::io::Cursor::new(decode(b64)?), None)?;
    Ok(Box::new(reader.map(|b| b.map_err(Error::from))))
}

fn map(event: &Value) -> Result<Value, Error> {
    // Q1 has a handful of groups: a short list searched by the two texts
    // beats building a key string for each of millions of rows.
    let mut groups: Vec<(String, String, Partial)> = Vec::new();
    // Group index by the views of inline (short) texts.
    let mut inline: Vec<((u128, u128), usize)> = Vec::new();
    for batch in batches(event)? {
        let batch = batch?;
        let dec = |name: &str| -> Result<_, Error> {
            let c = column(&batch, name)?.as_primitive::<Decimal128Type>();
            if c.scale() != 2 {
                return Err(Error::from(format!(
                    "{name}: expected scale 2, found {}",
                    c.scale()
                )));
            }
            Ok(c)
        };
        let (qty, price, disc, tax) = (
            dec("l_quantity")?,
            dec("l_extendedprice")?,
            dec("l_discount")?,
            dec("l_tax")?,
        );
        let ship = column(&batch, "l_shipdate")?.as_primitive::<Date32Type>();
        let (flag, status) = (
            Text::of(column(&batch, "l_returnflag")?)?,
            Text::of(column(&batch, "l_linestatus")?)?,
        );
        for i in 0..batch.num_rows() {
            if ship.value(i) > SHIP_CUTOFF {
                continue;
            }
            // Short texts of a view column are compared as their views.
            let views = (flag.inline_view(i), status.inline_view(i));
            let cached = match views {
                (Some(a), Some(b)) => inline.iter().find(|c| c.0 == (a, b)).map(|c| c.1),
                _ => None,
            };
            let at = match cached {
                Some(at) => at,
                None => {
                    let (f, st) = (flag.value(i), status.value(i));
                    let at = match groups.iter().position(|(a, b, _)| a == f && b == st) {
                        Some(at) => at,
                        None => {
                            groups.push((f.to_owned(), st.to_owned(), Partial::default()));
                            groups.len() - 1
                        }
                    };
                    if let (Some(a), Some(b)) = views {
                        inline.push(((a, b), at));
                    }
                    at
                }
            };
            let g = &mut groups[at].2;
            let (p, d, t) = (price.value(i), disc.value(i), tax.value(i));
            g.qty += qty.value(i);
            g.base += p;
            g.disc += d;
            g.disc_price += p * (100 - d);
            g.charge += p * (100 - d) * (100 + t);
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
