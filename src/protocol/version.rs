//! Runner protocol version negotiation for `GET /runners/connect?protocol_version=N`.
//!
//! Pure function of the query parameter; never touches a socket. The error's `Display` text is
//! meant to be sent as an HTTP 400 body, so it must name the supported versions and must not
//! echo unbounded client input.

use std::fmt;

/// Protocol versions this gateway speaks.
pub const SUPPORTED_VERSIONS: &[u16] = &[7];

/// Why a `protocol_version` query parameter was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionError {
    /// The parameter is absent.
    Missing,
    /// The parameter is not a decimal u16.
    Invalid,
    /// A well-formed version this gateway does not speak.
    Unsupported(u16),
}

fn write_supported(f: &mut fmt::Formatter<'_>) -> fmt::Result {
    f.write_str("supported versions: ")?;
    for (i, v) in SUPPORTED_VERSIONS.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{v}")?;
    }
    Ok(())
}

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionError::Missing => f.write_str("missing protocol_version; ")?,
            VersionError::Invalid => f.write_str("invalid protocol_version; ")?,
            VersionError::Unsupported(v) => write!(f, "unsupported protocol_version {v}; ")?,
        }
        write_supported(f)
    }
}

impl std::error::Error for VersionError {}

/// Pick the protocol version from the (already percent-decoded) `protocol_version` query
/// parameter value.
pub fn negotiate(param: Option<&str>) -> Result<u16, VersionError> {
    let raw = param.ok_or(VersionError::Missing)?;
    // Strict decimal: no sign, no whitespace, bounded length (u16::from_str accepts '+').
    if raw.is_empty() || raw.len() > 5 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VersionError::Invalid);
    }
    let v: u16 = raw.parse().map_err(|_| VersionError::Invalid)?;
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(v)
    } else {
        Err(VersionError::Unsupported(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_seven() {
        assert_eq!(negotiate(Some("7")), Ok(7));
    }

    #[test]
    fn refuses_others_naming_supported() {
        for (input, want) in [
            (None, VersionError::Missing),
            (Some(""), VersionError::Invalid),
            (Some("+7"), VersionError::Invalid),
            (Some(" 7"), VersionError::Invalid),
            (Some("7.0"), VersionError::Invalid),
            (Some("x"), VersionError::Invalid),
            (Some("65536"), VersionError::Invalid),
            (Some("999999999999"), VersionError::Invalid),
            (Some("6"), VersionError::Unsupported(6)),
            (Some("8"), VersionError::Unsupported(8)),
        ] {
            let err = negotiate(input).unwrap_err();
            assert_eq!(err, want, "{input:?}");
            let text = err.to_string();
            assert!(text.contains("supported versions: 7"), "{text}");
        }
    }

    #[test]
    fn leading_zeros_are_decimal() {
        assert_eq!(negotiate(Some("07")), Ok(7));
    }
}
