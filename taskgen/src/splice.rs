//! Parquet pass-through (`payload = "parquet"`): a call's rows travel as a
//! small Parquet file holding whole row groups of the source, only the
//! chosen columns, their column chunks copied byte for byte. Nothing is
//! decoded, re-encoded or recompressed on the host: the function decodes
//! what it needs (with the same Parquet reader it would use on the file).
//!
//! A row group is never cut, so calls are row-group aligned: a call takes
//! whole row groups while it stays within `max_items_per_call` rows and
//! `max_bytes_per_call` bytes (base64), and always at least one.

use std::fs::File;
use std::ops::{ControlFlow, Range};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use parquet::arrow::{add_encoded_arrow_schema_to_metadata, parquet_to_arrow_schema};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use crate::read::parquet_error;
use crate::{BackfillError, Limits};

/// One call's rows: a Parquet file of whole row groups.
#[derive(Debug)]
pub(crate) struct Spliced {
    /// Index (in the source file) of the first row.
    pub first: u64,
    /// Rows in the file.
    pub rows: usize,
    /// The Parquet file.
    pub bytes: Bytes,
}

/// Where the column chunks are read from.
enum Origin {
    Local(File),
    Remote {
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
    },
}

/// A source file's metadata, and what of it a call carries.
struct Source {
    origin: Origin,
    metadata: Arc<ParquetMetaData>,
    /// The projected schema: the chosen top-level fields, in file order.
    root: Arc<Type>,
    /// Leaf columns (indices in the file) of the chosen fields, in order.
    leaves: Vec<usize>,
    props: Arc<WriterProperties>,
}

impl Source {
    fn open(path: &Path, columns: Option<&[String]>) -> Result<Source, BackfillError> {
        let (origin, metadata) = if crate::source::is_remote(path) {
            let (store, object, meta) = crate::source::parquet_remote::metadata(path)
                .map_err(|e| parquet_error(path, e))?;
            (
                Origin::Remote {
                    store,
                    path: object,
                },
                meta,
            )
        } else {
            let file = File::open(path).map_err(|source| BackfillError::Read {
                file: path.to_path_buf(),
                source,
            })?;
            let meta = ParquetMetaDataReader::new()
                .parse_and_finish(&file)
                .map_err(|e| parquet_error(path, e))?;
            (Origin::Local(file), Arc::new(meta))
        };
        let descr = metadata.file_metadata().schema_descr();
        let arrow = parquet_to_arrow_schema(descr, metadata.file_metadata().key_value_metadata())
            .map_err(|e| parquet_error(path, e))?;
        // Top-level fields of the Arrow schema are the Parquet root's fields.
        let mut chosen: Vec<usize> = match columns {
            None => (0..arrow.fields().len()).collect(),
            Some(cols) => crate::read::field_indices(path, &arrow, cols)?,
        };
        chosen.sort_unstable();
        chosen.dedup();
        let fields = descr.root_schema().get_fields();
        let root = Type::group_type_builder(descr.root_schema().name())
            .with_fields(chosen.iter().map(|&i| Arc::clone(&fields[i])).collect())
            .build()
            .map_err(|e| parquet_error(path, e))?;
        let leaves = (0..descr.num_columns())
            .filter(|&leaf| chosen.contains(&descr.get_column_root_idx(leaf)))
            .collect();
        let projected = arrow.project(&chosen).map_err(|e| parquet_error(path, e))?;
        let mut props = WriterProperties::builder()
            .set_created_by(format!("sluice {}", env!("CARGO_PKG_VERSION")))
            .build();
        add_encoded_arrow_schema_to_metadata(&projected, &mut props);
        Ok(Source {
            origin,
            metadata,
            root: Arc::new(root),
            leaves,
            props: Arc::new(props),
        })
    }

    /// Rows and base64 bytes of the chosen columns, per row group.
    fn sizes(&self) -> Vec<(u64, u64)> {
        self.metadata
            .row_groups()
            .iter()
            .map(|rg| {
                let bytes: i64 = self
                    .leaves
                    .iter()
                    .map(|&l| rg.column(l).compressed_size())
                    .sum();
                (
                    u64::try_from(rg.num_rows()).unwrap_or(0),
                    u64::try_from(bytes).unwrap_or(0).div_ceil(3) * 4,
                )
            })
            .collect()
    }

    /// A Parquet file of row groups `groups`, the chosen column chunks
    /// copied as they are.
    fn splice(&self, path: &Path, groups: Range<usize>) -> Result<Vec<u8>, BackfillError> {
        let err = |e: parquet::errors::ParquetError| parquet_error(path, e);
        let size: i64 = groups
            .clone()
            .flat_map(|g| {
                let rg = self.metadata.row_group(g);
                self.leaves
                    .iter()
                    .map(move |&l| rg.column(l).compressed_size())
            })
            .sum();
        let buffer = Vec::with_capacity(usize::try_from(size).unwrap_or(0) + 4096);
        let mut writer =
            SerializedFileWriter::new(buffer, Arc::clone(&self.root), Arc::clone(&self.props))
                .map_err(err)?;
        for g in groups {
            let rg = self.metadata.row_group(g);
            let fetched = match &self.origin {
                Origin::Local(_) => Vec::new(),
                Origin::Remote {
                    store,
                    path: object,
                } => {
                    let ranges = self
                        .leaves
                        .iter()
                        .map(|&l| {
                            let (start, len) = rg.column(l).byte_range();
                            start..start + len
                        })
                        .collect::<Vec<_>>();
                    crate::source::parquet_remote::ranges(store, object, ranges.clone())
                        .map_err(|e| parquet_error(path, e))?
                        .into_iter()
                        .zip(ranges)
                        .map(|(data, r)| Fetched { at: r.start, data })
                        .collect()
                }
            };
            let mut out = writer.next_row_group().map_err(err)?;
            for (i, &leaf) in self.leaves.iter().enumerate() {
                let column = rg.column(leaf);
                let close = ColumnCloseResult {
                    bytes_written: u64::try_from(column.compressed_size()).unwrap_or(0),
                    rows_written: u64::try_from(rg.num_rows()).unwrap_or(0),
                    metadata: column.clone(),
                    bloom_filter: None,
                    column_index: None,
                    offset_index: None,
                };
                match &self.origin {
                    Origin::Local(file) => out.append_column(file, close),
                    Origin::Remote { .. } => out.append_column(&fetched[i], close),
                }
                .map_err(err)?;
            }
            out.close().map_err(err)?;
        }
        writer.into_inner().map_err(err)
    }
}

