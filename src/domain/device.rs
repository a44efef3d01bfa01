//! A device as a client describes it when it signs in or connects.

use super::{DeviceId, DeviceKind, DisplayName, InvalidInput};

/// The device a login or a socket speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
    pub kind: DeviceKind,
}

impl Device {
    /// Parses the optional `device_id`, `device_name` and `device_kind` a client sent: a
    /// missing id is generated, a missing kind is `other`, a missing name is made from the kind.
    pub fn parse(
        id: Option<&str>,
        name: Option<&str>,
        kind: Option<&str>,
    ) -> Result<Self, InvalidInput> {
        let id = id
            .map(DeviceId::parse)
            .transpose()?
            .unwrap_or_else(DeviceId::generate);
        let kind = kind.map(DeviceKind::parse).transpose()?.unwrap_or_default();
        let name = match name {
            Some(name) => DisplayName::parse(name)
                .map_err(|e| InvalidInput::new("device_name", e.problem))?
                .as_str()
                .to_owned(),
            None => format!("{} device", kind.as_str()),
        };
        Ok(Self { id, name, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_device_gets_an_id_and_a_name_from_its_kind() {
        let device = Device::parse(None, None, Some("phone")).unwrap();
        assert_eq!(device.name, "phone device");
        assert_eq!(device.kind, DeviceKind::Phone);
        assert!(DeviceId::parse(device.id.as_str()).is_ok());
    }

    #[test]
    fn bad_device_fields_name_the_field() {
        assert_eq!(
            Device::parse(Some("a b"), None, None).unwrap_err().field,
            "device_id"
        );
        assert_eq!(
            Device::parse(None, Some(""), None).unwrap_err().field,
            "device_name"
        );
        assert_eq!(
            Device::parse(None, None, Some("toaster"))
                .unwrap_err()
                .field,
            "device_kind"
        );
    }
}
