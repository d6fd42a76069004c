//! Item readers: one file at a time, items in file order. Local files are
//! read directly; remote sources (URLs, see [`crate::source`]) through
//! `object_store`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::Schema;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderBuilder, ParquetRecordBatchReaderBuilder};
use parquet::schema::types::SchemaDescriptor;
use serde_json::Value;

use crate::source;
use crate::{ArrowCompression, BackfillError, Format, Input, ItemError};

/// One item read from a source: a JSON value, or a line that could not be
/// turned into one.
#[derive(Debug)]
pub(crate) enum Item {
    Value(Value),
    /// One value already written as JSON text (Parquet rows and JSON lines
    /// read by [`read_file_json`]): calls of plain backfills pass it on as
    /// it is, with no `Value` built, sorted and written again per item.
    Json(String),
    Bad(ItemError),
}

/// Rows per Arrow record batch when reading Parquet.
const PARQUET_BATCH_ROWS: usize = 1024;

fn open(path: &Path) -> Result<File, BackfillError> {
    File::open(path).map_err(|source| BackfillError::Read {
        file: path.to_path_buf(),
        source,
    })
}

/// The bytes of a local file or a remote object, streamed.
/// How a file of lines (CSV, JSON lines, text) is compressed, from its
/// name: `.gz` (gzip, also several members one after another) or `.zst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Gzip,
    Zstd,
}

fn codec_of(path: &Path) -> Option<Codec> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".gz") || name.ends_with(".gzip") {
        Some(Codec::Gzip)
    } else if name.ends_with(".zst") || name.ends_with(".zstd") {
        Some(Codec::Zstd)
    } else {
        None
    }
}

/// The bytes of a local or remote file, decompressed as its name says.
fn open_bytes(path: &Path) -> Result<Box<dyn Read + Send>, BackfillError> {
    let raw: Box<dyn Read + Send> = if source::is_remote(path) {
        Box::new(source::open(path)?)
    } else {
        Box::new(open(path)?)
    };
    Ok(match codec_of(path) {
        None => raw,
        Some(Codec::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        Some(Codec::Zstd) => Box::new(zstd::stream::read::Decoder::new(raw).map_err(|source| {
            BackfillError::Read {
                file: path.to_path_buf(),
                source,
            }
        })?),
    })
}

pub(crate) fn parquet_error(file: &Path, e: impl std::fmt::Display) -> BackfillError {
    BackfillError::Parquet {
        file: file.to_path_buf(),
        message: e.to_string(),
    }
}

/// Reads `sources` one after another with `read_file(index, file, send)`,
/// which hands what it reads to `send`: each goes to `tx` until the
/// receiver goes away or a read fails (then its error is sent last).
pub(crate) fn send_each<T>(
    sources: &[PathBuf],
    tx: &tokio::sync::mpsc::Sender<Result<T, BackfillError>>,
    mut read_file: impl FnMut(
        usize,
        &Path,
        &mut dyn FnMut(T) -> ControlFlow<()>,
    ) -> Result<(), BackfillError>,
) {
    for (i, file) in sources.iter().enumerate() {
        let mut closed = false;
        let mut send = |value: T| {
            if tx.blocking_send(Ok(value)).is_err() {
                closed = true;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        };
        if let Err(e) = read_file(i, file, &mut send) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        if closed {
            return;
        }
    }
}

/// Rows of each row group of a Parquet file.
pub(crate) fn parquet_row_groups(path: &Path) -> Result<Vec<i64>, BackfillError> {
    if source::is_remote(path) {
        return source::parquet_remote::row_groups(path).map_err(|e| parquet_error(path, e));
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| parquet_error(path, e))?;
    Ok(builder
        .metadata()
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows())
        .collect())
}

/// Rows of a Parquet file, from its metadata.
pub(crate) fn parquet_rows(path: &Path) -> Result<u64, BackfillError> {
    Ok(parquet_row_groups(path)?
        .iter()
        .map(|&n| u64::try_from(n).unwrap_or(0))
        .sum())
}

/// Reads `path` and calls `each(index, item)` for every item, in order, until
/// the file ends or `each` breaks.
pub(crate) fn read_file(
    path: &Path,
    input: &Input,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    read(path, input, false, each)
}

/// Like [`read_file`], but Parquet rows and (without `columns`) JSON lines
/// come as [`Item::Json`]: for callers that only pass items on (no field of
/// an item is looked at).
pub(crate) fn read_file_json(
    path: &Path,
    input: &Input,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    read(path, input, true, each)
}

fn read(
    path: &Path,
    input: &Input,
    as_json: bool,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let columns = input.columns.as_deref();
    let cap = input.cap_of(path);
    // `max_items`: the file's first `cap` items only.
    let each = &mut |index: u64, item: Item| {
        if cap.is_some_and(|c| index >= c) {
            ControlFlow::Break(())
        } else {
            each(index, item)
        }
    };
    match input.format {
        Format::Parquet => read_parquet(path, columns, cap, as_json, each),
        Format::Csv => read_csv(
            path,
            input.csv_delimiter,
            input.csv_headers.as_deref(),
            columns,
            each,
        ),
        Format::Jsonl | Format::Text => read_lines(path, input.format, columns, as_json, each),
        Format::Json => {
            json_doc::read(path, input.items_pointer.as_deref(), columns, as_json, each)
        }
        Format::Avro => read_avro(path, columns, as_json, each),
        // The file is the item: nothing of it is read here.
        Format::Objects => {
            let _ = each(0, Item::Value(source::object_item(path)));
            Ok(())
        }
    }
}

/// The top-level fields every item of `path` has (its CSV header, its
/// Parquet file's Arrow schema), or `None` for formats whose items may
/// differ (JSON lines, text). Reads only the header or the footer.
pub(crate) fn field_names(
    path: &Path,
    input: &Input,
) -> Result<Option<Vec<String>>, BackfillError> {
    let schema = match input.format {
        Format::Jsonl | Format::Json | Format::Text | Format::Objects => return Ok(None),
        Format::Csv if input.csv_headers.is_some() => return Ok(input.csv_headers.clone()),
        Format::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .delimiter(input.csv_delimiter)
                .from_reader(open_bytes(path)?);
            let headers = reader.headers().map_err(|e| csv_fatal(path, 1, e))?;
            return Ok(Some(headers.iter().map(str::to_owned).collect()));
        }
        Format::Avro => {
            let reader = apache_avro::Reader::new(BufReader::new(open_bytes(path)?))
                .map_err(|e| avro_error(path, 0, e))?;
            return Ok(match reader.writer_schema() {
                apache_avro::Schema::Record(record) => {
                    Some(record.fields.iter().map(|f| f.name.clone()).collect())
                }
                // Items that are not records have no fields.
                _ => None,
            });
        }
        Format::Parquet if source::is_remote(path) => {
            let (_, _, meta) =
                source::parquet_remote::metadata(path).map_err(|e| parquet_error(path, e))?;
            let file = meta.file_metadata();
            parquet::arrow::parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
                .map_err(|e| parquet_error(path, e))?
        }
        Format::Parquet => ParquetRecordBatchReaderBuilder::try_new(open(path)?)
            .map_err(|e| parquet_error(path, e))?
            .schema()
            .as_ref()
            .clone(),
    };
    Ok(Some(
        schema.fields().iter().map(|f| f.name().clone()).collect(),
    ))
}

