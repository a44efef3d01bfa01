//! The channel layer: what each [`Topic`] does on join and with client events. A handler
//! answers with a [`Reply`]: at once, or later (after the store answered). `Ok(response)` or
//! `Err(response)` becomes the `phx_reply`'s `status` and `response`. Server broadcasts reach
//! joined sockets through the user's session, whatever the topic.

use actix::Addr;
use futures_util::future::LocalBoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::events::UserEvent;
use super::hub::{Hub, Publish, SessionOf};
use super::presence::{Playing, Presence};
use super::queue::{QueueError, Queues};
use super::topics::Topic;
use crate::auth::Identity;
use crate::domain::queue::{QueueOp, QueueState};
use crate::domain::{DeviceId, InvalidInput, UserId};
use crate::presence::input::{CommandInput, PlayReportInput, TransferInput};
use crate::presence::{AnyRegistry, Registry};
use crate::store::{Store, devices};

/// A reply's `response`, for `status: "ok"` or `status: "error"`.
pub type Response = Result<Value, Value>;

/// When the reply is ready.
pub enum Reply {
    Now(Response),
    Later(LocalBoxFuture<'static, Response>),
}

/// What a handler may use.
pub struct ChannelContext<'a> {
    pub identity: &'a Identity,
    /// The device this socket speaks for.
    pub device: &'a DeviceId,
    pub hub: &'a Addr<Hub>,
    pub queues: &'a Queues,
    pub presence: &'a Addr<Presence>,
    pub registry: &'a AnyRegistry,
    pub store: &'a Store,
    /// The per-device budget of now-playing reports, when limited.
    pub ingest: Option<&'a (crate::ratelimit::MemoryLimiter, crate::ratelimit::Quota)>,
}

fn refuse(reason: &str) -> Reply {
    Reply::Now(Err(json!({ "reason": reason })))
}

/// The JSON of a queue error for a client.
fn queue_error(error: QueueError) -> Value {
    match error {
        QueueError::Conflict { current, .. } => json!({"reason": "conflict", "revision": current}),
        QueueError::Invalid(invalid) => json!({"reason": invalid.to_string()}),
        QueueError::Store(store) if store.is_unavailable() => json!({"reason": "unavailable"}),
        QueueError::SessionGone => json!({"reason": "unavailable"}),
        QueueError::Store(store) => {
            tracing::error!(error = %crate::error::chain(&store), "queue store error");
            json!({"reason": "internal error"})
        }
    }
}

fn invalid(error: &InvalidInput) -> Reply {
    refuse(&error.to_string())
}

/// Why a device cannot be sent anything: never seen, or not online now.
async fn absent_device(store: &Store, user: UserId, device: &DeviceId) -> Value {
    let known = match store.conn().await {
        Ok(mut pooled) => devices::find(&mut pooled.conn(), user, device.as_str())
            .await
            .is_ok_and(|found| found.is_some()),
        Err(_) => false,
    };
    let reason = if known {
        "device offline"
    } else {
        "unknown device"
    };
    json!({ "reason": reason })
}

/// Checks that `device` of `user` is online now (somewhere).
async fn online(
    registry: &AnyRegistry,
    store: &Store,
    user: UserId,
    device: &DeviceId,
) -> Result<(), Value> {
    let snapshot = registry
        .snapshot(user)
        .await
        .map_err(|_| json!({"reason": "unavailable"}))?;
    if snapshot.has_device(device.as_str()) {
        Ok(())
    } else {
        Err(absent_device(store, user, device).await)
    }
}

/// Parses an event payload into `T`, or refuses it with the reason.
fn payload<T: for<'de> Deserialize<'de>>(payload: Map<String, Value>) -> Result<T, Reply> {
    serde_json::from_value(Value::Object(payload))
        .map_err(|e| refuse(&format!("invalid payload: {e}")))
}

/// Answers a join of `topic` (already authorised by [`Topic::route`]).
pub fn join(topic: &Topic, join_payload: &Map<String, Value>, ctx: &ChannelContext<'_>) -> Reply {
    match topic {
        Topic::Echo(..) | Topic::Friends(_) => Reply::Now(Ok(json!({}))),
        Topic::Devices(_) => Reply::Now(Ok(json!({"device_id": ctx.device.as_str()}))),
        Topic::Queue(user) => {
            let (queues, user, hub) = (ctx.queues.clone(), *user, ctx.hub.clone());
            let known = join_payload.get("revision").and_then(Value::as_i64);
            Reply::Later(Box::pin(async move {
                // Read only once this replica hears the user's channel, so no later change
                // made on another replica can slip between the read and the subscription.
                if let Ok((_, subscribed)) = hub.send(SessionOf { user }).await {
                    let _ = subscribed.await;
                }
                let view = queues.read(user).await.map_err(queue_error)?;
                if known == Some(view.revision) {
                    return Ok(json!({"revision": view.revision, "unchanged": true}));
                }
                serde_json::to_value(&view).map_err(|e| json!({"reason": e.to_string()}))
            }))
        }
    }
}

