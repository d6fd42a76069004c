//! A job's output in an object store (`output = "s3://BUCKET/PREFIX/"`):
//! the reducers write their part files to a local staging folder as
//! always, and once every reducer is done they are uploaded, then
//! `_SUCCESS`, as Hadoop and Spark leave it: a reader that waits for the
//! marker never reads a half-written output.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::PutPayload;
use object_store::path::Path as ObjectPath;
use sluice_ingest::objects::{split, store_for, upload_file, with_credentials_hint};

use crate::{MapReduceError, SUCCESS_FILE};

/// Uploads `files` (the part files, by name) under the prefix `url`, then
/// an empty `_SUCCESS`; returns the part files' URLs. An earlier run's
/// `_SUCCESS` is deleted first and its part files this run did not write
/// (it had more reducers) after, so the prefix ends with this output alone.
/// Uploading again replaces the same objects: a failed upload is simply
/// run again.
///
/// # Errors
/// [`MapReduceError::Upload`], naming the URL.
pub(crate) async fn upload(files: &[PathBuf], url: &str) -> Result<Vec<String>, MapReduceError> {
    let failed = |message: String| MapReduceError::Upload {
        url: url.to_owned(),
        message: with_credentials_hint(url, message),
    };
    let parsed = split(url).ok_or_else(|| failed("not a URL".into()))?;
    let store = store_for(&parsed).map_err(failed)?;
    let key = parsed.key.trim_matches('/');
    let prefix = ObjectPath::parse(key).unwrap_or_else(|_| ObjectPath::from(key));
    let base = url.trim_end_matches('/');

    match store.delete(&prefix.child(SUCCESS_FILE)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(failed(format!("deleting the earlier {SUCCESS_FILE}: {e}"))),
    }
    let mut names = HashSet::new();
    let mut urls = Vec::with_capacity(files.len());
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        upload_file(Arc::clone(&store), file, prefix.child(name.as_str()))
            .await
            .map_err(|e| failed(format!("{name}: {e}")))?;
        urls.push(format!("{base}/{name}"));
        names.insert(name);
    }
    let listed = store
        .list_with_delimiter(Some(&prefix))
        .await
        .map_err(|e| failed(format!("listing: {e}")))?;
    for object in listed.objects {
        let name = object.location.filename().unwrap_or_default();
        if name.starts_with("part-") && !names.contains(name) {
            store
                .delete(&object.location)
                .await
                .map_err(|e| failed(format!("deleting the earlier {name}: {e}")))?;
        }
    }
    store
        .put(&prefix.child(SUCCESS_FILE), PutPayload::new())
        .await
        .map_err(|e| failed(format!("{SUCCESS_FILE}: {e}")))?;
    Ok(urls)
}
