//! Phoenix Channels V2 JSON frames: `[join_ref, ref, topic, event, payload]`.
//!
//! This layer turns text into [`Frame`]s and back and knows nothing of what events mean.

use bytestring::ByteString;
use serde_json::{Map, Value};

/// One decoded frame from a client.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The `ref` of the join that opened the channel this frame belongs to.
    pub join_ref: Option<String>,
    /// The client's per-socket counter, echoed in the reply.
    pub reference: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Map<String, Value>,
}

/// Why a text frame is not a Phoenix frame. Where the refs and topic could still be read, they
/// are kept so the client can be answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: Option<String>,
    pub reason: &'static str,
}

/// Longest accepted topic or event name.
const NAME_MAX: usize = 256;

/// Decodes a text frame.
pub fn decode(text: &str) -> Result<Frame, Malformed> {
    let malformed = |reason| Malformed {
        join_ref: None,
        reference: None,
        topic: None,
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|_| malformed("invalid JSON"))?;
    let Value::Array(items) = value else {
        return Err(malformed("a frame must be a JSON array"));
    };
    let mut items = items.into_iter();
    let (join_ref, reference, topic, event, payload) = match (
        items.next(),
        items.next(),
        items.next(),
        items.next(),
        items.next(),
        items.next(),
    ) {
        (Some(a), Some(b), Some(c), Some(d), Some(e), None) => (a, b, c, d, e),
        _ => return Err(malformed("a frame must have exactly 5 elements")),
    };
    let join_ref =
        reference_of(join_ref).ok_or_else(|| malformed("join_ref must be a string or null"))?;
    let reference =
        reference_of(reference).ok_or_else(|| malformed("ref must be a string or null"))?;
    let with_refs = |topic: Option<String>, reason| Malformed {
        join_ref: join_ref.clone(),
        reference: reference.clone(),
        topic,
        reason,
    };
    let topic = match topic {
        Value::String(t) if !t.is_empty() && t.len() <= NAME_MAX => t,
        _ => return Err(with_refs(None, "topic must be a non-empty string")),
    };
    let event = match event {
        Value::String(e) if !e.is_empty() && e.len() <= NAME_MAX => e,
        _ => return Err(with_refs(Some(topic), "event must be a non-empty string")),
    };
    let Value::Object(payload) = payload else {
        return Err(with_refs(Some(topic), "payload must be an object"));
    };
    Ok(Frame {
        join_ref,
        reference,
        topic,
        event,
        payload,
    })
}

/// Refs are strings; the JS client always sends strings, some ports send numbers.
fn reference_of(value: Value) -> Option<Option<String>> {
    match value {
        Value::Null => Some(None),
        Value::String(s) if s.len() <= NAME_MAX => Some(Some(s)),
        Value::Number(n) => Some(Some(n.to_string())),
        _ => None,
    }
}

/// Encodes a frame for a client.
pub fn encode(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Value,
) -> ByteString {
    let frame = (join_ref, reference, topic, event, payload);
    // Serialising plain strings and a `Value` cannot fail.
    ByteString::from(serde_json::to_string(&frame).unwrap_or_default())
}

/// A broadcast frame (`[null, null, topic, event, payload]`) around a payload already
/// serialised, so one payload sent on many topics is serialised once.
pub fn broadcast_raw(topic: &str, event: &str, payload_json: &str) -> ByteString {
    let head = serde_json::to_string(&(topic, event)).unwrap_or_default();
    // `head` is `["topic","event"]`: splice the payload in before its closing bracket.
    let head = head.strip_suffix(']').unwrap_or(&head);
    let mut text = String::with_capacity(head.len() + payload_json.len() + 14);
    text.push_str("[null,null,");
    text.push_str(head.strip_prefix('[').unwrap_or(head));
    text.push(',');
    text.push_str(payload_json);
    text.push(']');
    ByteString::from(text)
}

/// A `phx_reply` frame.
pub fn reply(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    ok: bool,
    response: Value,
) -> ByteString {
    let status = if ok { "ok" } else { "error" };
    encode(
        join_ref,
        reference,
        topic,
        "phx_reply",
        &serde_json::json!({"status": status, "response": response}),
    )
}

/// An error reply carrying `{"reason": ...}`.
pub fn error_reply(
    join_ref: Option<&str>,
    reference: Option<&str>,
    topic: &str,
    reason: &str,
) -> ByteString {
    reply(
        join_ref,
        reference,
        topic,
        false,
        serde_json::json!({ "reason": reason }),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_join_frame_decodes() {
        let frame = decode(r#"["3","3","queue:42","phx_join",{"revision":7}]"#).unwrap();
        assert_eq!(frame.join_ref.as_deref(), Some("3"));
        assert_eq!(frame.reference.as_deref(), Some("3"));
        assert_eq!(frame.topic, "queue:42");
        assert_eq!(frame.event, "phx_join");
        assert_eq!(frame.payload.get("revision"), Some(&json!(7)));
    }

    #[test]
    fn a_heartbeat_has_no_join_ref() {
        let frame = decode(r#"[null,"5","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(frame.join_ref, None);
    }

    #[test]
    fn non_json_and_wrong_shapes_are_malformed() {
        assert_eq!(decode("hello").unwrap_err().reason, "invalid JSON");
        assert_eq!(
            decode(r#"{"a":1}"#).unwrap_err().reason,
            "a frame must be a JSON array"
        );
        assert!(decode(r#"[null,"1","t","e"]"#).is_err());
        assert!(decode(r#"[null,"1","t","e",{},6]"#).is_err());
        assert!(decode(r#"[{},"1","t","e",{}]"#).is_err());
    }

    #[test]
    fn a_frame_with_readable_refs_keeps_them_for_the_error_reply() {
        let error = decode(r#"["1","2","room:1","ev",[1,2]]"#).unwrap_err();
        assert_eq!(error.reference.as_deref(), Some("2"));
        assert_eq!(error.topic.as_deref(), Some("room:1"));
        assert_eq!(error.reason, "payload must be an object");
    }

    #[test]
    fn replies_encode_as_phoenix_expects() {
        let text = reply(
            Some("3"),
            Some("4"),
            "queue:42",
            true,
            json!({"revision": 8}),
        );
        assert_eq!(
            &*text,
            r#"["3","4","queue:42","phx_reply",{"response":{"revision":8},"status":"ok"}]"#
        );
        let push = encode(None, None, "echo:1", "said", &json!({}));
        assert_eq!(&*push, r#"[null,null,"echo:1","said",{}]"#);
    }

    #[test]
    fn a_raw_broadcast_is_the_same_frame_as_an_encoded_one() {
        let payload = serde_json::json!({"joins": {"a\"b": {"metas": []}}, "leaves": {}});
        let raw = broadcast_raw("friends:7", "presence_diff", &payload.to_string());
        let encoded = encode(None, None, "friends:7", "presence_diff", &payload);
        assert_eq!(raw, encoded);
    }
}
