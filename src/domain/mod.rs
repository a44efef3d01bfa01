//! Values parsed once at the edge and valid from then on: ids, handles, passwords and
//! catalog entries. Each `parse` returns a sentence a client can be shown.

mod device;
mod handle;
mod ids;
pub mod queue;

pub use device::Device;
pub use handle::{DisplayName, Handle, Password};
pub use ids::{DeviceId, DeviceKind, TrackId, UserId};

/// Why a value from a client was refused; `field` names the input at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidInput {
    /// The field of the request, e.g. `handle`.
    pub field: &'static str,
    /// One sentence saying what is wrong.
    pub problem: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// Checks a free-text value: trimmed length within `min..=max` characters and no control
/// characters. Returns the trimmed text.
pub(crate) fn parse_text(
    field: &'static str,
    raw: &str,
    min: usize,
    max: usize,
) -> Result<String, InvalidInput> {
    let text = raw.trim();
    let length = text.chars().count();
    if length < min || length > max {
        return Err(InvalidInput::new(
            field,
            format!("must be {min} to {max} characters long"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(text.to_owned())
}
