//! Group commit for redb progress stores.
//!
//! A call's outcome is recorded durably before it counts (an object-store
//! trigger's objects, a backfill's calls). One `fsync` per outcome makes
//! calls that finish together queue behind each other's disk flushes, so a
//! committer thread takes every outcome waiting when it starts a write
//! transaction and commits them together; each waiter is answered once the
//! transaction holding its outcome is durable.

use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

/// What a waiter learns: the commit's outcome (shared by the whole group).
pub type Committed = Result<(), Arc<redb::Error>>;

/// How a group is written: every entry into one open write transaction.
type Apply<T> = Box<dyn Fn(&WriteTransaction, &[T]) -> Result<(), redb::Error> + Send>;

/// A committer thread for one database. Dropping it commits what was
/// already handed over, then joins the thread (so that the database file is
/// released when this returns).
pub struct GroupCommit<T: Send + 'static> {
    sender: Option<mpsc::Sender<(T, oneshot::Sender<Committed>)>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> GroupCommit<T> {
    /// Starts the committer thread, named `name`; `apply` writes a group of
    /// entries into the transaction that is then committed.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn spawn(
        db: Arc<Database>,
        name: &str,
        apply: impl Fn(&WriteTransaction, &[T]) -> Result<(), redb::Error> + Send + 'static,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        let apply: Apply<T> = Box::new(apply);
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || commit_loop(&db, &receiver, &apply))?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Hands `entry` to the committer; resolves once the transaction holding
    /// it is committed (durably: redb's default durability), or failed.
    /// Entries are committed in the order they are handed over.
    pub async fn commit(&self, entry: T) -> Committed {
        let gone = || {
            Arc::new(redb::Error::from(redb::StorageError::Io(
                std::io::Error::other("the progress committer stopped"),
            )))
        };
        let (done, committed) = oneshot::channel();
        match self.sender.as_ref().map(|s| s.send((entry, done))) {
            Some(Ok(())) => committed.await.unwrap_or_else(|_| Err(gone())),
            _ => Err(gone()),
        }
    }
}

impl<T: Send + 'static> Drop for GroupCommit<T> {
    fn drop(&mut self) {
        // Closing the channel ends the loop once what was sent is committed.
        drop(self.sender.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One write transaction for every entry waiting, then each waiter is told
/// the outcome.
fn commit_loop<T>(
    db: &Database,
    receiver: &mpsc::Receiver<(T, oneshot::Sender<Committed>)>,
    apply: &Apply<T>,
) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        group.extend(receiver.try_iter());
        let (entries, waiters): (Vec<T>, Vec<_>) = group.into_iter().unzip();
        let committed = (|| -> Result<(), redb::Error> {
            let tx = db.begin_write()?;
            apply(&tx, &entries)?;
            tx.commit()?;
            Ok(())
        })()
        .map_err(Arc::new);
        for w in waiters {
            let _ = w.send(committed.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_entry_is_committed_before_its_waiter_returns() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("p.redb")).unwrap());
        let groups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let commit = Arc::new(
            GroupCommit::spawn(Arc::clone(&db), "test-commit", {
                let groups = Arc::clone(&groups);
                move |tx, entries: &[u64]| {
                    groups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut t = tx.open_table(T)?;
                    for e in entries {
                        t.insert(e, e * 2)?;
                    }
                    Ok(())
                }
            })
            .unwrap(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let (commit, db) = (Arc::clone(&commit), Arc::clone(&db));
            tasks.spawn(async move {
                commit.commit(i).await.unwrap();
                // Visible (committed) as soon as the waiter is answered.
                let r = db.begin_read().unwrap();
                assert_eq!(
                    r.open_table(T).unwrap().get(i).unwrap().unwrap().value(),
                    i * 2
                );
            });
        }
        while let Some(t) = tasks.join_next().await {
            t.unwrap();
        }
        let r = db.begin_read().unwrap();
        assert_eq!(r.open_table(T).unwrap().len().unwrap(), 200);
        let n = groups.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=200).contains(&n), "{n} groups");
    }

    #[tokio::test]
    async fn a_failed_commit_reaches_every_waiter_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("p.redb")).unwrap());
        let commit = GroupCommit::spawn(db, "test-commit", |_tx, _entries: &[u64]| {
            Err(redb::Error::from(redb::StorageError::Io(
                std::io::Error::other("disk full"),
            )))
        })
        .unwrap();
        let e = commit.commit(1).await.unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
    }
}
