//! Blocked client addresses, and the accounts each device created (for the registration
//! limit).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use super::schema::{device_registrations as registrations, ip_blocks};
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// A block as listed.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, serde::Serialize)]
pub struct Block {
    pub address: String,
    pub until: NaiveDateTime,
    pub reason: String,
    pub created_at: NaiveDateTime,
}

/// Blocks `address` until `until` (a block already there is replaced).
pub async fn block(
    conn: &mut Conn<'_>,
    address: &str,
    until: NaiveDateTime,
    reason: &str,
) -> Result<(), StoreError> {
    let now = super::now();
    run!(conn, c => diesel::insert_into(ip_blocks::table)
        .values((
            ip_blocks::address.eq(address),
            ip_blocks::until.eq(until),
            ip_blocks::reason.eq(reason),
            ip_blocks::created_at.eq(now),
        ))
        .on_conflict(ip_blocks::address)
        .do_update()
        .set((
            ip_blocks::until.eq(excluded(ip_blocks::until)),
            ip_blocks::reason.eq(excluded(ip_blocks::reason)),
            ip_blocks::created_at.eq(excluded(ip_blocks::created_at)),
        ))
        .execute(c)
        .await)?;
    Ok(())
}

/// Lifts the block of `address`; `true` if there was one.
pub async fn unblock(conn: &mut Conn<'_>, address: &str) -> Result<bool, StoreError> {
    let deleted = run!(conn, c => diesel::delete(ip_blocks::table.find(address))
        .execute(c)
        .await)?;
    Ok(deleted > 0)
}

/// The blocks still in force at `now` (expired ones are deleted on the way).
pub async fn active(conn: &mut Conn<'_>, now: NaiveDateTime) -> Result<Vec<Block>, StoreError> {
    run!(conn, c => diesel::delete(ip_blocks::table.filter(ip_blocks::until.le(now)))
        .execute(c)
        .await)?;
    let blocks = run!(conn, c => ip_blocks::table
        .select((ip_blocks::address, ip_blocks::until, ip_blocks::reason, ip_blocks::created_at))
        .order(ip_blocks::created_at.desc())
        .load(c)
        .await)?;
    Ok(blocks)
}

/// How many accounts were created from any of `device_keys` since `since` (the largest count
/// of one key).
pub async fn accounts_from_device(
    conn: &mut Conn<'_>,
    device_keys: &[String],
    since: NaiveDateTime,
) -> Result<i64, StoreError> {
    let mut most = 0;
    for key in device_keys {
        let count: i64 = run!(conn, c => registrations::table
            .filter(registrations::device_key.eq(key))
            .filter(registrations::created_at.gt(since))
            .count()
            .get_result(c)
            .await)?;
        most = most.max(count);
    }
    Ok(most)
}

/// Records that `user` was created from `device_keys`.
pub async fn record_registration(
    conn: &mut Conn<'_>,
    device_keys: &[String],
    user: UserId,
) -> Result<(), StoreError> {
    let now = super::now();
    for key in device_keys {
        run!(conn, c => diesel::insert_into(registrations::table)
            .values((
                registrations::device_key.eq(key),
                registrations::user_id.eq(user.0),
                registrations::created_at.eq(now),
            ))
            .on_conflict_do_nothing()
            .execute(c)
            .await)?;
    }
    Ok(())
}

/// Forgets registrations older than `cutoff` (outside every device-limit window); returns how
/// many went.
pub async fn purge_registrations(
    conn: &mut Conn<'_>,
    cutoff: NaiveDateTime,
) -> Result<usize, StoreError> {
    Ok(
        run!(conn, c => diesel::delete(registrations::table.filter(registrations::created_at.lt(cutoff)))
        .execute(c)
        .await)?,
    )
}
