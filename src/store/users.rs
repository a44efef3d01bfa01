//! Accounts.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::schema::users;
use super::{Conn, StoreError, run};
use crate::domain::{Handle, UserId};

/// A stored account.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub struct UserRecord {
    pub id: i64,
    pub handle: String,
    pub display_name: String,
    pub password_hash: String,
    pub created_at: NaiveDateTime,
}

impl UserRecord {
    pub fn user_id(&self) -> UserId {
        UserId(self.id)
    }
}

#[derive(Insertable)]
#[diesel(table_name = users)]
pub struct NewUser<'a> {
    pub handle: &'a str,
    pub display_name: &'a str,
    pub password_hash: &'a str,
    pub created_at: NaiveDateTime,
}

/// Creates an account; a taken handle fails with a unique violation
/// ([`StoreError::is_unique_violation`]).
pub async fn insert(conn: &mut Conn<'_>, user: &NewUser<'_>) -> Result<UserRecord, StoreError> {
    Ok(run!(conn, c => diesel::insert_into(users::table)
        .values(user)
        .returning(UserRecord::as_returning())
        .get_result(c)
        .await)?)
}

pub async fn find_by_handle(
    conn: &mut Conn<'_>,
    handle: &Handle,
) -> Result<Option<UserRecord>, StoreError> {
    Ok(run!(conn, c => users::table
        .filter(users::handle.eq(handle.as_str()))
        .select(UserRecord::as_select())
        .first(c)
        .await
        .optional())?)
}

pub async fn find(conn: &mut Conn<'_>, id: UserId) -> Result<Option<UserRecord>, StoreError> {
    Ok(run!(conn, c => users::table
        .find(id.0)
        .select(UserRecord::as_select())
        .first(c)
        .await
        .optional())?)
}