/// The projection of `columns` (top-level fields of the file's Arrow
/// schema), or an error naming the first missing one.
pub(crate) fn projection(
    path: &Path,
    schema: &Schema,
    parquet: &SchemaDescriptor,
    columns: &[String],
) -> Result<ProjectionMask, BackfillError> {
    let indices = field_indices(path, schema, columns)?;
    Ok(ProjectionMask::roots(parquet, indices))
}

/// The indices of `columns` among the top-level fields of `schema`, or an
/// error naming the first missing one.
pub(crate) fn field_indices(
    path: &Path,
    schema: &Schema,
    columns: &[String],
) -> Result<Vec<usize>, BackfillError> {
    let mut indices = Vec::with_capacity(columns.len());
    for c in columns {
        match schema.index_of(c) {
            Ok(i) => indices.push(i),
            Err(_) => {
                return Err(BackfillError::MissingColumn {
                    file: path.to_path_buf(),
                    column: c.clone(),
                    available: schema.fields().iter().map(|f| f.name().clone()).collect(),
                });
            }
        }
    }
    Ok(indices)
}

/// Applies `columns` to a Parquet reader builder (sync or async).
pub(crate) fn project<T>(
    path: &Path,
    builder: ArrowReaderBuilder<T>,
    columns: Option<&[String]>,
) -> Result<ArrowReaderBuilder<T>, BackfillError> {
    let Some(columns) = columns else {
        return Ok(builder);
    };
    let mask = projection(path, builder.schema(), builder.parquet_schema(), columns)?;
    Ok(builder.with_projection(mask))
}

fn read_parquet(
    path: &Path,
    columns: Option<&[String]>,
    max_rows: Option<u64>,
    as_json: bool,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let mut index = 0u64;
    let mut error = None;
    read_parquet_batches(path, columns, max_rows, &mut |batch| match batch_items(
        path, &batch, as_json, &mut index, each,
    ) {
        Ok(flow) => flow,
        Err(e) => {
            error = Some(e);
            ControlFlow::Break(())
        }
    })?;
    error.map_or(Ok(()), Err)
}

/// Reads the record batches of a local or remote Parquet file (only
/// `columns`, if given; only its first `max_rows` rows, if given), calling
/// `each` until it breaks.
pub(crate) fn read_parquet_batches(
    path: &Path,
    columns: Option<&[String]>,
    max_rows: Option<u64>,
    each: &mut dyn FnMut(RecordBatch) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let mut left = max_rows;
    let each = &mut |batch: RecordBatch| match &mut left {
        None => each(batch),
        Some(0) => ControlFlow::Break(()),
        Some(n) => {
            let take = (*n).min(batch.num_rows() as u64);
            *n -= take;
            let flow = each(batch.slice(0, take as usize));
            if *n == 0 {
                ControlFlow::Break(())
            } else {
                flow
            }
        }
    };
    if source::is_remote(path) {
        return source::parquet_remote::batches(path, PARQUET_BATCH_ROWS, columns, &mut |batch| {
            Ok(each(batch).is_continue())
        })
        .map_err(|e| parquet_error(path, e));
    }
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| parquet_error(path, e))?;
    let reader = project(path, builder, columns)?
        .with_batch_size(PARQUET_BATCH_ROWS)
        .build()
        .map_err(|e| parquet_error(path, e))?;
    for batch in reader {
        let batch = batch.map_err(|e| parquet_error(path, e))?;
        if each(batch).is_break() {
            break;
        }
    }
    Ok(())
}

thread_local! {
    /// The compression state of [`ipc_stream`], one per thread and reused:
    /// arrow-ipc's `StreamWriter` makes a new one per stream, and with the
    /// `zstd` feature that allocates a zstd context even when nothing is
    /// compressed, which cost more than encoding a call of 1,000 rows.
    static COMPRESSION: std::cell::RefCell<arrow_ipc::writer::CompressionContext> =
        std::cell::RefCell::new(arrow_ipc::writer::CompressionContext::default());
}

/// The end-of-stream marker of the Arrow IPC stream format: a continuation
/// marker and a zero message length.
const END_OF_STREAM: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];

/// `batches` as one Arrow IPC stream (what arrow-ipc's `StreamWriter`
/// writes, with a compression context reused across calls).
pub(crate) fn ipc_stream(batches: &[RecordBatch], compression: ArrowCompression) -> Vec<u8> {
    use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions, write_message};

    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let written = (|| {
        let codec = match compression {
            ArrowCompression::None => None,
            ArrowCompression::Lz4 => Some(arrow_ipc::CompressionType::LZ4_FRAME),
            ArrowCompression::Zstd => Some(arrow_ipc::CompressionType::ZSTD),
        };
        let opts = IpcWriteOptions::default().try_with_compression(codec)?;
        let data = IpcDataGenerator::default();
        let mut dictionaries = DictionaryTracker::new(false);
        let schema =
            data.schema_to_bytes_with_dictionary_tracker(&first.schema(), &mut dictionaries, &opts);
        write_message(&mut out, schema, &opts)?;
        COMPRESSION.with_borrow_mut(|ctx| {
            for b in batches {
                let (dicts, message) = data.encode(b, &mut dictionaries, &opts, ctx)?;
                for d in dicts {
                    write_message(&mut out, d, &opts)?;
                }
                write_message(&mut out, message, &opts)?;
            }
            Ok::<_, arrow_schema::ArrowError>(())
        })?;
        out.extend_from_slice(&END_OF_STREAM);
        Ok::<_, arrow_schema::ArrowError>(())
    })();
    // Writing to memory fails only on schema mismatches, which slices of
    // one file's batches cannot have.
    written.expect("record batches of one file encode as one IPC stream");
    out
}

