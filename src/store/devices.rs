//! The devices an account has signed in from.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use super::schema::devices;
use super::{Conn, StoreError, run};
use crate::domain::{Device, UserId};

/// A stored device.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = devices)]
pub struct DeviceRecord {
    pub user_id: i64,
    pub device_id: String,
    pub name: String,
    pub kind: String,
    pub created_at: NaiveDateTime,
    pub last_seen_at: NaiveDateTime,
}

#[derive(Insertable)]
#[diesel(table_name = devices)]
pub struct DeviceSighting<'a> {
    pub user_id: i64,
    pub device_id: &'a str,
    pub name: &'a str,
    pub kind: &'a str,
    pub created_at: NaiveDateTime,
    pub last_seen_at: NaiveDateTime,
}

/// Records that `user` was seen on `device` now: created on first sight, name, kind and
/// last-seen time refreshed after.
pub async fn record(conn: &mut Conn<'_>, user: UserId, device: &Device) -> Result<(), StoreError> {
    let now = super::now();
    upsert(
        conn,
        &DeviceSighting {
            user_id: user.0,
            device_id: device.id.as_str(),
            name: &device.name,
            kind: device.kind.as_str(),
            created_at: now,
            last_seen_at: now,
        },
    )
    .await
}

/// The upsert of `$values` (one sighting or a slice of them): inserted, or name, kind and
/// last-seen time refreshed.
macro_rules! upsert_statement {
    ($values:expr) => {
        diesel::insert_into(devices::table)
            .values($values)
            .on_conflict((devices::user_id, devices::device_id))
            .do_update()
            .set((
                devices::name.eq(excluded(devices::name)),
                devices::kind.eq(excluded(devices::kind)),
                devices::last_seen_at.eq(excluded(devices::last_seen_at)),
            ))
    };
}

/// [`upsert`] for many devices (each at most once): one statement on PostgreSQL; one by one
/// on SQLite, whose writers are serialised anyway (and diesel has no multi-row upsert for it).
pub async fn upsert_many(
    conn: &mut Conn<'_>,
    sightings: &[DeviceSighting<'_>],
) -> Result<(), StoreError> {
    match conn {
        Conn::Postgres(c) => {
            upsert_statement!(sightings).execute(&mut **c).await?;
        }
        Conn::Sqlite(c) => {
            for sighting in sightings {
                upsert_statement!(sighting).execute(&mut **c).await?;
            }
        }
    }
    Ok(())
}

/// Inserts a device or refreshes its name, kind and last-seen time.
pub async fn upsert(conn: &mut Conn<'_>, device: &DeviceSighting<'_>) -> Result<(), StoreError> {
    run!(conn, c => upsert_statement!(device).execute(c).await)?;
    Ok(())
}

/// Every device the user has been seen on, most recently seen first.
pub async fn list(conn: &mut Conn<'_>, user: UserId) -> Result<Vec<DeviceRecord>, StoreError> {
    Ok(run!(conn, c => devices::table
        .filter(devices::user_id.eq(user.0))
        .select(DeviceRecord::as_select())
        .order((devices::last_seen_at.desc(), devices::device_id))
        .load(c)
        .await)?)
}

/// The user's device `device_id`, if the user was ever seen on it.
/// The device as this account registered it (name and kind), or a plain one of that id.
pub async fn known_or_plain(
    conn: &mut Conn<'_>,
    user: UserId,
    device_id: &str,
) -> Result<crate::domain::Device, StoreError> {
    let device = match find(conn, user, device_id).await? {
        Some(d) => crate::domain::Device::parse(Some(&d.device_id), Some(&d.name), Some(&d.kind)),
        None => crate::domain::Device::parse(Some(device_id), None, None),
    };
    device.map_err(|e| StoreError::Corrupt(format!("device {device_id:?}: {e}")))
}

pub async fn find(
    conn: &mut Conn<'_>,
    user: UserId,
    device_id: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    Ok(run!(conn, c => devices::table
        .find((user.0, device_id))
        .select(DeviceRecord::as_select())
        .first(c)
        .await
        .optional())?)
}
