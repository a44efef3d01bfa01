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
use super::queue::{QueueError, Queues};
use super::topics::Topic;
use crate::auth::Identity;
use crate::domain::DeviceId;
use crate::domain::queue::{QueueOp, QueueState};

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

/// Parses an event payload into `T`, or refuses it with the reason.
fn payload<T: for<'de> Deserialize<'de>>(payload: Map<String, Value>) -> Result<T, Reply> {
    serde_json::from_value(Value::Object(payload))
        .map_err(|e| refuse(&format!("invalid payload: {e}")))
}

/// Answers a join of `topic` (already authorised by [`Topic::route`]).
pub fn join(topic: &Topic, join_payload: &Map<String, Value>, ctx: &ChannelContext<'_>) -> Reply {
    match topic {
        Topic::Echo(..) => Reply::Now(Ok(json!({}))),
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
    }
}