/// Hands the rows of `batch` to `each` as JSON objects (`as_json`: as
/// their JSON text).
fn batch_items(
    path: &Path,
    batch: &RecordBatch,
    as_json: bool,
    index: &mut u64,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<ControlFlow<()>, BackfillError> {
    if batch.num_rows() == 0 {
        return Ok(ControlFlow::Continue(()));
    }
    if as_json {
        let mut writer = arrow_json::LineDelimitedWriter::new(Vec::new());
        writer.write(batch).map_err(|e| parquet_error(path, e))?;
        writer.finish().map_err(|e| parquet_error(path, e))?;
        let text = String::from_utf8(writer.into_inner()).map_err(|e| parquet_error(path, e))?;
        // One object per line: JSON strings escape their line breaks.
        for row in text.lines() {
            if each(*index, Item::Json(row.to_owned())).is_break() {
                return Ok(ControlFlow::Break(()));
            }
            *index += 1;
        }
        return Ok(ControlFlow::Continue(()));
    }
    let mut writer = arrow_json::ArrayWriter::new(Vec::new());
    writer.write(batch).map_err(|e| parquet_error(path, e))?;
    writer.finish().map_err(|e| parquet_error(path, e))?;
    let rows: Vec<Value> =
        serde_json::from_slice(&writer.into_inner()).map_err(|e| parquet_error(path, e))?;
    for row in rows {
        if each(*index, Item::Value(row)).is_break() {
            return Ok(ControlFlow::Break(()));
        }
        *index += 1;
    }
    Ok(ControlFlow::Continue(()))
}

/// Reads a CSV file whose first line is its header, or, with `given`
/// names, a file without one (its first line is an item).
fn read_csv(
    path: &Path,
    delimiter: u8,
    given: Option<&[String]>,
    columns: Option<&[String]>,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    // Flexible, and records read as bytes: a record with too many or too
    // few fields, or a field that is not UTF-8, is one failed item that
    // keeps its text (the dead-letter file gets it), not an error without it.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(given.is_none())
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(Tail::new(open_bytes(path)?));
    let headers = match given {
        Some(names) => names.to_vec(),
        None => reader
            .headers()
            .map_err(|e| csv_fatal(path, 1, e))?
            .iter()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    };
    let header = if given.is_some() {
        "csv_headers"
    } else {
        "header"
    };
    // Which fields to keep: all, or the projected ones (each must exist).
    let keep: Vec<bool> = match columns {
        None => vec![true; headers.len()],
        Some(columns) => {
            if let Some(missing) = columns.iter().find(|c| !headers.contains(c)) {
                return Err(BackfillError::MissingColumn {
                    file: path.to_path_buf(),
                    column: missing.clone(),
                    available: headers,
                });
            }
            headers.iter().map(|h| columns.contains(h)).collect()
        }
    };
    // Items are objects keyed by column name: a name kept twice would lose
    // one of its values in every row.
    for (i, name) in headers.iter().enumerate() {
        if let Some(j) = headers[i + 1..].iter().position(|h| h == name)
            && keep[i]
        {
            return Err(BackfillError::Csv {
                file: path.to_path_buf(),
                line: 1,
                message: format!(
                    "the header names column {name:?} twice (fields {} and {}); items are \
                     objects keyed by column name, so one of its values would be lost in \
                     every row: rename one, or leave it out with `columns`",
                    i + 1,
                    i + j + 2
                ),
            });
        }
    }
    let mut record = csv::ByteRecord::new();
    let mut index = 0u64;
    loop {
        let item = match reader.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let end = reader.position().byte();
                let line = reader.get_mut().first_line(end, &record);
                let bad = |message: String| {
                    Item::Bad(ItemError {
                        file: path.to_path_buf(),
                        line,
                        message,
                        raw: csv_line(&record, delimiter),
                    })
                };
                if let Some(unclosed) = unclosed_quote(path, &reader, &record, line, delimiter)? {
                    Item::Bad(unclosed)
                } else if record.len() != headers.len() {
                    bad(format!(
                        "{} fields where the {header} has {}",
                        record.len(),
                        headers.len()
                    ))
                } else {
                    // Every field is checked, kept or not, each once.
                    let mut object = serde_json::Map::new();
                    let mut not_utf8 = None;
                    for (i, ((k, v), keep)) in
                        headers.iter().zip(record.iter()).zip(&keep).enumerate()
                    {
                        match std::str::from_utf8(v) {
                            Ok(v) if *keep => {
                                object.insert(k.clone(), Value::String(v.to_owned()));
                            }
                            Ok(_) => {}
                            Err(_) => {
                                not_utf8 = Some(i);
                                break;
                            }
                        }
                    }
                    match not_utf8 {
                        Some(i) => bad(format!("field `{}` is not valid UTF-8", headers[i])),
                        None => Item::Value(Value::Object(object)),
                    }
                }
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                return Err(csv_fatal(path, line, e));
            }
        };
        if each(index, item).is_break() {
            return Ok(());
        }
        index += 1;
    }
}

/// The CSV bytes read through it: their count, the last of them (so that
/// [`unclosed_quote`] can tell a file's last record), and where their line
/// breaks are, for [`Tail::first_line`]. The csv reader's own line numbers
/// are off after a CRLF or a blank line (a record's position is that of
/// the line break before it).
struct Tail<R> {
    inner: R,
    read: u64,
    last: Option<u8>,
    eof: bool,
    /// Offsets of the `\n`s read and not yet counted into `lines`.
    breaks: VecDeque<u64>,
    /// `\n`s before the last record asked about.
    lines: u64,
}

impl<R> Tail<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            read: 0,
            last: None,
            eof: false,
            breaks: VecDeque::new(),
            lines: 0,
        }
    }

    /// The 1-based line on which `record`, whose terminator ends at byte
    /// `end`, begins: the line of its last byte, less the line breaks
    /// inside its (quoted) fields. Records must be asked about in order.
    fn first_line(&mut self, end: u64, record: &csv::ByteRecord) -> u64 {
        let mut terminated = false;
        while let Some(&at) = self.breaks.front().filter(|&&at| at < end) {
            self.lines += 1;
            terminated = at + 1 == end;
            self.breaks.pop_front();
        }
        // A record ended by `\n` has counted its own terminator.
        let last = 1 + self.lines - u64::from(terminated);
        let inside: usize = record
            .iter()
            .map(|f| memchr::memchr_iter(b'\n', f).count())
            .sum();
        last.saturating_sub(inside as u64).max(1)
    }
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.eof |= n == 0 && !buf.is_empty();
        let base = self.read;
        self.breaks
            .extend(memchr::memchr_iter(b'\n', &buf[..n]).map(|i| base + i as u64));
        self.read += n as u64;
        if n > 0 {
            self.last = Some(buf[n - 1]);
        }
        Ok(n)
    }
}