/// Row groups taken together into calls: whole groups while a call stays
/// within `limits` (rows, base64 bytes), and at least one per call.
pub(crate) fn group(sizes: &[(u64, u64)], limits: Limits) -> Vec<Range<usize>> {
    let mut calls = Vec::new();
    let (mut start, mut rows, mut bytes) = (0, 0u64, 0u64);
    for (i, &(r, b)) in sizes.iter().enumerate() {
        if i > start && (rows + r > limits.items as u64 || bytes + b > limits.bytes as u64) {
            calls.push(start..i);
            (start, rows, bytes) = (i, 0, 0);
        }
        rows += r;
        bytes += b;
    }
    if start < sizes.len() {
        calls.push(start..sizes.len());
    }
    calls
}

/// The calls of a file: its row groups grouped by [`group`] (calls of no
/// rows left out), each with its rows; or an error for the first row group
/// over `limits.bytes` on its own.
fn calls(
    path: &Path,
    sizes: &[(u64, u64)],
    limits: Limits,
) -> Result<Vec<(Range<usize>, u64)>, BackfillError> {
    if let Some(g) = sizes
        .iter()
        .position(|&(_, bytes)| bytes > limits.bytes as u64)
    {
        return Err(BackfillError::RowGroupTooLarge {
            file: path.to_path_buf(),
            row_group: g,
            rows: sizes[g].0,
            bytes: sizes[g].1,
            limit: limits.bytes,
        });
    }
    Ok(group(sizes, limits)
        .into_iter()
        .map(|r| {
            let rows = sizes[r.clone()].iter().map(|s| s.0).sum();
            (r, rows)
        })
        .filter(|&(_, rows)| rows > 0)
        .collect())
}

/// The rows of each row group of `path` and how many calls they make (for
/// `--dry-run`), from the footer alone.
pub(crate) fn plan(
    path: &Path,
    columns: Option<&[String]>,
    limits: Limits,
) -> Result<(Vec<u64>, u64), BackfillError> {
    let sizes = Source::open(path, columns)?.sizes();
    let calls = calls(path, &sizes, limits)?.len() as u64;
    Ok((sizes.into_iter().map(|s| s.0).collect(), calls))
}

/// Cuts `path` into calls and hands each over until `each` breaks.
pub(crate) fn read_spliced(
    path: &Path,
    columns: Option<&[String]>,
    limits: Limits,
    each: &mut dyn FnMut(Spliced) -> ControlFlow<()>,
) -> Result<(), BackfillError> {
    let source = Source::open(path, columns)?;
    let mut first = 0u64;
    for (groups, rows) in calls(path, &source.sizes(), limits)? {
        let call = Spliced {
            first,
            rows: usize::try_from(rows).unwrap_or(usize::MAX),
            bytes: Bytes::from(source.splice(path, groups)?),
        };
        first += rows;
        if each(call).is_break() {
            break;
        }
    }
    Ok(())
}

/// A fetched byte range of a remote object, read as the object itself.
struct Fetched {
    at: u64,
    data: Bytes,
}

impl Length for Fetched {
    fn len(&self) -> u64 {
        self.at + self.data.len() as u64
    }
}

impl ChunkReader for Fetched {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.get_bytes(start, self.data.len())?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let from = start
            .checked_sub(self.at)
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| s <= self.data.len())
            .ok_or_else(|| {
                parquet::errors::ParquetError::General(format!(
                    "byte {start} is outside the fetched range at {}",
                    self.at
                ))
            })?;
        Ok(self.data.slice(from..(from + length).min(self.data.len())))
    }
}

/// The rows of a spliced file, decoded (for dead-letter records).
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<arrow_array::RecordBatch>, String> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        Bytes::copy_from_slice(bytes),
    )
    .and_then(|b| b.build())
    .map_err(|e| e.to_string())?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(items: usize, bytes: usize) -> Limits {
        Limits { items, bytes }
    }

    #[test]
    fn row_groups_are_taken_whole_within_both_limits() {
        let sizes = [(700, 100), (700, 100), (100, 20), (2_000, 50), (10, 500)];
        // Rows: 700 | 700 + 100 | 2,000 (alone, over the row limit) | 10.
        assert_eq!(
            group(&sizes, limits(1_000, 10_000)),
            [0..1, 1..3, 3..4, 4..5]
        );
        // Bytes: 100 + 100 + 20 | 50 | 500 (alone).
        assert_eq!(group(&sizes, limits(100_000, 250)), [0..3, 3..4, 4..5]);
        assert_eq!(
            group(&sizes, limits(100_000, 10_000)),
            vec![Range { start: 0, end: 5 }]
        );
        assert!(group(&[], limits(1, 1)).is_empty());
    }
}
