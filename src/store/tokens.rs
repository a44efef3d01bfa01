//! Refresh tokens, stored only as hashes. A login starts a family; every refresh spends the
//! presented token and adds its successor to the family.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::refresh_tokens as rt;
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// A stored refresh token.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = rt)]
pub struct RefreshTokenRecord {
    pub id: i64,
    pub user_id: i64,
    pub family_id: String,
    pub device_id: String,
    pub token_hash: String,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
    pub spent_at: Option<NaiveDateTime>,
    pub revoked_at: Option<NaiveDateTime>,
}

#[derive(Insertable)]
#[diesel(table_name = rt)]
pub struct NewRefreshToken<'a> {
    pub user_id: i64,
    pub family_id: &'a str,
    pub device_id: &'a str,
    pub token_hash: &'a str,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

pub async fn insert(conn: &mut Conn<'_>, token: &NewRefreshToken<'_>) -> Result<(), StoreError> {
    run!(conn, c => diesel::insert_into(rt::table).values(token).execute(c).await)?;
    Ok(())
}

/// Marks a live token spent and returns it, in one statement, so two refreshes racing with the
/// same token cannot both succeed. `None` when the token is unknown, spent, revoked or expired.
pub async fn spend(
    conn: &mut Conn<'_>,
    token_hash: &str,
    now: NaiveDateTime,
) -> Result<Option<RefreshTokenRecord>, StoreError> {
    Ok(run!(conn, c => diesel::update(
            rt::table
                .filter(rt::token_hash.eq(token_hash))
                .filter(rt::spent_at.is_null())
                .filter(rt::revoked_at.is_null())
                .filter(rt::expires_at.gt(now)),
        )
        .set(rt::spent_at.eq(now))
        .returning(RefreshTokenRecord::as_returning())
        .get_result(c)
        .await
        .optional())?)
}

pub async fn find(
    conn: &mut Conn<'_>,
    token_hash: &str,
) -> Result<Option<RefreshTokenRecord>, StoreError> {
    Ok(run!(conn, c => rt::table
        .filter(rt::token_hash.eq(token_hash))
        .select(RefreshTokenRecord::as_select())
        .first(c)
        .await
        .optional())?)
}

/// Revokes every token of a family; returns how many were still unrevoked.
pub async fn revoke_family(
    conn: &mut Conn<'_>,
    user: UserId,
    family_id: &str,
    now: NaiveDateTime,
) -> Result<usize, StoreError> {
    Ok(run!(conn, c => diesel::update(
            rt::table
                .filter(rt::user_id.eq(user.0))
                .filter(rt::family_id.eq(family_id))
                .filter(rt::revoked_at.is_null()),
        )
        .set(rt::revoked_at.eq(now))
        .execute(c)
        .await)?)
}

/// True when the family has been revoked (logout or detected reuse).
pub async fn family_revoked(conn: &mut Conn<'_>, family_id: &str) -> Result<bool, StoreError> {
    let revoked: i64 = run!(conn, c => rt::table
        .filter(rt::family_id.eq(family_id))
        .filter(rt::revoked_at.is_not_null())
        .count()
        .get_result(c)
        .await)?;
    Ok(revoked > 0)
}

/// Deletes the sessions whose every refresh token expired before `cutoff`, and returns how
/// many tokens went. Whole sessions only: a revoked token must outlive its session's last
/// live one, since any revoked token ends the session.
pub async fn purge_expired_sessions(
    conn: &mut Conn<'_>,
    cutoff: NaiveDateTime,
) -> Result<usize, StoreError> {
    let dead: Vec<String> = run!(conn, c => rt::table
        .group_by(rt::family_id)
        .having(diesel::dsl::max(rt::expires_at).lt(cutoff))
        .select(rt::family_id)
        .load(c)
        .await)?;
    let mut deleted = 0;
    for families in dead.chunks(500) {
        deleted += run!(conn, c => diesel::delete(rt::table.filter(rt::family_id.eq_any(families)))
            .execute(c)
            .await)?;
    }
    Ok(deleted)
}