/// The last record of a file that ends inside a quoted field, as a failed
/// item. The csv reader takes such a field to run to the end of the file,
/// so one stray quote would otherwise fold every later record into one
/// field, silently. Looked for only in the file's last record (all of it
/// read), and only if that could be one: its last field spans lines (only a
/// quoted field can), or the file does not end with a line break. The
/// record's bytes are then read again from the file, to be sure and to keep
/// them as they were.
fn unclosed_quote<R: Read>(
    path: &Path,
    reader: &csv::Reader<Tail<R>>,
    record: &csv::ByteRecord,
    first_line: u64,
    delimiter: u8,
) -> Result<Option<ItemError>, BackfillError> {
    let src = reader.get_ref();
    let Some(start) = record.position() else {
        return Ok(None);
    };
    if !src.eof || reader.position().byte() != src.read {
        return Ok(None);
    }
    let spans_lines = record
        .iter()
        .next_back()
        .is_some_and(|f| f.iter().any(|&b| b == b'\n' || b == b'\r'));
    if !spans_lines && matches!(src.last, Some(b'\n' | b'\r')) {
        return Ok(None);
    }
    let mut raw = Vec::new();
    let failed = |source| BackfillError::Read {
        file: path.to_path_buf(),
        source,
    };
    if source::is_remote(path) || codec_of(path).is_some() {
        // No seeking in a stream: read up to the record again.
        let mut f = open_bytes(path)?;
        std::io::copy(&mut (&mut f).take(start.byte()), &mut std::io::sink()).map_err(failed)?;
        f.read_to_end(&mut raw).map_err(failed)?;
    } else {
        let mut f = open(path)?;
        f.seek(std::io::SeekFrom::Start(start.byte()))
            .map_err(failed)?;
        f.read_to_end(&mut raw).map_err(failed)?;
    }
    let Some(opened) = open_quote_at_end(&raw, delimiter) else {
        return Ok(None);
    };
    // The file's last line break is inside the field, not the record's
    // terminator that `Tail::first_line` took it for.
    let first_line = first_line + u64::from(raw.last() == Some(&b'\n'));
    // After a CRLF or a blank line the reader's record starts at a line
    // break: the record's own text begins after them.
    let lead = raw
        .iter()
        .take_while(|&&b| b == b'\n' || b == b'\r')
        .count();
    let line = first_line + raw[lead..opened].iter().filter(|&&b| b == b'\n').count() as u64;
    raw.drain(..lead);
    Ok(Some(ItemError {
        file: path.to_path_buf(),
        line: first_line,
        message: format!(
            "the quoted field opened on line {line} is never closed (the file ends inside it)"
        ),
        raw: String::from_utf8_lossy(&raw).into_owned(),
    }))
}

/// Where the quoted field that `text` (CSV records) ends inside was opened,
/// if it ends inside one: the csv reader's rules (a quote opens a field only
/// at its start; `""` inside is a quote).
fn open_quote_at_end(text: &[u8], delimiter: u8) -> Option<usize> {
    enum State {
        FieldStart,
        Unquoted,
        Quoted(usize),
        QuoteInQuoted(usize),
    }
    let mut state = State::FieldStart;
    for (i, &b) in text.iter().enumerate() {
        let ends_field = b == delimiter || b == b'\n' || b == b'\r';
        state = match state {
            State::FieldStart if b == b'"' => State::Quoted(i),
            State::FieldStart | State::Unquoted if ends_field => State::FieldStart,
            State::FieldStart | State::Unquoted => State::Unquoted,
            State::Quoted(at) if b == b'"' => State::QuoteInQuoted(at),
            State::Quoted(at) => State::Quoted(at),
            State::QuoteInQuoted(at) if b == b'"' => State::Quoted(at),
            State::QuoteInQuoted(_) if ends_field => State::FieldStart,
            State::QuoteInQuoted(_) => State::Unquoted,
        };
    }
    match state {
        State::Quoted(at) => Some(at),
        _ => None,
    }
}

