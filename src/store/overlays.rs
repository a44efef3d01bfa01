//! `overlays`: a user's streaming overlays, found by the hash of their token.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::overlays;
use super::{Conn, StoreError, run};
use crate::domain::UserId;

#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Overlay {
    pub id: String,
    pub user_id: i64,
    pub name: String,
    pub created_at: NaiveDateTime,
}

const COLUMNS: (
    overlays::id,
    overlays::user_id,
    overlays::name,
    overlays::created_at,
) = (
    overlays::id,
    overlays::user_id,
    overlays::name,
    overlays::created_at,
);

pub async fn create(
    conn: &mut Conn<'_>,
    overlay: &Overlay,
    token_hash: &str,
) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(overlays::table)
        .values((
            overlays::id.eq(&overlay.id),
            overlays::user_id.eq(overlay.user_id),
            overlays::name.eq(&overlay.name),
            overlays::token_hash.eq(token_hash),
            overlays::created_at.eq(overlay.created_at),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// The user's overlays, oldest first.
pub async fn list(conn: &mut Conn<'_>, user: UserId) -> Result<Vec<Overlay>, StoreError> {
    Ok(run!(conn, c => overlays::table
        .filter(overlays::user_id.eq(user.0))
        .select(COLUMNS)
        .order((overlays::created_at, overlays::id))
        .load(c)
        .await)?)
}

/// How many overlays the user has.
pub async fn count(conn: &mut Conn<'_>, user: UserId) -> Result<i64, StoreError> {
    Ok(run!(conn, c => overlays::table
        .filter(overlays::user_id.eq(user.0))
        .count()
        .get_result(c)
        .await)?)
}

/// Deletes the user's overlay `id`; returns its token hash, or `None` when there was none.
pub async fn delete(
    conn: &mut Conn<'_>,
    user: UserId,
    id: &str,
) -> Result<Option<String>, StoreError> {
    Ok(run!(conn, c => diesel::delete(
        overlays::table
            .filter(overlays::id.eq(id))
            .filter(overlays::user_id.eq(user.0)),
    )
    .returning(overlays::token_hash)
    .get_result(c)
    .await
    .optional())?)
}

/// The overlay whose token hashes to `token_hash`.
pub async fn by_token_hash(
    conn: &mut Conn<'_>,
    token_hash: &str,
) -> Result<Option<Overlay>, StoreError> {
    Ok(run!(conn, c => overlays::table
        .filter(overlays::token_hash.eq(token_hash))
        .select(COLUMNS)
        .first(c)
        .await
        .optional())?)
}
