//! Writer locks: one small object per writer (`_locks/<name>.json`) created with a conditional put
//! (`If-None-Match: *` on S3, no-clobber on disk), so two writers of the same tables never interleave.
//!
//! A second writer fails at once with who holds the lock and since when, instead of waiting: nothing
//! it would have written is lost, and it can simply be re-run. A lock whose process died is taken
//! over after `lake.store.lock_ttl_minutes` (with a conditional update where the store supports it),
//! or removed by hand with `threatlake lake unlock NAME`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::{LakeError, Location};

/// Folder of the lock objects under a root.
pub const LOCKS: &str = "_locks";

/// Every writer lock name, in the order multi-lock commands take them.
pub const ALL: [&str; 6] = ["attack", "otx", "virustotal", "taxii", "intel", "push"];

/// What a lock object says about its holder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    /// Lock name.
    pub name: String,
    /// What the holder is doing.
    pub purpose: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// When it was taken.
    pub since: DateTime<Utc>,
    /// When it counts as abandoned.
    pub expires: DateTime<Utc>,
}

impl Holder {
    /// The holder ran on this host and its process is gone (it crashed or lost its store mid-write
    /// and could not release the lock).
    pub fn is_dead(&self) -> bool {
        cfg!(target_os = "linux")
            && self.host == host()
            && self.pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {} on {}) since {}",
            self.purpose,
            self.pid,
            self.host,
            self.since.format("%Y-%m-%d %H:%M:%SZ")
        )
    }
}

/// A held lock; call [`LakeLock::release`] when done (a lock that is never released expires).
#[derive(Debug)]
pub struct LakeLock {
    location: Location,
    rel: String,
    /// Who holds it (us).
    pub holder: Holder,
}

impl LakeLock {
    /// Remove the lock object.
    pub async fn release(self) -> Result<(), LakeError> {
        self.location.delete(&self.rel).await
    }
}

/// Several locks taken together (all or none).
#[derive(Debug, Default)]
pub struct LockSet(Vec<LakeLock>);