#[derive(Deserialize)]
struct Replace {
    state: QueueState,
    base_revision: Option<i64>,
}

#[derive(Deserialize)]
struct Ops {
    ops: Vec<QueueOp>,
}

/// Answers a client event on a joined `topic`.
pub fn handle_in(
    topic: &Topic,
    event: &str,
    body: Map<String, Value>,
    ctx: &ChannelContext<'_>,
) -> Reply {
    match topic {
        Topic::Echo(user, _) => match event {
            "ping" => Reply::Now(Ok(Value::Object(body))),
            "broadcast" => {
                let Some(Value::String(name)) = body.get("event") else {
                    return refuse("broadcast needs an event name");
                };
                if name.is_empty() || name.len() > 64 || name.starts_with("phx_") {
                    return refuse("event names are 1 to 64 characters and do not start with phx_");
                }
                let pushed = match body.get("payload") {
                    Some(Value::Object(pushed)) => Value::Object(pushed.clone()),
                    None => json!({}),
                    Some(_) => return refuse("payload must be an object"),
                };
                ctx.hub.do_send(Publish {
                    user: *user,
                    event: UserEvent::Push {
                        topic: topic.to_string(),
                        event: name.clone(),
                        payload: pushed,
                        revision: None,
                    },
                });
                Reply::Now(Ok(json!({})))
            }
            _ => refuse("unknown event"),
        },
        Topic::Queue(user) => {
            let (queues, user, device) = (ctx.queues.clone(), *user, ctx.device.clone());
            match event {
                "replace" => {
                    let request: Replace = match payload(body) {
                        Ok(request) => request,
                        Err(reply) => return reply,
                    };
                    Reply::Later(Box::pin(async move {
                        let view = queues
                            .replace(user, request.base_revision, request.state, &device)
                            .await
                            .map_err(queue_error)?;
                        Ok(json!({"revision": view.revision}))
                    }))
                }
                "ops" => {
                    let request: Ops = match payload(body) {
                        Ok(request) => request,
                        Err(reply) => return reply,
                    };
                    if request.ops.is_empty() || request.ops.len() > 100 {
                        return refuse("ops must hold 1 to 100 operations");
                    }
                    Reply::Later(Box::pin(async move {
                        let (view, skipped) = queues
                            .apply(user, request.ops, &device)
                            .await
                            .map_err(queue_error)?;
                        Ok(json!({"revision": view.revision, "skipped": skipped}))
                    }))
                }
                _ => refuse("unknown event"),
            }
        }
        Topic::Devices(user) => devices_event(*user, event, body, ctx),
        Topic::Friends(_) => refuse("unknown event"),
    }
}

/// `now_playing`, `transfer` and `command` on `devices:{user}`.
fn devices_event(
    user: UserId,
    event: &str,
    body: Map<String, Value>,
    ctx: &ChannelContext<'_>,
) -> Reply {
    let (registry, store, hub) = (ctx.registry.clone(), ctx.store.clone(), ctx.hub.clone());
    match event {
        "now_playing" => {
            let input: PlayReportInput = match payload(body) {
                Ok(input) => input,
                Err(reply) => return reply,
            };
            if let Some((limiter, quota)) = ctx.ingest {
                let device = format!("{user}/{}", ctx.device.as_str());
                if !limiter.check("ingest_device", *quota, &device).allowed {
                    return refuse("rate limited");
                }
            }
            match input.parse() {
                Ok(report) => {
                    ctx.presence.do_send(Playing {
                        user,
                        device: ctx.device.clone(),
                        report,
                    });
                    Reply::Now(Ok(json!({})))
                }
                Err(error) => invalid(&error),
            }
        }
        "transfer" => {
            let input: TransferInput = match payload(body) {
                Ok(input) => input,
                Err(reply) => return reply,
            };
            let (device, play) = match input.parse() {
                Ok(parsed) => parsed,
                Err(error) => return invalid(&error),
            };
            Reply::Later(Box::pin(async move {
                online(&registry, &store, user, &device).await?;
                let device_id = device.as_str().to_owned();
                registry
                    .set_output(user, device_id.clone())
                    .await
                    .map_err(|_| json!({"reason": "unavailable"}))?;
                hub.do_send(Publish {
                    user,
                    event: UserEvent::OutputChanged {
                        device_id: device_id.clone(),
                        play,
                    },
                });
                Ok(json!({ "device_id": device_id }))
            }))
        }
        "command" => {
            let input: CommandInput = match payload(body) {
                Ok(input) => input,
                Err(reply) => return reply,
            };
            let (device, command) = match input.parse(ctx.device) {
                Ok(parsed) => parsed,
                Err(error) => return invalid(&error),
            };
            Reply::Later(Box::pin(async move {
                online(&registry, &store, user, &device).await?;
                hub.do_send(Publish {
                    user,
                    event: UserEvent::DeviceCommand {
                        device_id: device.as_str().to_owned(),
                        payload: command,
                    },
                });
                Ok(json!({}))
            }))
        }
        _ => refuse("unknown event"),
    }
}
