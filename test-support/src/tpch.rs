//! TPC-H `lineitem` as Parquet, generated in the test (`tpchgen`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tpchgen::generators::LineItemGenerator;
use tpchgen_arrow::{LineItemArrow, RecordBatchIterator};

/// Writes `lineitem` at `scale_factor` as `files` Parquet files in `dir`
/// (`lineitem-N.parquet`, one generator part each, row groups of
/// `row_group_rows`), and returns their paths.
///
/// # Panics
/// On a write error.
pub fn write_lineitem(
    dir: &Path,
    scale_factor: f64,
    files: i32,
    row_group_rows: usize,
) -> Vec<PathBuf> {
    (1..=files)
        .map(|part| {
            let path = dir.join(format!("lineitem-{part}.parquet"));
            let batches = LineItemArrow::new(LineItemGenerator::new(scale_factor, part, files))
                .with_batch_size(4_096);
            // Snappy, as `tpchgen-cli parquet` writes it by default.
            let props = WriterProperties::builder()
                .set_max_row_group_size(row_group_rows)
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build();
            let mut writer = ArrowWriter::try_new(
                File::create(&path).expect("creating a lineitem file"),
                Arc::clone(batches.schema()),
                Some(props),
            )
            .expect("a Parquet writer");
            for batch in batches {
                writer.write(&batch).expect("writing lineitem");
            }
            writer.close().expect("closing a lineitem file");
            path
        })
        .collect()
}
