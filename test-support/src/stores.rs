//! Real object stores for the object-store tests: an S3, Azure Blob or
//! Google Cloud Storage bucket named by an environment variable, reached the
//! way sluice users reach it (credentials and endpoints in the usual
//! variables). `scripts/test-object-stores.sh` starts local S3 and Azure
//! servers (moto, and Azurite, Microsoft's emulator) and sets their
//! variables; no GCS server that speaks the XML API `object_store` uses can
//! be installed from the package registries, so `SLUICE_TEST_GS` is for a
//! real bucket (or a fake-gcs-server the user runs).

use std::sync::Arc;

use object_store::ObjectStore;

/// One kind of remote store a test can run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// `SLUICE_TEST_S3=s3://BUCKET`, with the `AWS_*` variables.
    S3,
    /// `SLUICE_TEST_AZ=az://CONTAINER`, with the `AZURE_STORAGE_*`
    /// variables (`AZURE_STORAGE_USE_EMULATOR` and
    /// `AZURITE_BLOB_STORAGE_URL` for Azurite).
    Azure,
    /// `SLUICE_TEST_GS=gs://BUCKET`, with the `GOOGLE_*` variables (for an
    /// emulator, `GOOGLE_SERVICE_ACCOUNT_KEY` with `gcs_base_url` and
    /// `disable_oauth`).
    Gcs,
}

impl Remote {
    /// The variable naming the bucket.
    pub fn variable(self) -> &'static str {
        match self {
            Remote::S3 => "SLUICE_TEST_S3",
            Remote::Azure => "SLUICE_TEST_AZ",
            Remote::Gcs => "SLUICE_TEST_GS",
        }
    }

    /// The bucket URL (`s3://BUCKET`, no trailing slash) and a store of
    /// it, or `None` (with a note on stderr) when the variable is unset.
    pub fn bucket(self) -> Option<(String, Arc<dyn ObjectStore>)> {
        let Ok(url) = std::env::var(self.variable()) else {
            eprintln!(
                "skipped: {} is not set (scripts/test-object-stores.sh sets it)",
                self.variable()
            );
            return None;
        };
        let url = url.trim_end_matches('/').to_owned();
        let store: Arc<dyn ObjectStore> = match self {
            Remote::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(&url)
                    .build()
                    .expect("an S3 store from the environment"),
            ),
            Remote::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(&url)
                    .build()
                    .expect("an Azure store from the environment"),
            ),
            Remote::Gcs => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(&url)
                    .build()
                    .expect("a GCS store from the environment"),
            ),
        };
        Some((url, store))
    }
}

/// A prefix no other test run uses: `NAME-PID-NANOS`.
pub fn fresh_prefix(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The bytes of the object at `key` in `store`, from code that is not
/// async (a CLI test); panics, naming the key, when it cannot be read.
pub fn read_object(store: &dyn ObjectStore, key: &str) -> Vec<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(async {
            store
                .get(&object_store::path::Path::from(key))
                .await?
                .bytes()
                .await
        })
        .unwrap_or_else(|e| panic!("reading {key}: {e}"))
        .to_vec()
}
