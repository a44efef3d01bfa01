//! Player preferences. `auto_advance` is the one the queue needs and `share_listening` the one
//! presence needs (each a column); anything else a client stores is kept as JSON.

use std::collections::HashSet;

use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::schema::preferences as p;
use super::{Conn, StoreError, run};
use crate::domain::UserId;

/// A user's preferences, with defaults for a user who never set any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preferences {
    pub auto_advance: bool,
    /// Whether followers (`friends:` views) and the public now-playing page see what the user
    /// plays.
    pub share_listening: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            auto_advance: true,
            share_listening: true,
            extra: Map::new(),
        }
    }
}

pub async fn load(conn: &mut Conn<'_>, user: UserId) -> Result<Preferences, StoreError> {
    let row: Option<(bool, bool, String)> = run!(conn, c => p::table
        .find(user.0)
        .select((p::auto_advance, p::share_listening, p::extra))
        .first(c)
        .await
        .optional())?;
    let Some((auto_advance, share_listening, extra)) = row else {
        return Ok(Preferences::default());
    };
    let mut extra: Map<String, Value> = serde_json::from_str(&extra)
        .map_err(|e| StoreError::Corrupt(format!("preferences: {e}")))?;
    // Kept as columns; a copy in the JSON (stored before the column existed) is stale.
    extra.remove("auto_advance");
    extra.remove("share_listening");
    Ok(Preferences {
        auto_advance,
        share_listening,
        extra,
    })
}

/// Whether `user` shares what they play with followers and the public page.
pub async fn shares_listening(conn: &mut Conn<'_>, user: UserId) -> Result<bool, StoreError> {
    Ok(not_sharing(conn, &[user]).await?.is_empty())
}

/// Those of `users` who turned `share_listening` off (a user without preferences shares).
pub async fn not_sharing(
    conn: &mut Conn<'_>,
    users: &[UserId],
) -> Result<HashSet<UserId>, StoreError> {
    let ids: Vec<i64> = users.iter().map(|u| u.0).collect();
    let hidden: Vec<i64> = run!(conn, c => p::table
        .filter(p::user_id.eq_any(&ids))
        .filter(p::share_listening.eq(false))
        .select(p::user_id)
        .load(c)
        .await)?;
    Ok(hidden.into_iter().map(UserId).collect())
}

pub async fn store(
    conn: &mut Conn<'_>,
    user: UserId,
    preferences: &Preferences,
) -> Result<(), StoreError> {
    let extra = serde_json::to_string(&preferences.extra)
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let now = super::now();
    run!(conn, c => diesel::insert_into(p::table)
        .values((
            p::user_id.eq(user.0),
            p::auto_advance.eq(preferences.auto_advance),
            p::share_listening.eq(preferences.share_listening),
            p::extra.eq(&extra),
            p::updated_at.eq(now),
        ))
        .on_conflict(p::user_id)
        .do_update()
        .set((
            p::auto_advance.eq(excluded(p::auto_advance)),
            p::share_listening.eq(excluded(p::share_listening)),
            p::extra.eq(excluded(p::extra)),
            p::updated_at.eq(excluded(p::updated_at)),
        ))
        .execute(c)
        .await)?;
    Ok(())
}
