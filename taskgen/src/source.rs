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

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;

use crate::BackfillError;

/// Schemes read through `object_store` (`file` is handled as a local path).
const REMOTE_SCHEMES: &[&str] = &[
    "memory", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl",
];

/// Stores by `scheme://authority`, registered or built on first use.
static STORES: LazyLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The runtime that drives object store requests.
static IO: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-object-store")
        .enable_all()
        .build()
        .expect("cannot start the object store runtime")
});

/// Uses `store` for every source URL starting with `base`
/// (`scheme://authority`, e.g. `memory://test` or `s3://bucket`), instead of
/// one built from the environment. Tests use it to inject an
/// [`InMemory`](object_store::memory::InMemory) store; a later registration
/// of the same base replaces the earlier one.
pub fn register_object_store(base: &str, store: Arc<dyn ObjectStore>) {
    let key = base.trim_end_matches('/').to_owned();
    STORES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, store);
}

/// A URL split into its parts; `key` is the raw path after the authority.
#[derive(Debug, Clone)]
struct Url<'a> {
    scheme: &'a str,
    authority: &'a str,
    key: &'a str,
}

impl Url<'_> {
    fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

/// Splits `scheme://authority/key` without percent-decoding (the key may
/// hold glob characters such as `?` and `[`).
fn split(s: &str) -> Option<Url<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    let (authority, key) = rest.split_once('/').unwrap_or((rest, ""));
    Some(Url {
        scheme,
        authority,
        key,
    })
}

/// Whether `source` is a URL read through `object_store` (not a local path,
/// not `file://`).
pub(crate) fn is_remote(source: &Path) -> bool {
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

/// `message`, plus what to set when it shows that no credentials were
/// found: object_store then asks the cloud's metadata service, and its
/// error names only that service's address.
fn with_credentials_hint(url: &str, message: String) -> String {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    let hint = match scheme {
        "s3" | "s3a" if message.contains("169.254.169.254") => {
            "no AWS credentials were found in the environment (AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN), so the \
             EC2 instance metadata service was asked, and it did not answer"
        }
        "gs" if message.contains("169.254.169.254") => {
            "no Google credentials were found in the environment (GOOGLE_APPLICATION_CREDENTIALS \
             or GOOGLE_SERVICE_ACCOUNT, a service-account key file), so the GCE metadata server \
             was asked, and it did not answer"
        }
        "az" | "azure" | "abfs" | "abfss" | "adl"
            if message.contains("Account must be specified") =>
        {
            "set AZURE_STORAGE_ACCOUNT_NAME, and AZURE_STORAGE_ACCOUNT_KEY, a SAS token \
             (AZURE_STORAGE_SAS_KEY) or a service principal (AZURE_CLIENT_ID...)"
        }
        _ => return message,
    };
    format!("{message}; {hint}")
}

/// The store for `scheme://authority`: registered, cached, or built from the
/// environment (`AWS_*`, `GOOGLE_*`, `AZURE_*` variables, as the builders'
/// `from_env` read them).
fn store(url: &Url<'_>, pattern: &str) -> Result<Arc<dyn ObjectStore>, BackfillError> {
    let base = url.base();
    let mut stores = STORES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = stores.get(&base) {
        return Ok(Arc::clone(s));
    }
    let built: Arc<dyn ObjectStore> = match url.scheme {
        "memory" => Arc::new(InMemory::new()),
        "s3" | "s3a" => Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(base.as_str())
                .build()
                .map_err(|e| bad_pattern(pattern, e.to_string()))?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(base.as_str())
                .build()
                .map_err(|e| bad_pattern(pattern, e.to_string()))?,
        ),
        "az" | "azure" | "abfs" | "abfss" | "adl" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(base.as_str())
                .build()
                .map_err(|e| bad_pattern(pattern, with_credentials_hint(pattern, e.to_string())))?,
        ),
        other => {
            return Err(bad_pattern(
                pattern,
                format!(
                    "unsupported URL scheme {other:?} (known: file, memory, s3, gs, az, azure, abfs, abfss)"
                ),
            ));
        }
    };
    stores.insert(base, Arc::clone(&built));
    Ok(built)
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
        if !url.authority.is_empty() && url.authority != "localhost" {
            return Err(bad_pattern(pattern, "file:// URLs must name a local path"));
        }
        let local = format!("/{}", url.key);
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

    /// Rows of each row group.
    pub(crate) fn row_groups(source: &Path) -> Result<Vec<i64>, String> {
        let (store, path, _) = locate(source).map_err(|e| e.to_string())?;
        block_on(async move {
            let builder =
                ParquetRecordBatchStreamBuilder::new(ParquetObjectReader::new(store, path))
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
            ParquetRecordBatchStreamBuilder::new(ParquetObjectReader::new(s, p))
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
                let builder =
                    ParquetRecordBatchStreamBuilder::new(ParquetObjectReader::new(store, path))
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

#[cfg(test)]
mod tests {
    use super::with_credentials_hint;

    #[test]
    fn errors_that_show_missing_credentials_say_what_to_set() {
        let imds = "Error performing PUT http://169.254.169.254/latest/api/token".to_owned();
        let s3 = with_credentials_hint("s3://b/k.parquet", imds.clone());
        assert!(
            s3.starts_with(&imds) && s3.contains("AWS_ACCESS_KEY_ID"),
            "{s3}"
        );
        let gs = with_credentials_hint("gs://b/k.parquet", imds.clone());
        assert!(gs.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{gs}");
        let az = with_credentials_hint("az://c/k", "Account must be specified".into());
        assert!(az.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{az}");
        // Other errors, and other schemes, are left as they are.
        let other = "HTTP error: error sending request".to_owned();
        assert_eq!(with_credentials_hint("s3://b/k", other.clone()), other);
        assert_eq!(with_credentials_hint("memory:///k", imds.clone()), imds);
    }
}