impl LockSet {
    /// Release every lock (all are attempted; the first error is returned).
    pub async fn release(self) -> Result<(), LakeError> {
        let mut first = Ok(());
        for l in self.0 {
            if let Err(e) = l.release().await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// This machine's host name (recorded with locks and job runs).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

impl Location {
    /// Take the writer lock `name` for `purpose`, or fail with [`LakeError::Locked`].
    pub async fn lock(
        &self,
        name: &str,
        purpose: &str,
        ttl: Duration,
    ) -> Result<LakeLock, LakeError> {
        let rel = format!("{LOCKS}/{name}.json");
        let path = self.path(&rel);
        let now = Utc::now();
        let holder = Holder {
            name: name.to_string(),
            purpose: purpose.to_string(),
            host: host(),
            pid: std::process::id(),
            since: now,
            expires: now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(2)),
        };
        let body = PutPayload::from(serde_json::to_vec(&holder).expect("lock holder serialises"));
        let create = PutOptions::from(PutMode::Create);
        match self.store.put_opts(&path, body.clone(), create).await {
            Ok(_) => {
                return Ok(LakeLock {
                    location: self.clone(),
                    rel,
                    holder,
                })
            }
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => {}
            Err(source) => return Err(self.error(&path, source)),
        }
        // Someone holds it. Read who; take it over only when it has expired, and only if nobody else
        // replaced it meanwhile (conditional update on the version we read).
        let current = self.store.get(&path).await;
        let (other, version, seen) = match current {
            Ok(r) => {
                let version = UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r.bytes().await.map_err(|e| self.error(&path, e))?;
                (
                    serde_json::from_slice::<Holder>(&bytes).ok(),
                    version,
                    bytes,
                )
            }
            // Released between our two requests: try once more from the start.
            Err(object_store::Error::NotFound { .. }) => {
                return Box::pin(self.lock(name, purpose, ttl)).await;
            }
            Err(e) => return Err(self.error(&path, e)),
        };
        let expired = other
            .as_ref()
            .is_none_or(|h| h.expires < now || h.is_dead());
        if expired {
            let update = PutOptions::from(PutMode::Update(version));
            let taken = match self.store.put_opts(&path, body.clone(), update).await {
                Ok(_) => true,
                // The local file system has no conditional update: move the dead holder's object
                // aside (a rename is atomic, so of several takers one moves it), check that what
                // moved is what we read, then create ours as usual.
                Err(object_store::Error::NotImplemented { .. }) => {
                    self.take_over_by_rename(&path, &seen, body).await?
                }
                Err(_) => false,
            };
            if taken {
                tracing::warn!(lock = name, previous = ?other, "took over an abandoned lake lock");
                return Ok(LakeLock {
                    location: self.clone(),
                    rel,
                    holder,
                });
            }
        }
        Err(LakeError::Locked {
            name: name.to_string(),
            lake: self.to_string(),
            holder: other
                .map(|h| h.to_string())
                .unwrap_or_else(|| "an unreadable lock object".into()),
            expired,
        })
    }

    /// Replace the lock object at `path`, whose content was `seen`, where stores cannot update
    /// conditionally. Returns whether the lock is now ours.
    async fn take_over_by_rename(
        &self,
        path: &object_store::path::Path,
        seen: &[u8],
        body: PutPayload,
    ) -> Result<bool, LakeError> {
        let aside =
            object_store::path::Path::from(format!("{path}.stale-{}", uuid::Uuid::new_v4()));
        if self.store.rename_if_not_exists(path, &aside).await.is_err() {
            return Ok(false);
        }
        let moved = match self.store.get(&aside).await {
            Ok(r) => r.bytes().await.map_err(|e| self.error(&aside, e))?,
            Err(e) => return Err(self.error(&aside, e)),
        };
        if moved.as_ref() != seen {
            // Another taker got there first and we moved its fresh lock: put it back.
            let back = self.store.rename_if_not_exists(&aside, path).await;
            if back.is_err() {
                let _ = self.store.delete(&aside).await;
            }
            return Ok(false);
        }
        let _ = self.store.delete(&aside).await;
        let create = PutOptions::from(PutMode::Create);
        Ok(self.store.put_opts(path, body, create).await.is_ok())
    }

    /// Take several locks (those of [`ALL`] in its order, any other name after them), releasing
    /// those already taken if one is held elsewhere. Every name given is taken.
    pub async fn lock_all(
        &self,
        names: &[&str],
        purpose: &str,
        ttl: Duration,
    ) -> Result<LockSet, LakeError> {
        let mut held = LockSet::default();
        let mut order: Vec<&str> = ALL.iter().copied().filter(|n| names.contains(n)).collect();
        for n in names {
            if !order.contains(n) {
                order.push(n);
            }
        }
        for n in order {
            match self.lock(n, purpose, ttl).await {
                Ok(l) => held.0.push(l),
                Err(e) => {
                    let _ = held.release().await;
                    return Err(e);
                }
            }
        }
        Ok(held)
    }

    /// Run `work` holding the locks `names`, releasing them whether it succeeds or not; the work's
    /// error wins over a release error.
    pub async fn with_locks<T, E: From<LakeError>>(
        &self,
        names: &[&str],
        purpose: &str,
        ttl: Duration,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let locks = self.lock_all(names, purpose, ttl).await?;
        let out = work.await;
        let released = locks.release().await;
        let out = out?;
        released?;
        Ok(out)
    }

    /// Remove a lock by hand (after its holder died); returns who held it.
    pub async fn unlock(&self, name: &str) -> Result<Option<Holder>, LakeError> {
        let rel = format!("{LOCKS}/{name}.json");
        let Some(bytes) = self.get_opt(&rel).await? else {
            return Ok(None);
        };
        self.delete(&rel).await?;
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Locks currently held.
    pub async fn locks(&self) -> Result<Vec<Holder>, LakeError> {
        let mut out = Vec::new();
        for obj in self.list(LOCKS).await? {
            let rel = self.relative_parts(&obj.location).join("/");
            if let Some(b) = self.get_opt(&rel).await? {
                if let Ok(h) = serde_json::from_slice(&b) {
                    out.push(h);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_writer_fails_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        let ttl = Duration::from_secs(600);
        let a = loc.lock("otx", "ingest otx", ttl).await.unwrap();
        let e = loc
            .lock("otx", "ingest otx", ttl)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("ingest otx (pid"), "{e}");
        assert!(e.contains("lake unlock otx"), "{e}");
        // another name is independent; lock_all backs out when one is held
        let v = loc.lock("virustotal", "ingest vt", ttl).await.unwrap();
        assert!(loc.lock_all(&ALL, "compact", ttl).await.is_err());
        assert!(loc.lock("attack", "x", ttl).await.is_ok_and(|_| true));
        a.release().await.unwrap();
        v.release().await.unwrap();
        assert!(loc
            .locks()
            .await
            .unwrap()
            .iter()
            .all(|h| h.name == "attack"));
        assert_eq!(loc.unlock("attack").await.unwrap().unwrap().purpose, "x");
        let all = loc.lock_all(&ALL, "compact", ttl).await.unwrap();
        all.release().await.unwrap();
        assert!(loc.locks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn every_name_given_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        let ttl = Duration::from_secs(600);
        // The feeds and push, and a name outside ALL, are held while their work runs.
        for name in ["taxii", "push", "scratch"] {
            let held = loc.lock_all(&[name], "first", ttl).await.unwrap();
            let e = loc
                .lock_all(&[name], "second", ttl)
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains("first (pid"), "{name}: {e}");
            held.release().await.unwrap();
        }
        assert!(loc.locks().await.unwrap().is_empty());
    }
}
