//! Account names and passwords as accepted at registration.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use super::{InvalidInput, parse_text};

const HANDLE_MIN: usize = 3;
const HANDLE_MAX: usize = 30;
const PASSWORD_MIN: usize = 8;
/// Upper bound so a megabyte "password" cannot make the hasher do needless work.
const PASSWORD_MAX: usize = 1024;
const DISPLAY_NAME_MAX: usize = 64;

/// A user's public name: 3 to 30 of `a-z`, `0-9`, `_`, `-`, `.`, starting with a letter or
/// digit. Handles are case-insensitive and kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Handle(String);

impl Handle {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let handle = raw.trim().to_ascii_lowercase();
        let length_ok = (HANDLE_MIN..=HANDLE_MAX).contains(&handle.len());
        let chars_ok = handle
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c));
        let starts_ok = handle
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if length_ok && chars_ok && starts_ok {
            Ok(Self(handle))
        } else {
            Err(InvalidInput::new(
                "handle",
                format!(
                    "must be {HANDLE_MIN} to {HANDLE_MAX} letters, digits, '_', '-' or '.', \
                     starting with a letter or digit"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name shown to other people; defaults to the handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        parse_text("display_name", raw, 1, DISPLAY_NAME_MAX).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password as typed, never printed.
pub struct Password(SecretString);

impl Password {
    /// Accepts 8 to 1024 characters. Nothing else is required: length is what matters.
    pub fn parse(raw: String) -> Result<Self, InvalidInput> {
        let length = raw.chars().count();
        if (PASSWORD_MIN..=PASSWORD_MAX).contains(&length) {
            Ok(Self(raw.into()))
        } else {
            Err(InvalidInput::new(
                "password",
                format!("must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long"),
            ))
        }
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_kept_in_lower_case() {
        assert_eq!(
            Handle::parse("  Alice_99 ").map(|h| h.0),
            Ok("alice_99".to_owned())
        );
    }

    #[test]
    fn a_handle_with_spaces_is_rejected() {
        assert!(Handle::parse("al ice").is_err());
    }

    #[test]
    fn handles_outside_the_length_bounds_are_rejected() {
        assert!(Handle::parse("ab").is_err());
        assert!(Handle::parse(&"a".repeat(31)).is_err());
        assert!(Handle::parse(&"a".repeat(30)).is_ok());
    }

    #[test]
    fn a_handle_must_start_with_a_letter_or_digit() {
        assert!(Handle::parse(".alice").is_err());
        assert!(Handle::parse("_alice").is_err());
    }

    #[test]
    fn non_ascii_handles_are_rejected() {
        assert!(Handle::parse("zoë").is_err());
    }

    #[test]
    fn short_and_huge_passwords_are_rejected() {
        assert!(Password::parse("short".into()).is_err());
        assert!(Password::parse("x".repeat(1025)).is_err());
        assert!(Password::parse("correct horse".into()).is_ok());
    }

    #[test]
    fn passwords_do_not_print() {
        let password = Password::parse("correct horse battery".into());
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn display_names_reject_control_characters() {
        assert!(DisplayName::parse("Alice\u{0007}").is_err());
        assert!(DisplayName::parse("Alice Liddell").is_ok());
    }
}
