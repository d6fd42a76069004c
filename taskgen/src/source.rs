//! Sources behind [`object_store`] URLs: `s3://`, `gs://`, `az://`,
//! `memory://` (tests) and `file://` (local files).
//!
//! A remote source travels through the rest of the crate as a `PathBuf`
//! holding its URL (`s3://bucket/dir/a.parquet`), so call ids, dead letters
//! and error messages name it. `file://` URLs become plain local paths and
//! take the local code path unchanged.
//!
//! The object store clients run on one small dedicated Tokio runtime; the
//! synchronous readers wait on it with [`futures::executor::block_on`], which
//! works from any thread (the backfill reader thread, or a caller of
//! [`crate::plan`] that is itself inside a runtime).

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;

use crate::BackfillError;

/// Schemes read through `object_store` (`file` is handled as a local path).
const REMOTE_SCHEMES: &[&str] = sluice_pipeline::OBJECT_URL_SCHEMES;

pub use sluice_ingest::objects::register_object_store;
use sluice_ingest::objects::{Url, split, upload_file, with_credentials_hint};

/// The runtime that drives object store requests.
static IO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-object-store")
        .enable_all()
        .build()
        .expect("cannot start the object store runtime")
});

/// Whether `source` is a URL read through `object_store` (not a local path,
/// not `file://`).
pub fn is_remote(source: &Path) -> bool {
    source
        .to_str()
        .and_then(split)
        .is_some_and(|u| REMOTE_SCHEMES.contains(&u.scheme))
}

