//! Objects as files under one directory: `<root>/<key>`. A write goes to a temporary file
//! beside its target, is synced, then renamed over it, so readers see the old object or the
//! new one, never a part.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{BlobError, BlobKey};

/// Temporary files start so; listing skips them.
pub(super) const TEMP_PREFIX: &str = ".tmp-";

#[derive(Clone)]
pub struct LocalBlobs {
    root: Arc<PathBuf>,
}

impl LocalBlobs {
    /// Objects under `root` (created when first written).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root: Arc::new(root),
        }
    }

    /// Where `key`'s file is.
    pub fn path(&self, key: &BlobKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// Runs file work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        key: &str,
        work: impl FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BlobError> {
        let root = self.root.clone();
        let failed = |source| BlobError::Local {
            op,
            key: key.to_owned(),
            source,
        };
        tokio::task::spawn_blocking(move || work(&root))
            .await
            .map_err(|e| failed(std::io::Error::other(e)))?
            .map_err(failed)
    }

    pub async fn put(&self, key: &BlobKey, bytes: Bytes) -> Result<(), BlobError> {
        let path = self.path(key);
        self.blocking("write", key.as_str(), move |_| {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let temp = dir.join(format!("{TEMP_PREFIX}{}", crate::auth::random_token(9)));
            let written = (|| {
                let mut file = std::fs::File::create(&temp)?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                std::fs::rename(&temp, &path)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            written
        })
        .await
    }

    pub async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, BlobError> {
        let path = self.path(key);
        self.blocking("read", key.as_str(), move |_| match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    pub async fn download(&self, key: &BlobKey) -> Result<Option<super::Download>, BlobError> {
        match tokio::fs::File::open(self.path(key)).await {
            Ok(file) => Ok(Some(super::Download::local(key.clone(), file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(BlobError::Local {
                op: "read",
                key: key.as_str().to_owned(),
                source,
            }),
        }
    }

    pub async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        let path = self.path(key);
        self.blocking("look up", key.as_str(), move |_| {
            match std::fs::metadata(&path) {
                Ok(meta) => Ok(meta.is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    pub async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        let path = self.path(key);
        self.blocking(
            "delete",
            key.as_str(),
            move |_| match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        )
        .await
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let prefix = prefix.to_owned();
        self.blocking("list", &prefix.clone(), move |root| {
            let mut keys = Vec::new();
            let mut dirs = vec![root.to_path_buf()];
            while let Some(dir) = dirs.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                for entry in entries {
                    let entry = entry?;
                    let path = entry.path();
                    if entry.file_type()?.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                        continue;
                    }
                    let Ok(relative) = path.strip_prefix(root) else {
                        continue;
                    };
                    let key = relative
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    if key.starts_with(&prefix) {
                        keys.push(key);
                    }
                }
            }
            Ok(keys)
        })
        .await
    }
}
