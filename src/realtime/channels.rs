//! The channel layer: what each [`Topic`] does on join and with client events. A handler
//! answers with a [`Reply`]: `Ok(response)` or `Err(response)` becomes the `phx_reply`'s
//! `status` and `response`. Server broadcasts reach joined sockets through the user's
//! session, whatever the topic.

use actix::Addr;
use serde_json::{Map, Value, json};

use super::events::UserEvent;
use super::hub::{Hub, Publish};
use super::topics::Topic;
use crate::auth::Identity;
use crate::domain::DeviceId;

/// A reply's `response`, for `status: "ok"` or `status: "error"`.
pub type Reply = Result<Value, Value>;

/// What a handler may use.
pub struct ChannelContext<'a> {
    pub identity: &'a Identity,
    /// The device this socket speaks for.
    pub device: &'a DeviceId,
    pub hub: &'a Addr<Hub>,
}

fn refuse(reason: &str) -> Reply {
    Err(json!({ "reason": reason }))
}

/// Answers a join of `topic` (already authorised by [`Topic::route`]).
pub fn join(topic: &Topic, _payload: &Map<String, Value>, _ctx: &ChannelContext<'_>) -> Reply {
    match topic {
        Topic::Echo(..) => Ok(json!({})),
    }
}

/// Answers a client event on a joined `topic`.
pub fn handle_in(
    topic: &Topic,
    event: &str,
    payload: Map<String, Value>,
    ctx: &ChannelContext<'_>,
) -> Reply {
    match topic {
        Topic::Echo(user, _) => match event {
            "ping" => Ok(Value::Object(payload)),
            "broadcast" => {
                let Some(Value::String(name)) = payload.get("event") else {
                    return refuse("broadcast needs an event name");
                };
                if name.is_empty() || name.len() > 64 || name.starts_with("phx_") {
                    return refuse("event names are 1 to 64 characters and do not start with phx_");
                }
                let body = match payload.get("payload") {
                    Some(Value::Object(body)) => Value::Object(body.clone()),
                    None => json!({}),
                    Some(_) => return refuse("payload must be an object"),
                };
                ctx.hub.do_send(Publish {
                    user: *user,
                    event: UserEvent::Push {
                        topic: topic.to_string(),
                        event: name.clone(),
                        payload: body,
                    },
                });
                Ok(json!({}))
            }
            _ => refuse("unknown event"),
        },
    }
}
