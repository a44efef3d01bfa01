//! Player preferences. `auto_advance` is the one the queue needs; anything else a client
//! stores is kept as JSON.

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
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Preferences {
    fn default() -> Self {
        Self {
            auto_advance: true,
            extra: Map::new(),
        }
    }
}

pub async fn load(conn: &mut Conn<'_>, user: UserId) -> Result<Preferences, StoreError> {
    let row: Option<(bool, String)> = run!(conn, c => p::table
        .find(user.0)
        .select((p::auto_advance, p::extra))
        .first(c)
        .await
        .optional())?;
    let Some((auto_advance, extra)) = row else {
        return Ok(Preferences::default());
    };
    let extra = serde_json::from_str(&extra)
        .map_err(|e| StoreError::Corrupt(format!("preferences: {e}")))?;
    Ok(Preferences {
        auto_advance,
        extra,
    })
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
        .values((p::user_id.eq(user.0), p::auto_advance.eq(preferences.auto_advance), p::extra.eq(&extra), p::updated_at.eq(now)))
        .on_conflict(p::user_id)
        .do_update()
        .set((
            p::auto_advance.eq(excluded(p::auto_advance)),
            p::extra.eq(excluded(p::extra)),
            p::updated_at.eq(excluded(p::updated_at)),
        ))
        .execute(c)
        .await)?;
    Ok(())
}
