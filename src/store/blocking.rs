//! Where SQLite statements run: tokio's blocking pool, as with diesel-async's default, but a
//! statement whose future is dropped midway is waited for without `block_in_place`.
//!
//! diesel-async's `SyncConnectionWrapper` hands each statement to a blocking thread and, when
//! the statement's future is dropped before it finished (an extractor beside it failed, a
//! timeout, a `select!`), waits for the thread in the future's `Drop`, because the connection
//! may not be touched until the statement is done. Its default waits with
//! `tokio::task::block_in_place`, which panics on a current-thread runtime: every actix
//! worker is one. [`BlockingPool`] waits on a plain channel instead: the worker thread blocks
//! for what remains of one statement (the statement runs on another thread, so this cannot
//! deadlock), and the connection is whole again afterwards.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};

use diesel_async::sync_connection_wrapper::SpawnBlocking;
use futures_util::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Runs SQLite statements on the blocking pool of the runtime the connection was made on.
pub struct BlockingPool(Option<Handle>);

impl SpawnBlocking for BlockingPool {
    fn spawn_blocking<'a, R>(
        &mut self,
        task: impl FnOnce() -> R + Send + 'static,
    ) -> BoxFuture<'a, Result<R, Box<dyn Error + Send + Sync + 'static>>>
    where
        R: Send + 'static,
    {
        let Some(handle) = self.0.clone().or_else(|| Handle::try_current().ok()) else {
            // No runtime at all: nothing else could run meanwhile anyway.
            let result = task();
            return Box::pin(async move { Ok(result) });
        };
        // Dropped by the blocking thread once the task (and the connection it holds) is done,
        // which is what a dropped statement waits for.
        let (finished, done) = mpsc::sync_channel::<()>(0);
        let join = handle.spawn_blocking(move || {
            let _finished = finished;
            task()
        });
        Box::pin(Statement { join, done })
    }

    fn get_runtime() -> Self {
        BlockingPool(Handle::try_current().ok())
    }
}

/// A statement under way on a blocking thread.
struct Statement<R> {
    join: JoinHandle<R>,
    done: mpsc::Receiver<()>,
}

impl<R> Future for Statement<R> {
    type Output = Result<R, Box<dyn Error + Send + Sync + 'static>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.join).poll(cx).map_err(Box::from)
    }
}

impl<R> Drop for Statement<R> {
    fn drop(&mut self) {
        if !self.join.is_finished() {
            // Err once the sender is gone: the task finished (or never ran, at shutdown).
            let _ = self.done.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection, TransactionManager};

    use super::super::SqliteConn;

    /// Issue 10, defect 5: on actix's current-thread runtime, dropping a SQLite statement
    /// midway panicked in diesel-async's default wrapper (`block_in_place`).
    #[actix_rt::test]
    async fn a_statement_dropped_midway_neither_panics_nor_spoils_its_connection() {
        let mut conn = SqliteConn::establish(":memory:").await.expect("sqlite");
        let slow = diesel::sql_query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) \
             SELECT count(*) FROM n",
        );
        let running = slow.execute(&mut conn);
        let gave_up = tokio::time::timeout(Duration::from_millis(20), running).await;
        assert!(
            gave_up.is_err(),
            "the statement finished before it was dropped"
        );
        // What the pool checks before reuse, then a statement: both fine.
        let status =
            <SqliteConn as AsyncConnection>::TransactionManager::transaction_manager_status_mut(
                &mut conn,
            );
        assert_eq!(status.transaction_depth().ok(), Some(None));
        conn.batch_execute("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);")
            .await
            .expect("the connection works on");
    }
}
