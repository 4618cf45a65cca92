//! A message's payload bytes, owned alone or shared with the messages read with it.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

/// The payload of a [`Message`](crate::Message): bytes that dereference to `[u8]`.
///
/// A payload the application builds owns its bytes (a `Vec<u8>` inside, moved in without a
/// copy). A payload read from a topic, or received from a queue's FIFO lane, points into one
/// copy of the record batch it was stored in, shared by the messages of that read: a read of a
/// thousand messages makes about eight allocations instead of a thousand. Such a payload keeps
/// the rest of its batch from the first message the read returned (at most one record batch,
/// about 16 KiB) in memory while any payload of it lives; [`Payload::into_vec`] gives bytes of
/// their own.
///
/// Cloning is cheap for shared payloads (a reference count) and copies owned ones. Payloads
/// compare, order, hash and print as their bytes, and compare equal to byte slices, arrays and vectors
/// holding the same bytes.
///
/// # Examples
///
/// ```
/// use mqlite::{Message, Payload};
/// let msg = Message::new("hello");
/// assert_eq!(msg.payload, b"hello");
/// assert_eq!(msg.payload.len(), 5);
/// assert_eq!(&msg.payload[..4], b"hell");
/// let bytes: Vec<u8> = msg.payload.into_vec();
/// assert_eq!(Payload::from(bytes), *b"hello");
/// ```
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    Owned(Vec<u8>),
    /// `buf[start..end]`; both bounds were checked against `buf` when the payload was made.
    Shared {
        buf: Arc<[u8]>,
        start: usize,
        end: usize,
    },
}

impl Payload {
    /// An empty payload.
    pub const fn new() -> Self {
        Payload(Repr::Owned(Vec::new()))
    }

    /// `buf[start..end]`, sharing `buf`; `None` when the range is not inside it.
    pub(crate) fn shared(buf: &Arc<[u8]>, start: usize, end: usize) -> Option<Self> {
        let mut payload = Payload::new();
        payload.set_shared(buf, start, end).then_some(payload)
    }

    /// Makes this payload `buf[start..end]`, sharing `buf`; false, with nothing changed, when
    /// the range is not inside it. A reader fills a payload already in its place this way,
    /// rather than moving a new one in (see `topic::Records`).
    #[inline]
    pub(crate) fn set_shared(&mut self, buf: &Arc<[u8]>, start: usize, end: usize) -> bool {
        if start > end || end > buf.len() {
            return false;
        }
        self.0 = Repr::Shared {
            buf: Arc::clone(buf),
            start,
            end,
        };
        true
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Owned(v) => v,
            Repr::Shared { buf, start, end } => buf.get(*start..*end).unwrap_or_default(),
        }
    }

    /// The bytes as a vector of their own: no copy for an owned payload, a copy of just these
    /// bytes for a shared one.
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Owned(v) => v,
            Repr::Shared { .. } => self.as_slice().to_vec(),
        }
    }

    /// Whether the payload shares a buffer with other messages (it was read from a record
    /// batch), rather than owning its bytes.
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Repr::Shared { .. })
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::new()
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Borrow<[u8]> for Payload {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}

impl Hash for Payload {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl PartialOrd for Payload {
    fn partial_cmp(&self, other: &Payload) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Payload {
    fn cmp(&self, other: &Payload) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload(Repr::Owned(bytes))
    }
}

impl From<&[u8]> for Payload {
    fn from(bytes: &[u8]) -> Self {
        Payload(Repr::Owned(bytes.to_vec()))
    }
}

impl<const N: usize> From<[u8; N]> for Payload {
    fn from(bytes: [u8; N]) -> Self {
        Payload(Repr::Owned(bytes.to_vec()))
    }
}

impl<const N: usize> From<&[u8; N]> for Payload {
    fn from(bytes: &[u8; N]) -> Self {
        Payload(Repr::Owned(bytes.to_vec()))
    }
}

impl From<String> for Payload {
    fn from(text: String) -> Self {
        Payload(Repr::Owned(text.into_bytes()))
    }
}

impl From<&str> for Payload {
    fn from(text: &str) -> Self {
        Payload(Repr::Owned(text.as_bytes().to_vec()))
    }
}

impl From<Payload> for Vec<u8> {
    fn from(payload: Payload) -> Self {
        payload.into_vec()
    }
}

/// Equality with the byte containers a test or a caller compares with, both ways round.
macro_rules! eq_bytes {
    ($([$($params:tt)*] $other:ty),* $(,)?) => {$(
        impl<$($params)*> PartialEq<$other> for Payload {
            fn eq(&self, other: &$other) -> bool {
                self.as_slice() == &other[..]
            }
        }

        impl<$($params)*> PartialEq<Payload> for $other {
            fn eq(&self, other: &Payload) -> bool {
                &self[..] == other.as_slice()
            }
        }
    )*};
}

eq_bytes! {
    [] [u8],
    [] &[u8],
    [] Vec<u8>,
    [const N: usize] [u8; N],
    [const N: usize] &[u8; N],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_owned_payloads_are_their_bytes() {
        let buf: Arc<[u8]> = Arc::from(&b"..hello.."[..]);
        let shared = Payload::shared(&buf, 2, 7).expect("in range");
        let owned = Payload::from("hello");
        assert!(shared.is_shared() && !owned.is_shared());
        assert_eq!(shared, owned);
        assert_eq!(shared, b"hello");
        assert_eq!(b"hello".to_vec(), shared);
        assert_eq!(format!("{shared:?}"), format!("{:?}", b"hello".to_vec()));
        assert_eq!(shared.clone().into_vec(), b"hello");
        assert!(Payload::shared(&buf, 7, 2).is_none());
        assert!(Payload::shared(&buf, 2, 10).is_none());
        assert_eq!(Payload::shared(&buf, 9, 9).expect("empty").len(), 0);
    }
}
