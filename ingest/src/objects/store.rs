//! Object stores behind URLs (`s3://`, `gs://`, `az://`, `memory://`),
//! shared by the object-store triggers and by `taskgen`'s sources: one
//! registry, one way to build a store from the environment, one hint when
//! credentials are missing.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use object_store::ObjectStore;
use object_store::memory::InMemory;

/// Stores by `scheme://authority`, registered or built on first use.
static STORES: LazyLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Uses `store` for every URL starting with `base` (`scheme://authority`,
/// e.g. `memory://test` or `s3://bucket`), instead of one built from the
/// environment. Tests use it to inject an
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
pub struct Url<'a> {
    /// `s3`, `gs`, ...
    pub scheme: &'a str,
    /// The bucket or container (empty for `memory:///`).
    pub authority: &'a str,
    /// Everything after `scheme://authority/`, not percent-decoded.
    pub key: &'a str,
}

impl Url<'_> {
    /// `scheme://authority`.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme, self.authority)
    }
}

/// Splits `scheme://authority/key` without percent-decoding (the key may
/// hold glob characters such as `?` and `[`).
pub fn split(s: &str) -> Option<Url<'_>> {
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

/// `message`, plus what to set when it shows that no credentials were
/// found: object_store then asks the cloud's metadata service, and its
/// error names only that service's address.
pub fn with_credentials_hint(url: &str, message: String) -> String {
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

/// The store for `url`'s `scheme://authority`: registered, cached, or built
/// from the environment (`AWS_*`, `GOOGLE_*`, `AZURE_*` variables, as the
/// builders' `from_env` read them). The error is a message for the user.
pub fn store_for(url: &Url<'_>) -> Result<Arc<dyn ObjectStore>, String> {
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
                .map_err(|e| e.to_string())?,
        ),
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(base.as_str())
                .build()
                .map_err(|e| e.to_string())?,
        ),
        "az" | "azure" | "abfs" | "abfss" | "adl" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(base.as_str())
                .build()
                .map_err(|e| with_credentials_hint(&base, e.to_string()))?,
        ),
        other => {
            return Err(format!(
                "unsupported URL scheme {other:?} (known: file, memory, s3, gs, az, azure, abfs, abfss)"
            ));
        }
    };
    stores.insert(base, Arc::clone(&built));
    Ok(built)
}

/// Streams the local `file` to `location` in `store`, in parts for a large
/// one (any size, never whole in memory); an upload that fails is aborted.
/// The error is a message for the user, naming the file when it cannot be
/// read.
pub async fn upload_file(
    store: Arc<dyn ObjectStore>,
    file: &std::path::Path,
    location: object_store::path::Path,
) -> Result<(), String> {
    let mut reader = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let mut writer = object_store::buffered::BufWriter::new(store, location);
    let copied = tokio::io::copy(&mut reader, &mut writer).await;
    let closed = match copied {
        Ok(_) => tokio::io::AsyncWriteExt::shutdown(&mut writer).await,
        Err(e) => {
            let _ = writer.abort().await;
            Err(e)
        }
    };
    closed.map_err(|e| e.to_string())
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
