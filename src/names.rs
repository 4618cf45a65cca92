//! The naming rule for topics, queues, groups and dedup scopes.

use crate::error::{Error, Result};

/// The longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

const RULE: &str = "1 to 128 characters from A-Z a-z 0-9 . _ - (not starting with '.' or '-')";

/// Checks a topic, queue, group or scope name: 1 to [`MAX_NAME_BYTES`] ASCII letters, digits,
/// `.`, `_` or `-`, not starting with `.` or `-`.
pub(crate) fn check(kind: &'static str, name: &str) -> Result<()> {
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_BYTES
        && bytes.iter().all(|&c| ok_char(c))
        && !matches!(bytes[0], b'.' | b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            kind,
            name: name.to_owned(),
            rule: RULE,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn the_rule() {
        for good in ["a", "orders", "orders.v2", "a_b-c", "X9", &"x".repeat(128)] {
            assert!(check("topic", good).is_ok(), "{good}");
        }
        for bad in ["", ".a", "-a", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(check("topic", bad).is_err(), "{bad}");
        }
    }
}
