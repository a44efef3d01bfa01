//! Topics a socket may join, and who may join them.
//!
//! A topic string maps to a typed [`Topic`]; the connection dispatches joins, client events
//! and server broadcasts on it. The queue and presence topics plug in here as variants.

use std::fmt;

use crate::auth::Identity;
use crate::domain::UserId;

/// A joinable topic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `echo:{user_id}` or `echo:{user_id}:{label}`: diagnostic channels across the user's
    /// own devices. `ping` is answered with its payload; `broadcast {event, payload}` is pushed
    /// to every socket of the user joined to the same topic, on every replica.
    Echo(UserId, Option<String>),
    /// `queue:{user_id}`: the user's play queue; `queue_changed` after every write.
    Queue(UserId),
    /// `devices:{user_id}`: the user's devices' presence, the output device, commands.
    Devices(UserId),
    /// `friends:{user_id}`: the presence of the users this user follows.
    Friends(UserId),
}

/// Longest label of an `echo:{user_id}:{label}` topic.
const LABEL_MAX: usize = 64;

/// Why a join was refused; the text is the `reason` the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// No such topic.
    Unmatched,
    /// A topic of another user.
    Unauthorized,
}

impl JoinRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unmatched => "unmatched topic",
            Self::Unauthorized => "unauthorized",
        }
    }
}

impl Topic {
    /// Parses `name` and checks that `identity` may join it.
    pub fn route(name: &str, identity: &Identity) -> Result<Self, JoinRefusal> {
        let (kind, rest) = name.split_once(':').ok_or(JoinRefusal::Unmatched)?;
        let (owner, label) = match rest.split_once(':') {
            Some((owner, label)) => (owner, Some(label)),
            None => (rest, None),
        };
        // Only the canonical spelling of an id (`queue:1`, not `queue:01` or `queue:+1`):
        // pushes go to the canonical topic name, so an alias would join and never hear them.
        let owner: i64 = owner
            .parse()
            .ok()
            .filter(|id: &i64| id.to_string() == owner)
            .ok_or(JoinRefusal::Unmatched)?;
        let label_ok = label.is_none_or(|l| {
            !l.is_empty()
                && l.len() <= LABEL_MAX
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        });
        let topic = match (kind, label) {
            ("echo", _) if label_ok => Topic::Echo(UserId(owner), label.map(str::to_owned)),
            ("queue", None) => Topic::Queue(UserId(owner)),
            ("devices", None) => Topic::Devices(UserId(owner)),
            ("friends", None) => Topic::Friends(UserId(owner)),
            _ => return Err(JoinRefusal::Unmatched),
        };
        if topic.user() == identity.user_id {
            Ok(topic)
        } else {
            Err(JoinRefusal::Unauthorized)
        }
    }

    /// The user whose broadcasts this topic receives.
    pub fn user(&self) -> UserId {
        match self {
            Self::Echo(user, _) | Self::Queue(user) | Self::Devices(user) | Self::Friends(user) => {
                *user
            }
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echo(user, None) => write!(f, "echo:{user}"),
            Self::Echo(user, Some(label)) => write!(f, "echo:{user}:{label}"),
            Self::Queue(user) => write!(f, "queue:{user}"),
            Self::Devices(user) => write!(f, "devices:{user}"),
            Self::Friends(user) => write!(f, "friends:{user}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    #[test]
    fn only_the_canonical_spelling_of_an_id_is_a_topic() {
        for alias in [
            "queue:042",
            "queue:+42",
            "devices:0042",
            "echo:+42:x",
            "queue: 42",
        ] {
            assert!(
                matches!(Topic::route(alias, &alice()), Err(JoinRefusal::Unmatched)),
                "{alias}"
            );
        }
        assert!(Topic::route("queue:42", &alice()).is_ok());
    }

    fn alice() -> Identity {
        Identity {
            user_id: UserId(42),
            device_id: DeviceId::generate(),
            session: "s".into(),
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn a_user_may_join_their_own_echo_topic() {
        assert_eq!(
            Topic::route("echo:42", &alice()),
            Ok(Topic::Echo(UserId(42), None))
        );
        assert_eq!(Topic::Echo(UserId(42), None).to_string(), "echo:42");
        let labelled = Topic::route("echo:42:room-1", &alice());
        assert_eq!(
            labelled.map(|t| t.to_string()),
            Ok("echo:42:room-1".to_owned())
        );
    }

    #[test]
    fn presence_topics_route_for_their_owner_only() {
        assert_eq!(
            Topic::route("devices:42", &alice()),
            Ok(Topic::Devices(UserId(42)))
        );
        assert_eq!(
            Topic::route("friends:42", &alice()),
            Ok(Topic::Friends(UserId(42)))
        );
        assert_eq!(
            Topic::route("friends:43", &alice()),
            Err(JoinRefusal::Unauthorized)
        );
        assert_eq!(
            Topic::route("devices:42:x", &alice()),
            Err(JoinRefusal::Unmatched)
        );
    }

    #[test]
    fn another_users_topic_is_unauthorized() {
        assert_eq!(
            Topic::route("echo:43", &alice()),
            Err(JoinRefusal::Unauthorized)
        );
    }

    #[test]
    fn unknown_topics_are_unmatched() {
        for name in [
            "nowhere:1",
            "echo",
            "echo:x",
            "echo:",
            "phoenix",
            "echo:42:",
            "echo:42:a b",
        ] {
            assert_eq!(
                Topic::route(name, &alice()),
                Err(JoinRefusal::Unmatched),
                "{name}"
            );
        }
    }
}
