//! Queue states and their revisions. The store is the only judge of conflicts: every write
//! compares and bumps the revision in one statement, so replicas never race a read against a
//! write.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::queue_state as qs;
use super::{Conn, StoreError, run};
use crate::domain::UserId;
use crate::domain::queue::QueueState;

/// A stored queue.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredQueue {
    pub state: QueueState,
    pub revision: i64,
    pub updated_by_device: Option<String>,
}

#[derive(Queryable)]
struct Row {
    state: String,
    revision: i64,
    updated_by_device: Option<String>,
}

impl Row {
    fn into_stored(self) -> Result<StoredQueue, StoreError> {
        let state = serde_json::from_str(&self.state)
            .map_err(|e| StoreError::Corrupt(format!("queue state: {e}")))?;
        Ok(StoredQueue {
            state,
            revision: self.revision,
            updated_by_device: self.updated_by_device,
        })
    }
}

#[derive(Insertable)]
#[diesel(table_name = qs)]
struct NewRow<'a> {
    user_id: i64,
    state: &'a str,
    revision: i64,
    updated_at: NaiveDateTime,
    updated_by_device: Option<&'a str>,
}

/// The user's queue, or `None` for a user who never wrote one (revision 0).
pub async fn load(conn: &mut Conn<'_>, user: UserId) -> Result<Option<StoredQueue>, StoreError> {
    let row: Option<Row> = run!(conn, c => qs::table
        .find(user.0)
        .select((qs::state, qs::revision, qs::updated_by_device))
        .first(c)
        .await
        .optional())?;
    row.map(Row::into_stored).transpose()
}

/// Like [`load`], inside a transaction: on PostgreSQL the row stays locked until the
/// transaction ends, so the write that follows cannot lose a race. SQLite takes no row lock
/// (it has no `FOR UPDATE`); its writers are one replica's, which writes each user's queue
/// from one actor at a time, so nothing there races.
pub async fn load_locked(
    conn: &mut Conn<'_>,
    user: UserId,
) -> Result<Option<StoredQueue>, StoreError> {
    let Conn::Postgres(c) = conn else {
        return load(conn, user).await;
    };
    let row: Option<Row> = qs::table
        .find(user.0)
        .select((qs::state, qs::revision, qs::updated_by_device))
        .for_update()
        .first(&mut **c)
        .await
        .optional()?;
    row.map(Row::into_stored).transpose()
}

/// What a compare-and-swap came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Stored under this new revision.
    Stored(i64),
    /// The stored revision was not the expected one.
    Conflict,
}

/// Stores `state` if the stored revision is `expected` (0: no queue yet), as revision
/// `expected + 1`, in one statement.
pub async fn compare_and_swap(
    conn: &mut Conn<'_>,
    user: UserId,
    expected: i64,
    state: &QueueState,
    device: Option<&str>,
    now: NaiveDateTime,
) -> Result<Written, StoreError> {
    let json = serde_json::to_string(state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let revision: Option<i64> = if expected == 0 {
        let row = NewRow {
            user_id: user.0,
            state: &json,
            revision: 1,
            updated_at: now,
            updated_by_device: device,
        };
        run!(conn, c => diesel::insert_into(qs::table)
            .values(&row)
            .on_conflict(qs::user_id)
            .do_nothing()
            .returning(qs::revision)
            .get_result(c)
            .await
            .optional())?
    } else {
        run!(conn, c => diesel::update(qs::table.filter(qs::user_id.eq(user.0)).filter(qs::revision.eq(expected)))
            .set((
                qs::state.eq(&json),
                qs::revision.eq(qs::revision + 1),
                qs::updated_at.eq(now),
                qs::updated_by_device.eq(device),
            ))
            .returning(qs::revision)
            .get_result(c)
            .await
            .optional())?
    };
    Ok(revision.map_or(Written::Conflict, Written::Stored))
}