/// A record written back as one CSV line (quoted where its fields need
/// it), for the dead-letter file.
fn csv_line(record: &csv::ByteRecord, delimiter: u8) -> String {
    let mut w = csv::WriterBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let _ = w.write_byte_record(record);
    let mut bytes = w.into_inner().unwrap_or_default();
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn csv_fatal(path: &Path, line: u64, e: csv::Error) -> BackfillError {
    BackfillError::Csv {
        file: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

fn read_lines(
    path: &Path,
    format: Format,
    columns: Option<&[String]>,
    as_json: bool,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let reader = BufReader::new(open_bytes(path)?);
    let mut index = 0u64;
    let mut warned_no_column = false;
    for (n, line) in reader.split(b'\n').enumerate() {
        let line_no = n as u64 + 1;
        let mut bytes = line.map_err(|source| BackfillError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        // A UTF-8 byte order mark (Windows tools write one) is not data.
        if n == 0 && bytes.starts_with(b"\xEF\xBB\xBF") {
            bytes.drain(..3);
        }
        let item = match format {
            Format::Jsonl => {
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    continue; // blank lines are not items
                }
                if as_json && columns.is_none() {
                    // Checked, then passed on as it is.
                    match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
                        Err(e) => Item::Bad(bad_line(path, line_no, &bytes, json_error(&e))),
                        Ok(_) => match utf8(path, line_no, bytes) {
                            Ok(text) if text.trim().len() == text.len() => Item::Json(text),
                            Ok(text) => Item::Json(text.trim().to_owned()),
                            Err(bad) => Item::Bad(bad),
                        },
                    }
                } else {
                    match serde_json::from_slice::<Value>(&bytes) {
                        Ok(v) => {
                            let at = (path, line_no, &bytes[..]);
                            json_item(v, columns, at, &mut warned_no_column)
                        }
                        Err(e) => Item::Bad(bad_line(path, line_no, &bytes, json_error(&e))),
                    }
                }
            }
            _ => match utf8(path, line_no, bytes) {
                Ok(s) => Item::Value(Value::String(s)),
                Err(bad) => Item::Bad(bad),
            },
        };
        if each(index, item).is_break() {
            return Ok(());
        }
        index += 1;
    }
    Ok(())
}

/// The item a JSON value makes (at `line` of `path`, whose text is `raw`):
/// with `columns`, an object keeps only those fields (warning once per
/// file, through `warned`, when one has none of them), and anything else
/// is a failed item, since the function expects an object.
fn json_item(
    value: Value,
    columns: Option<&[String]>,
    (path, line, raw): (&Path, u64, &[u8]),
    warned: &mut bool,
) -> Item {
    let Some(columns) = columns else {
        return Item::Value(value);
    };
    match value {
        Value::Object(mut object) => {
            let had_fields = !object.is_empty();
            object.retain(|k, _| columns.contains(k));
            if had_fields && object.is_empty() && !*warned {
                // Sparse items are allowed; a misspelt column would empty
                // every one, silently.
                *warned = true;
                tracing::warn!(
                    file = %path.display(),
                    line,
                    columns = ?columns,
                    "an item has none of the chosen columns, so the function gets it as {{}} (a misspelt column?); said once per file"
                );
            }
            Item::Value(Value::Object(object))
        }
        v => Item::Bad(bad_line(
            path,
            line,
            raw,
            format!(
                "{} is not a JSON object, so `columns` cannot choose fields from it",
                sluice_ingest::event::json_type(&v)
            ),
        )),
    }
}

/// JSON documents holding an array of items (`format = "json"`), read as
/// a stream: the elements one by one, never the whole document.
mod json_doc {
    use std::cell::Cell;
    use std::fmt;
    use std::io::{BufRead, BufReader, Read};
    use std::ops::ControlFlow;
    use std::path::Path;
    use std::rc::Rc;

    use serde::de::{
        self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use serde_json::value::RawValue;

    use super::{Item, json_item, open_bytes};
    use crate::{BackfillError, Format};

    /// What a visitor returns to stop reading early (the caller has enough).
    const STOP: &str = "sluice: stop reading";

    /// A reader that counts the line breaks read through it.
    struct Lines<R> {
        inner: R,
        breaks: Rc<Cell<u64>>,
    }

    impl<R: BufRead> Read for Lines<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // serde_json reads a byte at a time: straight from the buffer.
            let available = self.inner.fill_buf()?;
            let n = available.len().min(buf.len());
            buf[..n].copy_from_slice(&available[..n]);
            let more = match n {
                1 => u64::from(available[0] == b'\n'),
                _ => memchr::memchr_iter(b'\n', &available[..n]).count() as u64,
            };
            self.inner.consume(n);
            if more > 0 {
                self.breaks.set(self.breaks.get() + more);
            }
            Ok(n)
        }
    }

    /// Calls `each` with every element of the array at `pointer` (RFC
    /// 6901 tokens, already unescaped), in order.
    struct Elements<'a> {
        pointer: &'a [String],
        each: &'a mut dyn FnMut(Box<RawValue>) -> ControlFlow<()>,
        found: &'a Cell<bool>,
    }

    impl<'de> DeserializeSeed<'de> for Elements<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            if self.pointer.is_empty() {
                self.found.set(true);
                d.deserialize_seq(self)
            } else {
                d.deserialize_any(self)
            }
        }
    }

    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.pointer.is_empty() {
                f.write_str("an array of items")
            } else {
                f.write_str("an object or array holding the items")
            }
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Elements {
                pointer,
                each,
                found,
            } = self;
            let Some((first, rest)) = pointer.split_first() else {
                while let Some(raw) = seq.next_element::<Box<RawValue>>()? {
                    if each(raw).is_break() {
                        return Err(de::Error::custom(STOP));
                    }
                }
                return Ok(());
            };
            // A token of an array is an index.
            let wanted = first.parse::<usize>().ok();
            let mut i = 0usize;
            loop {
                if Some(i) == wanted {
                    let inner = Elements {
                        pointer: rest,
                        each: &mut *each,
                        found,
                    };
                    if seq.next_element_seed(inner)?.is_none() {
                        return Ok(());
                    }
                } else if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(());
                }
                i += 1;
            }
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Elements {
                pointer,
                each,
                found,
            } = self;
            let Some((first, rest)) = pointer.split_first() else {
                return Err(de::Error::invalid_type(
                    de::Unexpected::Map,
                    &"an array of items",
                ));
            };
            while let Some(key) = map.next_key::<String>()? {
                if &key == first && !found.get() {
                    map.next_value_seed(Elements {
                        pointer: rest,
                        each: &mut *each,
                        found,
                    })?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    /// The tokens of a JSON pointer (`/a/b~1c` → `a`, `b/c`).
    fn tokens(pointer: &str) -> Vec<String> {
        pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect()
    }

    pub(super) fn read(
        path: &Path,
        pointer: Option<&str>,
        columns: Option<&[String]>,
        as_json: bool,
        each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
    ) -> Result<(), BackfillError> {
        let mut reader = BufReader::new(open_bytes(path)?);
        let failed = |source| BackfillError::Read {
            file: path.to_path_buf(),
            source,
        };
        // A document that is not an array is JSON lines (`.json` files of
        // either kind), unless a pointer says where the array is.
        // Leading white space (and a UTF-8 byte order mark) is skipped, its
        // line breaks counted.
        let mut skipped = 0u64;
        let first = loop {
            let buf = reader.fill_buf().map_err(failed)?;
            if buf.is_empty() {
                return Ok(()); // an empty document has no items
            }
            if skipped == 0 && buf.starts_with(b"\xEF\xBB\xBF") {
                reader.consume(3);
                continue;
            }
            let blank = buf.iter().position(|b| !b.is_ascii_whitespace());
            let n = blank.unwrap_or(buf.len());
            skipped += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
            if let Some(i) = blank {
                let b = buf[i];
                reader.consume(i);
                break b;
            }
            reader.consume(n);
        };
        if first != b'[' && pointer.is_none() {
            drop(reader);
            return super::read_lines(path, Format::Jsonl, columns, as_json, each);
        }
        let tokens = tokens(pointer.unwrap_or(""));
        let breaks = Rc::new(Cell::new(skipped));
        let lines = Lines {
            inner: reader,
            breaks: Rc::clone(&breaks),
        };
        let mut index = 0u64;
        let mut warned = false;
        let mut element = |raw: Box<RawValue>| {
            let line = breaks.get() + 1;
            let text = raw.get();
            let item = if as_json && columns.is_none() {
                Item::Json(text.to_owned())
            } else {
                match serde_json::from_str(text) {
                    Ok(v) => json_item(v, columns, (path, line, text.as_bytes()), &mut warned),
                    Err(e) => {
                        Item::Bad(super::bad_line(path, line, text.as_bytes(), e.to_string()))
                    }
                }
            };
            let flow = each(index, item);
            index += 1;
            flow
        };
        let found = Cell::new(false);
        let mut de = serde_json::Deserializer::from_reader(lines);
        let seed = Elements {
            pointer: &tokens,
            each: &mut element,
            found: &found,
        };
        match seed.deserialize(&mut de).and_then(|()| de.end()) {
            Ok(()) => {}
            Err(e) if e.to_string().starts_with(STOP) => return Ok(()),
            Err(e) => {
                return Err(BackfillError::Json {
                    file: path.to_path_buf(),
                    line: e.line() as u64,
                    message: super::json_error(&e),
                });
            }
        }
        if !found.get() {
            return Err(BackfillError::Json {
                file: path.to_path_buf(),
                line: breaks.get() + 1,
                message: format!(
                    "items_pointer {:?} names nothing in the document",
                    pointer.unwrap_or("")
                ),
            });
        }
        Ok(())
    }
}

/// What is wrong with a line that is not JSON: serde_json's words with
/// the column, without its "line 1" (the line is the file's, named by the
/// caller).
fn json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((what, _)) => format!("{what} at column {}", e.column()),
        None => text,
    }
}

/// Line `line` of `path` as a string, or the failed item it makes.
fn utf8(path: &Path, line: u64, bytes: Vec<u8>) -> Result<String, ItemError> {
    String::from_utf8(bytes)
        .map_err(|e| bad_line(path, line, e.as_bytes(), "not valid UTF-8".into()))
}