/// Runs `future` on the object store runtime and waits for it.
fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = IO.spawn(future);
    match futures::executor::block_on(handle) {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn bad_pattern(pattern: &str, message: impl Into<String>) -> BackfillError {
    BackfillError::BadPattern {
        pattern: pattern.to_owned(),
        message: message.into(),
    }
}

/// An object store error as the `Read` error of `url`.
pub(crate) fn read_error(url: &str, e: object_store::Error) -> BackfillError {
    let kind = match e {
        object_store::Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => std::io::ErrorKind::PermissionDenied,
        _ => std::io::ErrorKind::Other,
    };
    BackfillError::Read {
        file: PathBuf::from(url),
        source: std::io::Error::new(kind, with_credentials_hint(url, e.to_string())),
    }
}

/// The store for `scheme://authority` (see
/// [`sluice_ingest::objects::store_for`]).
fn store(url: &Url<'_>, pattern: &str) -> Result<Arc<dyn ObjectStore>, BackfillError> {
    sluice_ingest::objects::store_for(url).map_err(|e| bad_pattern(pattern, e))
}

/// The store and object path of a remote source.
fn locate(source: &Path) -> Result<(Arc<dyn ObjectStore>, ObjectPath, String), BackfillError> {
    let text = source.to_string_lossy().into_owned();
    let url = split(&text).ok_or_else(|| bad_pattern(&text, "not a URL"))?;
    let store = store(&url, &text)?;
    let path = ObjectPath::parse(url.key).unwrap_or_else(|_| ObjectPath::from(url.key));
    Ok((store, path, text))
}

fn object_url(url: &Url<'_>, path: &ObjectPath) -> PathBuf {
    PathBuf::from(format!("{}://{}/{}", url.scheme, url.authority, path))
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The local path a `file://` URL names (no host, or `localhost`).
fn file_url_path(url: &Url<'_>) -> Result<String, &'static str> {
    if !url.authority.is_empty() && url.authority != "localhost" {
        return Err("file:// URLs must name a local path");
    }
    Ok(format!("/{}", url.key))
}

/// Expands a URL source: `None` for a plain path (the caller globs it);
/// `file://` as the local path or pattern it names; for remote URLs, every
/// object below a prefix (`s3://b/dir/`), the objects of one folder whose
/// names match a glob in the last segment (`s3://b/dir/*.parquet`), or one
/// object. Sorted by path.
pub(crate) fn resolve(pattern: &str) -> Result<Option<Vec<PathBuf>>, BackfillError> {
    let Some(url) = split(pattern) else {
        return Ok(None);
    };
    if url.scheme == "file" {
        let local = file_url_path(&url).map_err(|m| bad_pattern(pattern, m))?;
        return crate::resolve_sources(&[local])
            .map(Some)
            .map_err(|e| match e {
                BackfillError::NoFiles { .. } => BackfillError::NoFiles {
                    pattern: pattern.to_owned(),
                },
                other => other,
            });
    }
    let store = store(&url, pattern)?;
    let (dir, name) = match url.key.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", url.key),
    };
    if has_glob(dir) {
        return Err(bad_pattern(
            pattern,
            "a glob may only appear in the last path segment",
        ));
    }
    let owned = pattern.to_owned();
    let mut found: Vec<ObjectPath> = if has_glob(name) {
        let glob = glob::Pattern::new(name).map_err(|e| bad_pattern(pattern, e.to_string()))?;
        let prefix = (!dir.is_empty()).then(|| ObjectPath::from(dir));
        let listed = block_on(async move { store.list_with_delimiter(prefix.as_ref()).await })
            .map_err(|e| read_error(&owned, e))?;
        listed
            .objects
            .into_iter()
            .map(|m| m.location)
            .filter(|p| p.filename().is_some_and(|n| glob.matches(n)))
            .collect()
    } else {
        let key = url.key.trim_end_matches('/').to_owned();
        let is_prefix = url.key.is_empty() || url.key.ends_with('/');
        block_on(async move {
            let path = ObjectPath::parse(&key).unwrap_or_else(|_| ObjectPath::from(key.as_str()));
            if !is_prefix {
                match store.head(&path).await {
                    Ok(meta) => return Ok(vec![meta.location]),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            let prefix = (!key.is_empty()).then_some(path);
            let mut out = Vec::new();
            let mut objects = store.list(prefix.as_ref());
            while let Some(meta) = objects.next().await {
                out.push(meta?.location);
            }
            Ok(out)
        })
        .map_err(|e| read_error(&owned, e))?
    };
    if found.is_empty() {
        return Err(BackfillError::NoFiles {
            pattern: pattern.to_owned(),
        });
    }
    found.sort();
    found.dedup();
    Ok(Some(found.iter().map(|p| object_url(&url, p)).collect()))
}

/// Chunks of an object in flight between the runtime and a reader.
const STREAM_CHUNKS: usize = 4;

/// A blocking [`Read`] over an object's bytes, fetched by one streaming GET.
pub(crate) struct ObjectRead {
    rx: mpsc::Receiver<object_store::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ObjectRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match futures::executor::block_on(self.rx.recv()) {
                None => return Ok(0),
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Opens a remote object for streaming; fails at once if it cannot be read.
pub(crate) fn open(source: &Path) -> Result<ObjectRead, BackfillError> {
    let (store, path, url) = locate(source)?;
    let result =
        block_on(async move { store.get(&path).await }).map_err(|e| read_error(&url, e))?;
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
    IO.spawn(async move {
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let stop = chunk.is_err();
            if tx.send(chunk).await.is_err() || stop {
                return;
            }
        }
    });
    Ok(ObjectRead {
        rx,
        chunk: Bytes::new(),
    })
}

/// Parquet through `parquet`'s async object store reader.
pub(crate) mod parquet_remote {
    use super::*;
    use arrow_array::RecordBatch;
    use parquet::arrow::ParquetRecordBatchStreamBuilder;
    use parquet::arrow::async_reader::ParquetObjectReader;

    /// Batches decoded ahead of the reader.
    const BATCHES_AHEAD: usize = 2;

    /// A reader of the object that knows its size, so that the footer is
    /// read with a bounded range: without it `parquet` asks for the last
    /// bytes with a suffix range, which Azure Blob Storage refuses ("Azure
    /// does not support suffix range requests").
    async fn reader(
        store: Arc<dyn ObjectStore>,
        path: ObjectPath,
    ) -> Result<ParquetObjectReader, String> {
        let size = store.head(&path).await.map_err(|e| e.to_string())?.size;
        Ok(ParquetObjectReader::new(store, path).with_file_size(size))
    }

    /// Rows of each row group.
    pub(crate) fn row_groups(source: &Path) -> Result<Vec<i64>, String> {
        let (store, path, _) = locate(source).map_err(|e| e.to_string())?;
        block_on(async move {
            let builder = ParquetRecordBatchStreamBuilder::new(reader(store, path).await?)
                .await
                .map_err(|e| e.to_string())?;
            Ok(builder
                .metadata()
                .row_groups()
                .iter()
                .map(|rg| rg.num_rows())
                .collect())
        })
    }

    /// A remote Parquet object: its store, path and metadata.
    pub(crate) type Located = (
        Arc<dyn ObjectStore>,
        ObjectPath,
        Arc<parquet::file::metadata::ParquetMetaData>,
    );

    /// The object's store, path and Parquet metadata.
    pub(crate) fn metadata(source: &Path) -> Result<Located, String> {
        let (store, path, _) = locate(source).map_err(|e| e.to_string())?;
        let (s, p) = (Arc::clone(&store), path.clone());
        let meta = block_on(async move {
            ParquetRecordBatchStreamBuilder::new(reader(s, p).await?)
                .await
                .map(|b| Arc::clone(b.metadata()))
                .map_err(|e| e.to_string())
        })?;
        Ok((store, path, meta))
    }

    /// The bytes of `ranges` of an object.
    pub(crate) fn ranges(
        store: &Arc<dyn ObjectStore>,
        path: &ObjectPath,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> Result<Vec<bytes::Bytes>, String> {
        let (store, path) = (Arc::clone(store), path.clone());
        block_on(async move {
            store
                .get_ranges(&path, &ranges)
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Decodes the object row group by row group, `batch_rows` rows per
    /// batch, calling `each` until it returns false.
    pub(crate) fn batches(
        source: &Path,
        batch_rows: usize,
        columns: Option<&[String]>,
        each: &mut dyn FnMut(RecordBatch) -> Result<bool, String>,
    ) -> Result<(), String> {
        let (store, path, _) = locate(source).map_err(|e| e.to_string())?;
        let (tx, mut rx) = mpsc::channel::<Result<RecordBatch, String>>(BATCHES_AHEAD);
        let columns = columns.map(<[String]>::to_vec);
        let file = source.to_path_buf();
        IO.spawn(async move {
            let stream = async {
                let builder = ParquetRecordBatchStreamBuilder::new(reader(store, path).await?)
                    .await
                    .map_err(|e| e.to_string())?;
                crate::read::project(&file, builder, columns.as_deref())
                    .map_err(|e| e.to_string())?
                    .with_batch_size(batch_rows)
                    .build()
                    .map_err(|e| e.to_string())
            }
            .await;
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| e.to_string());
                let stop = batch.is_err();
                if tx.send(batch).await.is_err() || stop {
                    return;
                }
            }
        });
        while let Some(batch) = futures::executor::block_on(rx.recv()) {
            if !each(batch?)? {
                break;
            }
        }
        Ok(())
    }
}

/// An object of a `format = "objects"` backfill, fetched whole for its call.
pub(crate) struct Fetched {
    pub(crate) bytes: Bytes,
    /// Seconds since the Unix epoch, if the store says.
    pub(crate) last_modified: Option<i64>,
    pub(crate) e_tag: Option<String>,
}

impl Fetched {
    /// Completes an object's item ([`object_item`]) with what the store
    /// says of it: `Size`, `LastModified` (seconds since the epoch) and
    /// `Etag`, as in Step Functions Distributed Map's S3 object listing.
    pub(crate) fn describe(&self, item: &mut serde_json::Value) {
        if let serde_json::Value::Object(item) = item {
            item.insert("Size".into(), self.bytes.len().into());
            item.insert("LastModified".into(), self.last_modified.into());
            item.insert("Etag".into(), self.e_tag.clone().into());
        }
    }
}

/// Why an object was not fetched: its dead-letter error type and message.
pub(crate) struct NotFetched {
    pub(crate) error_type: &'static str,
    pub(crate) message: String,
}

impl NotFetched {
    fn too_large(name: &str, size: u64, limit: u64) -> Self {
        NotFetched {
            error_type: "Sluice.ObjectTooLarge",
            message: format!(
                "{name} is {size} bytes, more than max_object_bytes ({limit}): not fetched"
            ),
        }
    }

    fn unreadable(name: &str, e: impl std::fmt::Display) -> Self {
        NotFetched {
            error_type: "Sluice.ObjectUnreadable",
            message: format!("{name}: {e}"),
        }
    }
}

/// Fetches a local file or a remote object whole, unless it is larger than
/// `limit` bytes (then nothing of it is read).
pub(crate) async fn fetch_object(source: &Path, limit: u64) -> Result<Fetched, NotFetched> {
    let name = source.display().to_string();
    if !is_remote(source) {
        let path = source.to_path_buf();
        let read = tokio::task::spawn_blocking(move || -> Result<Fetched, NotFetched> {
            let n = name.as_str();
            let mut file = std::fs::File::open(&path).map_err(|e| NotFetched::unreadable(n, e))?;
            let meta = file.metadata().map_err(|e| NotFetched::unreadable(n, e))?;
            if meta.len() > limit {
                return Err(NotFetched::too_large(n, meta.len(), limit));
            }
            let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
            // At most one byte past the limit: a file growing meanwhile is
            // still refused rather than read without bound.
            (&mut file)
                .take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| NotFetched::unreadable(n, e))?;
            if bytes.len() as u64 > limit {
                return Err(NotFetched::too_large(n, bytes.len() as u64, limit));
            }
            let last_modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|d| i64::try_from(d.as_secs()).ok());
            Ok(Fetched {
                bytes: Bytes::from(bytes),
                last_modified,
                e_tag: None,
            })
        });
        return read.await.unwrap_or_else(|e| {
            Err(NotFetched::unreadable(
                &source.display().to_string(),
                format!("reader failed: {e}"),
            ))
        });
    }
    let (store, path, url) = locate(source).map_err(|e| NotFetched::unreadable(&name, e))?;
    let fetch = IO.spawn(async move {
        let got = store.get(&path).await.map_err(|e| {
            NotFetched::unreadable(&url, with_credentials_hint(&url, e.to_string()))
        })?;
        let meta = got.meta.clone();
        if meta.size > limit {
            return Err(NotFetched::too_large(&url, meta.size, limit));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(|e| NotFetched::unreadable(&url, e))?;
        Ok(Fetched {
            bytes,
            last_modified: Some(meta.last_modified.timestamp()),
            e_tag: meta.e_tag,
        })
    });
    fetch
        .await
        .unwrap_or_else(|e| Err(NotFetched::unreadable(&name, format!("fetch failed: {e}"))))
}

/// The item of an object before it is fetched: `{"Key", "url"}` (its
/// `Size`, `LastModified` and `Etag` are added when its call fetches it).
/// `Key` is the object's key in its bucket, or a local file's path.
pub(crate) fn object_item(source: &Path) -> serde_json::Value {
    let text = source.to_string_lossy();
    let (key, url) = match split(&text).filter(|_| is_remote(source)) {
        Some(u) => (u.key.to_owned(), text.to_string()),
        None => (text.to_string(), format!("file://{text}")),
    };
    serde_json::json!({ "Key": key, "url": url })
}

/// Uploads the local file `local` whole to the object-store URL `url`
/// (in parts, as it is read: any size).
pub(crate) async fn upload(local: &Path, url: &Path) -> Result<(), BackfillError> {
    let (store, path, text) = locate(url)?;
    let file = local.to_path_buf();
    let upload = IO.spawn(async move { upload_file(store, &file, path).await });
    let failed = |message: String| BackfillError::Results {
        path: PathBuf::from(&text),
        source: std::io::Error::other(with_credentials_hint(&text, message)),
    };
    match upload.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(message)) => Err(failed(message)),
        Err(e) => Err(failed(format!("the upload failed: {e}"))),
    }
}

/// `results` as the run keeps it: a plain path as given, a `file://` URL as
/// the path it names, a remote URL checked before anything runs (it names
/// one object, and a store can be built for it), so that a job does not
/// fail at its end for want of somewhere to put its responses.
///
/// # Errors
/// [`BackfillError::Config`] for a URL that names no object or an unknown
/// scheme; the store's error when one cannot be built for it.
pub fn results_target(results: &Path) -> Result<PathBuf, BackfillError> {
    let text = results.to_string_lossy();
    let Some(url) = split(&text) else {
        return Ok(results.to_path_buf());
    };
    let bad = |message: &str| BackfillError::Config(format!("results {text}: {message}"));
    if url.scheme == "file" {
        return file_url_path(&url).map(PathBuf::from).map_err(bad);
    }
    if !REMOTE_SCHEMES.contains(&url.scheme) {
        return Err(bad(&format!(
            "unknown scheme {:?}: a path, or s3://BUCKET/KEY, gs://, az://",
            url.scheme
        )));
    }
    if url.key.is_empty() || url.key.ends_with('/') {
        return Err(bad(
            "names a bucket or a prefix: give the object the responses go to, \
             e.g. s3://BUCKET/out/results.jsonl",
        ));
    }
    locate(results)?;
    Ok(results.to_path_buf())
}
