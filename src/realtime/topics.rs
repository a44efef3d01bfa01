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
    /// `echo:{user_id}`: a diagnostic channel across the user's own devices. `ping` is
    /// answered with its payload; `broadcast {event, payload}` is pushed to every socket of
    /// the user joined to it, on every replica.
    Echo(UserId),
}

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
        let owner = || -> Result<UserId, JoinRefusal> {
            let id: i64 = rest.parse().map_err(|_| JoinRefusal::Unmatched)?;
            if id == identity.user_id.0 { Ok(UserId(id)) } else { Err(JoinRefusal::Unauthorized) }
        };
        match kind {
            "echo" => owner().map(Topic::Echo),
            _ => Err(JoinRefusal::Unmatched),
        }
    }

    /// The user whose broadcasts this topic receives.
    pub fn user(&self) -> UserId {
        match self {
            Self::Echo(user) => *user,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Echo(user) => write!(f, "echo:{user}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    fn alice() -> Identity {
        Identity { user_id: UserId(42), device_id: DeviceId::generate(), session: "s".into() }
    }

    #[test]
    fn a_user_may_join_their_own_echo_topic() {
        assert_eq!(Topic::route("echo:42", &alice()), Ok(Topic::Echo(UserId(42))));
        assert_eq!(Topic::Echo(UserId(42)).to_string(), "echo:42");
    }

    #[test]
    fn another_users_topic_is_unauthorized() {
        assert_eq!(Topic::route("echo:43", &alice()), Err(JoinRefusal::Unauthorized));
    }

    #[test]
    fn unknown_topics_are_unmatched() {
        for name in ["nowhere:1", "echo", "echo:x", "echo:", "phoenix"] {
            assert_eq!(Topic::route(name, &alice()), Err(JoinRefusal::Unmatched), "{name}");
        }
    }
}