/// Reads an Avro object container file (any codec Avro files use here:
/// null, deflate, snappy, zstandard), each record an item: its JSON form
/// (records and maps as objects, unions as their value, enums as their
/// symbol, dates and times as numbers, bytes, fixed and decimals as arrays
/// of byte values). A block that cannot be decoded ends the file with an
/// error naming the record it stopped at; a record with no JSON form (a
/// NaN float) is a failed item.
fn read_avro(
    path: &Path,
    columns: Option<&[String]>,
    as_json: bool,
    each: &mut dyn FnMut(u64, Item) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let reader = apache_avro::Reader::new(BufReader::new(open_bytes(path)?))
        .map_err(|e| avro_error(path, 0, e))?;
    let mut warned_no_column = false;
    for (index, record) in (0u64..).zip(reader) {
        let number = index + 1;
        let record = record.map_err(|e| avro_error(path, number, e))?;
        let item = match Value::try_from(record) {
            Ok(v) if as_json && columns.is_none() => Item::Json(v.to_string()),
            Ok(v) => {
                let raw = v.to_string();
                json_item(
                    v,
                    columns,
                    (path, number, raw.as_bytes()),
                    &mut warned_no_column,
                )
            }
            // Its bytes are no text: the record is named by its number.
            Err(e) => Item::Bad(bad_line(
                path,
                number,
                b"",
                format!("record {number} has no JSON form: {e}"),
            )),
        };
        if each(index, item).is_break() {
            break;
        }
    }
    Ok(())
}

fn avro_error(file: &Path, record: u64, e: apache_avro::Error) -> BackfillError {
    BackfillError::Avro {
        file: file.to_path_buf(),
        record,
        message: e.to_string(),
    }
}

