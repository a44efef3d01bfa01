//! Who follows whom: the graph `friends:` presence is shown along.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::{follows, users};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// A followed account, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct Followed {
    pub id: i64,
    pub handle: String,
    pub display_name: String,
}

/// Makes `follower` follow `followee`; `true` if it was new.
pub async fn follow(
    conn: &mut Conn<'_>,
    follower: UserId,
    followee: UserId,
) -> Result<bool, StoreError> {
    let now = super::now();
    let inserted = run!(conn, c => diesel::insert_into(follows::table)
        .values((
            follows::follower_id.eq(follower.0),
            follows::followee_id.eq(followee.0),
            follows::created_at.eq(now),
        ))
        .on_conflict_do_nothing()
        .execute(c)
        .await)?;
    Ok(inserted > 0)
}

/// Stops `follower` following `followee`; `true` if they did.
pub async fn unfollow(
    conn: &mut Conn<'_>,
    follower: UserId,
    followee: UserId,
) -> Result<bool, StoreError> {
    let deleted = run!(conn, c => diesel::delete(
            follows::table
                .filter(follows::follower_id.eq(follower.0))
                .filter(follows::followee_id.eq(followee.0)),
        )
        .execute(c)
        .await)?;
    Ok(deleted > 0)
}

/// The ids of the accounts `follower` follows.
pub async fn followee_ids(
    conn: &mut Conn<'_>,
    follower: UserId,
) -> Result<Vec<UserId>, StoreError> {
    let ids: Vec<i64> = run!(conn, c => follows::table
        .filter(follows::follower_id.eq(follower.0))
        .select(follows::followee_id)
        .order(follows::followee_id)
        .load(c)
        .await)?;
    Ok(ids.into_iter().map(UserId).collect())
}

/// The accounts `follower` follows, by handle.
pub async fn following(conn: &mut Conn<'_>, follower: UserId) -> Result<Vec<Followed>, StoreError> {
    Ok(run!(conn, c => follows::table
        .inner_join(users::table.on(users::id.eq(follows::followee_id)))
        .filter(follows::follower_id.eq(follower.0))
        .select((users::id, users::handle, users::display_name))
        .order(users::handle)
        .load(c)
        .await)?)
}