fn bad_line(path: &Path, line: u64, bytes: &[u8], message: String) -> ItemError {
    ItemError {
        file: PathBuf::from(path),
        line,
        message,
        raw: String::from_utf8_lossy(bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;

    use serde_json::Value;

    use super::{Item, open_quote_at_end, read_file};
    use crate::{BackfillError, Format};

    /// The line of each bad record of `text` read as CSV.
    fn bad_lines(text: &str) -> Vec<u64> {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, text).unwrap();
        let mut lines = Vec::new();
        read_file(&path, &Format::Csv.into(), &mut |_, item| {
            if let Item::Bad(e) = item {
                lines.push(e.line);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
        lines
    }

    /// The items of `bytes` written to `dir/name` and read as `format`, as
    /// JSON; an unreadable one as `{"bad": LINE}`.
    fn items_of(
        dir: &tempfile::TempDir,
        name: &str,
        bytes: Vec<u8>,
        format: Format,
    ) -> Result<Vec<Value>, BackfillError> {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let mut out = Vec::new();
        read_file(&path, &format.into(), &mut |_, item| {
            out.push(match item {
                Item::Value(v) => v,
                Item::Json(t) => serde_json::from_str(&t).unwrap(),
                Item::Bad(e) => serde_json::json!({"bad": e.line}),
            });
            ControlFlow::Continue(())
        })
        .map(|()| out)
    }

    /// An Avro container file of `records` (JSON values of `schema`),
    /// written by the Avro library with `codec`.
    fn avro_file(schema: &str, records: &[Value], codec: apache_avro::Codec) -> Vec<u8> {
        let schema = apache_avro::Schema::parse_str(schema).unwrap();
        let mut w = apache_avro::Writer::with_codec(&schema, Vec::new(), codec).unwrap();
        for r in records {
            let value = apache_avro::types::Value::try_from(r.clone())
                .unwrap()
                .resolve(&schema)
                .unwrap();
            w.append_value(value).unwrap();
        }
        w.into_inner().unwrap()
    }

    const ORDERS: &str = r#"{"type": "record", "name": "Order", "fields": [
        {"name": "id", "type": "long"},
        {"name": "customer", "type": "string"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "note", "type": ["null", "string"], "default": null},
        {"name": "amount", "type": "double"}]}"#;

    #[test]
    fn avro_records_are_items_in_every_codec_and_columns_choose_fields() {
        let dir = tempfile::TempDir::new().unwrap();
        let orders: Vec<Value> = (1..=3)
            .map(|i| {
                serde_json::json!({"id": i, "customer": format!("c{i}"), "tags": ["a", "b"],
                    "note": if i == 2 { Value::Null } else { Value::from("fast") }, "amount": i as f64 * 1.5})
            })
            .collect();
        for codec in [
            apache_avro::Codec::Null,
            apache_avro::Codec::Deflate(Default::default()),
            apache_avro::Codec::Snappy,
            apache_avro::Codec::Zstandard(Default::default()),
        ] {
            let bytes = avro_file(ORDERS, &orders, codec);
            assert_eq!(
                items_of(&dir, "orders.avro", bytes, Format::Avro).unwrap(),
                orders,
                "{codec:?}"
            );
        }
        let path = dir.path().join("orders.avro");
        std::fs::write(&path, avro_file(ORDERS, &orders, apache_avro::Codec::Null)).unwrap();
        // `columns` chooses fields; the file's fields are known for
        // `order_key` and dependency checks.
        let input = crate::Input {
            columns: Some(vec!["id".into(), "amount".into()]),
            ..crate::Input::from(Format::Avro)
        };
        let mut chosen = Vec::new();
        super::read_file_json(&path, &input, &mut |_, item| {
            let Item::Value(v) = item else {
                panic!("a value")
            };
            chosen.push(v);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(chosen[1], serde_json::json!({"id": 2, "amount": 3.0}));
        assert_eq!(
            super::field_names(&path, &Format::Avro.into()).unwrap(),
            Some(
                ["id", "customer", "tags", "note", "amount"]
                    .map(String::from)
                    .to_vec()
            )
        );
    }

    #[test]
    fn a_broken_avro_file_is_an_error_naming_the_file_and_record() {
        let dir = tempfile::TempDir::new().unwrap();
        let e = items_of(&dir, "x.avro", b"not avro at all".to_vec(), Format::Avro).unwrap_err();
        assert!(matches!(&e, BackfillError::Avro { record: 0, .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with(&format!("{}: Avro: ", dir.path().join("x.avro").display())),
            "{e}"
        );
        // A file cut inside its data block: the records before the cut
        // cannot be told from the rest, so the file fails at the block.
        let orders: Vec<Value> = (1..=50)
            .map(|i| serde_json::json!({"id": i, "customer": "c", "tags": [], "note": null, "amount": 1.0}))
            .collect();
        let whole = avro_file(ORDERS, &orders, apache_avro::Codec::Null);
        let cut = whole[..whole.len() - 40].to_vec();
        let e = items_of(&dir, "cut.avro", cut, Format::Avro).unwrap_err();
        assert!(
            matches!(&e, BackfillError::Avro { record, .. } if *record >= 1),
            "{e}"
        );
    }

    #[test]
    fn an_avro_record_without_a_json_form_is_a_failed_item() {
        let dir = tempfile::TempDir::new().unwrap();
        let schema =
            r#"{"type": "record", "name": "M", "fields": [{"name": "x", "type": "double"}]}"#;
        let schema_ = apache_avro::Schema::parse_str(schema).unwrap();
        let mut w = apache_avro::Writer::new(&schema_, Vec::new()).unwrap();
        for x in [1.0, f64::NAN, 2.0] {
            let mut r = apache_avro::types::Record::new(&schema_).unwrap();
            r.put("x", x);
            w.append_value(r).unwrap();
        }
        let bytes = w.into_inner().unwrap();
        assert_eq!(
            items_of(&dir, "m.avro", bytes, Format::Avro).unwrap(),
            [
                serde_json::json!({"x": 1.0}),
                serde_json::json!({"bad": 2}),
                serde_json::json!({"x": 2.0})
            ]
        );
    }

    /// A UTF-8 byte order mark before the first line is not data: JSON
    /// lines and text read as if it were not there (the csv crate skips it
    /// too, so a CSV header's first column keeps its name).
    #[test]
    fn a_byte_order_mark_is_skipped() {
        let dir = tempfile::TempDir::new().unwrap();
        let read = |name: &str, text: &[u8], format: Format| {
            items_of(&dir, name, text.to_vec(), format).unwrap()
        };
        let bom = b"\xEF\xBB\xBF";
        assert_eq!(
            read(
                "a.jsonl",
                &[bom, &b"{\"id\":1}\n{\"id\":2}\n"[..]].concat(),
                Format::Jsonl
            ),
            [serde_json::json!({"id": 1}), serde_json::json!({"id": 2})]
        );
        assert_eq!(
            read("a.txt", &[bom, &b"one\n"[..]].concat(), Format::Text),
            [serde_json::json!("one")]
        );
        assert_eq!(
            read("a.csv", &[bom, &b"id,x\n1,2\n"[..]].concat(), Format::Csv),
            [serde_json::json!({"id": "1", "x": "2"})]
        );
    }

    /// Files of lines compressed with gzip (one member or several, as
    /// `cat a.gz b.gz` makes) or zstd read as their plain text would; a
    /// corrupt one fails naming the file.
    #[test]
    fn compressed_files_of_lines_are_read_as_they_are_named() {
        use std::io::Write;
        let dir = tempfile::TempDir::new().unwrap();
        let gzip = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let items =
            |name: &str, bytes: Vec<u8>, format: Format| items_of(&dir, name, bytes, format);
        let lines = "{\"n\":1}\n{\"n\":2}\n";
        let want = [serde_json::json!({"n": 1}), serde_json::json!({"n": 2})];
        assert_eq!(
            items("a.jsonl.gz", gzip(lines), Format::Jsonl).unwrap(),
            want
        );
        let two = [gzip("{\"n\":1}\n"), gzip("{\"n\":2}\n")].concat();
        assert_eq!(items("b.jsonl.gz", two, Format::Jsonl).unwrap(), want);
        let zst = zstd::encode_all(lines.as_bytes(), 3).unwrap();
        assert_eq!(items("c.jsonl.zst", zst, Format::Jsonl).unwrap(), want);
        // CSV, with a quote never closed: the stream is read again to
        // find the record (no seeking in a compressed file).
        assert_eq!(
            items("d.csv.gz", gzip("a,b\n1,2\n3,\"x\n"), Format::Csv).unwrap(),
            [
                serde_json::json!({"a": "1", "b": "2"}),
                serde_json::json!({"bad": 3})
            ]
        );
        let mut corrupt = gzip(lines);
        corrupt.truncate(corrupt.len() / 2);
        let e = items("e.jsonl.gz", corrupt, Format::Jsonl).unwrap_err();
        assert!(e.to_string().contains("e.jsonl.gz"), "{e}");
    }

    /// A column name twice in a CSV header would lose one value per row:
    /// refused, unless `columns` leaves that name out.
    #[test]
    fn a_csv_header_with_a_name_twice_is_refused_unless_left_out() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("dup.csv");
        std::fs::write(&path, "id,name,id\n1,a,2\n").unwrap();
        let read = |columns: Option<Vec<String>>| {
            let mut input: crate::Input = Format::Csv.into();
            input.columns = columns;
            let mut n = 0;
            read_file(&path, &input, &mut |_, _| {
                n += 1;
                ControlFlow::Continue(())
            })
            .map(|()| n)
        };
        let e = read(None).unwrap_err().to_string();
        assert!(
            e.contains("dup.csv:1:") && e.contains("names column \"id\" twice (fields 1 and 3)"),
            "{e}"
        );
        assert_eq!(read(Some(vec!["name".into()])).unwrap(), 1);
    }

    #[test]
    fn csv_errors_give_the_line_the_record_starts_on() {
        // LF, CRLF, blank lines, a quoted field over two lines, no final
        // line break: each bad record ("3" or "4") named by its own line.
        assert_eq!(bad_lines("a,b\n1,2\n3\n4\n"), [3, 4]);
        assert_eq!(bad_lines("a,b\r\n1,2\r\n3\r\n4\r\n"), [3, 4]);
        assert_eq!(bad_lines("a,b\n\n1,2\n\n\n3\n"), [6]);
        assert_eq!(bad_lines("a,b\r\n\r\n3\r\n\r\n4"), [3, 5]);
        assert_eq!(bad_lines("a,b\n1,\"x\ny\"\n3\n"), [4]);
        assert_eq!(bad_lines("a,b\r\n1,\"x\r\ny\",z\r\n4\r\n"), [2, 4]);
        // Unclosed quotes, with and without a final line break.
        assert_eq!(bad_lines("a,b\r\n1,2\r\n3,\"x\r\n4,5\r\n"), [3]);
        assert_eq!(bad_lines("a,b\n1,2\n\n3,\"x"), [4]);
    }

    /// `csv_headers`: a file without a header line; its first line is the
    /// first item, a short record names its own line, `columns` keeps only
    /// given names, and the file's fields are what the names say.
    #[test]
    fn csv_without_a_header_line_takes_the_given_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lineitem.tbl");
        std::fs::write(&path, "1|17|2.5\n2|36\n3|8|0.5\n").unwrap();
        let mut input: crate::Input = Format::Csv.into();
        input.csv_delimiter = b'|';
        input.csv_headers = Some(vec!["id".into(), "qty".into(), "price".into()]);
        let mut got = Vec::new();
        let mut read_all = |input: &crate::Input| {
            got.clear();
            read_file(&path, input, &mut |i, item| {
                got.push(match item {
                    Item::Value(v) => serde_json::json!([i, v]),
                    Item::Bad(e) => serde_json::json!([i, {"bad": e.line, "why": e.message}]),
                    Item::Json(t) => serde_json::json!([i, t]),
                });
                ControlFlow::Continue(())
            })
            .unwrap();
            got.clone()
        };
        assert_eq!(
            read_all(&input),
            [
                serde_json::json!([0, {"id": "1", "qty": "17", "price": "2.5"}]),
                serde_json::json!([1, {"bad": 2, "why": "2 fields where the csv_headers has 3"}]),
                serde_json::json!([2, {"id": "3", "qty": "8", "price": "0.5"}]),
            ]
        );
        input.columns = Some(vec!["price".into()]);
        assert_eq!(
            read_all(&input)[2],
            serde_json::json!([2, {"price": "0.5"}])
        );
        assert_eq!(
            crate::read::field_names(&path, &input).unwrap(),
            Some(vec!["id".into(), "qty".into(), "price".into()])
        );
        input.columns = Some(vec!["amount".into()]);
        let e = read_file(&path, &input, &mut |_, _| ControlFlow::Continue(())).unwrap_err();
        assert!(e.to_string().contains("amount"), "{e}");
    }

    #[test]
    fn a_file_ending_inside_a_quoted_field_is_found() {
        let at = |t: &str| open_quote_at_end(t.as_bytes(), b',');
        assert_eq!(at("1,\"open\n2,3\n"), Some(2));
        assert_eq!(at("1,\"closed\"\n"), None);
        assert_eq!(at("1,\"two\nlines\"\n"), None);
        // `""` inside a quoted field is a quote, not its end.
        assert_eq!(at("1,\"a \"\" b\n"), Some(2));
        assert_eq!(at("1,\"a \"\" b\""), None);
        // A quote that does not start a field is a plain character.
        assert_eq!(at("1,5\"3\n"), None);
        // The field's own start counts, after a delimiter or a line.
        assert_eq!(at("x\n\"y"), Some(2));
        assert_eq!(open_quote_at_end(b"1;\"a;b", b';'), Some(2));
        assert_eq!(at(""), None);
    }
}

/// `format = "json"`: arrays of items, at the top or at a JSON pointer,
/// streamed; other documents as JSON lines.
#[cfg(test)]
mod json_doc_tests {
    use std::ops::ControlFlow;

    use serde_json::{Value, json};

    use super::{Item, read_file, read_file_json};
    use crate::{BackfillError, Format, Input};

    /// The items of `text` read as a JSON document (with `pointer` and
    /// `columns`), as JSON, an unreadable one as `{"bad": LINE}`; read as
    /// `read_file_json` reads them when `as_json`.
    fn items(
        text: &str,
        pointer: Option<&str>,
        columns: Option<&[&str]>,
        as_json: bool,
    ) -> Result<Vec<Value>, BackfillError> {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("doc.json");
        std::fs::write(&path, text).unwrap();
        let input = Input {
            items_pointer: pointer.map(str::to_owned),
            columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
            ..Input::from(Format::Json)
        };
        let mut out = Vec::new();
        let mut each = |i: u64, item| {
            assert_eq!(i, out.len() as u64);
            out.push(match item {
                Item::Value(v) => v,
                Item::Json(t) => serde_json::from_str(&t).unwrap(),
                Item::Bad(e) => json!({"bad": e.line, "message": e.message}),
            });
            ControlFlow::Continue(())
        };
        let read = if as_json { read_file_json } else { read_file };
        read(&path, &input, &mut each).map(|()| out)
    }

    #[test]
    fn elements_of_the_top_level_array_are_items() {
        let text =
            "\n\n[\n  {\"id\": 1, \"tags\": [\"a\"]},\n  {\"id\": 2},\n  3,\n  \"four\"\n]\n";
        let want = [
            json!({"id": 1, "tags": ["a"]}),
            json!({"id": 2}),
            json!(3),
            json!("four"),
        ];
        for as_json in [false, true] {
            assert_eq!(
                items(text, None, None, as_json).unwrap(),
                want,
                "as_json {as_json}"
            );
        }
        // With columns, objects keep those fields; a scalar fails, named by
        // the line it ends on (blank lines before the array counted).
        assert_eq!(
            items(text, None, Some(&["id"]), false).unwrap(),
            [
                json!({"id": 1}),
                json!({"id": 2}),
                json!({"bad": 6, "message": "a number is not a JSON object, so `columns` cannot choose fields from it"}),
                json!({"bad": 7, "message": "a string is not a JSON object, so `columns` cannot choose fields from it"}),
            ]
        );
        assert_eq!(
            items("  [ ]  ", None, None, false).unwrap(),
            Vec::<Value>::new()
        );
        assert_eq!(items("", None, None, false).unwrap(), Vec::<Value>::new());
    }

    #[test]
    fn items_pointer_finds_the_array_and_skips_the_rest() {
        let text = r#"{"meta": {"items": [0]}, "data": {"orders": [{"n": 1}, {"n": 2}], "x/y": [[9], [7, 8]]}, "tail": [1, 2]}"#;
        assert_eq!(
            items(text, Some("/data/orders"), None, true).unwrap(),
            [json!({"n": 1}), json!({"n": 2})]
        );
        // `~1` is a `/` in a key; a number indexes an array.
        assert_eq!(
            items(text, Some("/data/x~1y/1"), None, false).unwrap(),
            [json!(7), json!(8)]
        );
        let err = items(text, Some("/data/missing"), None, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("items_pointer \"/data/missing\" names nothing"),
            "{err}"
        );
        let err = items(text, Some("/data"), None, false).unwrap_err();
        assert!(
            err.to_string().contains("expected an array of items"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_document_is_an_error_naming_file_and_line() {
        let err = items(
            "[\n{\"a\": 1},\n{\"a\": },\n{\"a\": 3}\n]",
            None,
            None,
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("doc.json:3: JSON: "), "{text}");
        assert!(
            matches!(err, BackfillError::Json { line: 3, .. }),
            "{err:?}"
        );
        // Trailing data after the array.
        let err = items("[1]\n[2]", None, None, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("doc.json:2: JSON: trailing characters"),
            "{err}"
        );
    }

    #[test]
    fn a_document_that_is_not_an_array_is_read_as_json_lines() {
        assert_eq!(
            items("{\"a\": 1}\n{\"a\": 2}\n", None, None, false).unwrap(),
            [json!({"a": 1}), json!({"a": 2})]
        );
    }

    #[test]
    fn reading_stops_when_asked() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("doc.json");
        // Nothing after the second element is read: the rest is not JSON.
        std::fs::write(&path, "[1, 2, 3, not json at all").unwrap();
        let mut seen = Vec::new();
        read_file(&path, &Format::Json.into(), &mut |i, _| {
            seen.push(i);
            if i == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(seen, [0, 1]);
    }
}
