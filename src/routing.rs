//! Bindings from topics to queues, and routing-key pattern matching.
//!
//! A routing key is a string of words separated by `.`. The empty string has no words; every
//! other key has one word more than it has dots, so `a..b` is the three words `a`, ``, `b`
//! (an empty word is an ordinary word, as in RabbitMQ). In a pattern, the word `*` matches
//! exactly one word (an empty one too) and the word `#` matches zero or more words; `*` or `#`
//! inside a longer word (`a*`) is a literal character.

use std::sync::Arc;

use redb::ReadableTable;

use crate::codec::{self, BindingRecord};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::queue::{self, EnqueueOptions};
use crate::schema::{BINDINGS, QUEUES, TOPICS};
use crate::topic;
use crate::txn::WriteTransaction;

/// The longest routing key or binding pattern, in bytes (as AMQP's shortstr).
pub const MAX_ROUTING_KEY_BYTES: usize = 255;

/// How a header binding combines its headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderMatch {
    /// Every listed header must match (RabbitMQ `x-match: all`).
    All,
    /// At least one listed header must match (RabbitMQ `x-match: any`).
    Any,
}

/// A rule that routes a topic's messages to a queue.
///
/// # Examples
///
/// ```
/// use mqlite::{Binding, HeaderMatch, Message};
/// assert!(Binding::pattern("orders.*.eu").matches(&Message::new("").with_routing_key("orders.new.eu")));
/// assert!(Binding::pattern("orders.#").matches(&Message::new("").with_routing_key("orders")));
/// assert!(Binding::Fanout.matches(&Message::new("")));
/// let h = Binding::Headers { mode: HeaderMatch::Any, headers: vec![("region".into(), Some(b"eu".to_vec()))] };
/// assert!(h.matches(&Message::new("").with_header("region", "eu")));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// The routing key equals this key (a direct exchange).
    Key(String),
    /// Every message (a fanout exchange; the same as the pattern `#`).
    Fanout,
    /// The routing key matches this pattern of words, `*` and `#` (a topic exchange).
    Pattern(String),
    /// The message's headers match (a headers exchange). A header listed with `None` matches
    /// when present with any value; with `Some(v)`, when some header of that name equals `v`.
    Headers {
        /// All or any.
        mode: HeaderMatch,
        /// The headers to look for.
        headers: Vec<(String, Option<Vec<u8>>)>,
    },
}

impl Binding {
    /// A [`Binding::Key`].
    pub fn key(key: impl Into<String>) -> Self {
        Binding::Key(key.into())
    }

    /// A [`Binding::Pattern`].
    pub fn pattern(pattern: impl Into<String>) -> Self {
        Binding::Pattern(pattern.into())
    }

    /// Whether this rule routes `message`.
    pub fn matches(&self, message: &Message) -> bool {
        match self {
            Binding::Key(key) => *key == message.routing_key,
            Binding::Fanout => true,
            Binding::Pattern(pattern) => pattern_matches(pattern, &message.routing_key),
            Binding::Headers { mode, headers } => {
                let hit = |(name, want): &(String, Option<Vec<u8>>)| {
                    message
                        .headers
                        .iter()
                        .any(|(n, v)| n == name && want.as_ref().is_none_or(|w| w == v))
                };
                match mode {
                    HeaderMatch::All => headers.iter().all(hit),
                    HeaderMatch::Any => headers.iter().any(hit),
                }
            }
        }
    }

    fn check(&self) -> Result<()> {
        match self {
            Binding::Key(k) | Binding::Pattern(k) => check_routing_key(k),
            Binding::Fanout => Ok(()),
            Binding::Headers { headers, .. } if headers.is_empty() => Err(Error::InvalidConfig(
                "a header binding needs at least one header".into(),
            )),
            Binding::Headers { headers, .. } => {
                if headers.len() > 64 {
                    return Err(Error::LimitExceeded {
                        limit: "binding header count",
                        value: headers.len() as u64,
                        max: 64,
                    });
                }
                Ok(())
            }
        }
    }
}

/// Checks a routing key or pattern against [`MAX_ROUTING_KEY_BYTES`].
pub(crate) fn check_routing_key(key: &str) -> Result<()> {
    if key.len() > MAX_ROUTING_KEY_BYTES {
        return Err(Error::InvalidRoutingKey {
            key: key.to_owned(),
            rule: "at most 255 bytes",
        });
    }
    Ok(())
}

fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// Whether `key` matches the topic-exchange `pattern`.
///
/// Runs in O(pattern words × key words) time and memory, with no recursion.
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    let p = words(pattern);
    let k = words(key);
    // reach[j]: the first i pattern words can match the first j key words.
    let mut reach = vec![false; k.len() + 1];
    reach[0] = true;
    for word in &p {
        let mut next = vec![false; k.len() + 1];
        match *word {
            "#" => {
                let mut any = false;
                for j in 0..=k.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            "*" => {
                next[1..].copy_from_slice(&reach[..k.len()]);
            }
            literal => {
                for j in 1..=k.len() {
                    next[j] = reach[j - 1] && k[j - 1] == literal;
                }
            }
        }
        reach = next;
    }
    reach[k.len()]
}

/// A topic's bindings, loaded once per transaction.
pub(crate) struct Router {
    bindings: Vec<BindingRecord>,
}

impl Router {
    /// The bindings of the topic `topic_id`, as the transaction holds them: loaded by its first
    /// publish to the topic, and again after anything opened the bindings table (which empties
    /// `WriteTransaction::routers`).
    pub(crate) fn of(txn: &WriteTransaction<'_>, topic_id: u64) -> Result<Arc<Self>> {
        if let Some((_, router)) = txn.routers.lock().iter().find(|(id, _)| *id == topic_id) {
            return Ok(router.clone());
        }
        // Not through `table`, which would empty the routers.
        let table = txn.txn.open_table(BINDINGS)?;
        let mut bindings = Vec::new();
        for entry in table.range((topic_id, 0)..=(topic_id, u64::MAX))? {
            let (_, value) = entry?;
            bindings.push(codec::decode_binding(value.value())?);
        }
        let router = Arc::new(Router { bindings });
        txn.routers.lock().push((topic_id, router.clone()));
        Ok(router)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// The queues `message` goes to: each that at least one binding matches, once.
    fn targets(&self, message: &Message) -> Vec<&str> {
        let mut targets: Vec<&str> = self
            .bindings
            .iter()
            .filter(|b| b.rule.matches(message))
            .map(|b| b.queue.as_str())
            .collect();
        targets.sort_unstable();
        targets.dedup();
        targets
    }

    /// Refuses `messages` the way routing them would (a header that is not a number, a full
    /// queue that rejects publishes), before anything is written: a publish that fails leaves
    /// its transaction as it was, so a caller may handle the error and go on.
    pub(crate) fn check(&self, txn: &WriteTransaction<'_>, messages: &[Message]) -> Result<()> {
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for message in messages {
            let targets = self.targets(message);
            if targets.is_empty() {
                continue;
            }
            EnqueueOptions::from_headers(message)?;
            for queue in targets {
                match counts.iter_mut().find(|(q, _)| *q == queue) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((queue, 1)),
                }
            }
        }
        for (queue, n) in counts {
            queue::check_room(txn, queue, n)?;
        }
        Ok(())
    }

    /// Enqueues `message` once into every queue that at least one binding matches.
    pub(crate) fn route(&self, txn: &WriteTransaction<'_>, message: &Message) -> Result<()> {
        let targets = self.targets(message);
        if targets.is_empty() {
            return Ok(());
        }
        let options = EnqueueOptions::from_headers(message)?;
        for queue in targets {
            queue::enqueue_with(txn, queue, message, options)?;
        }
        Ok(())
    }
}

pub(crate) fn remove_topic_bindings(txn: &WriteTransaction<'_>, topic_id: u64) -> Result<()> {
    txn.table(BINDINGS)?
        .retain_in((topic_id, 0)..=(topic_id, u64::MAX), |_, _| false)?;
    Ok(())
}

/// Removes every binding into `queue`; returns how many.
pub(crate) fn remove_queue_bindings(txn: &WriteTransaction<'_>, queue: &str) -> Result<u64> {
    let mut removed = 0;
    let mut failure = None;
    let mut topics = std::collections::BTreeSet::new();
    txn.table(BINDINGS)?
        .retain(|(topic, _), value| match codec::decode_binding(value) {
            Ok(b) if b.queue == queue => {
                removed += 1;
                topics.insert(topic);
                false
            }
            Ok(_) => true,
            Err(e) => {
                failure.get_or_insert(e);
                true
            }
        })?;
    if let Some(e) = failure {
        return Err(e);
    }
    if !topics.is_empty() {
        let names: Vec<String> = txn
            .table(TOPICS)?
            .iter()?
            .filter_map(|entry| {
                let (name, value) = entry.ok()?;
                let record = codec::decode_topic(value.value()).ok()?;
                topics.contains(&record.id).then(|| name.value().to_owned())
            })
            .collect();
        for name in names {
            recount(txn, &name)?;
        }
    }
    Ok(removed)
}

/// Stores in a topic's record how many bindings it has, so that publishing to a topic with
/// none skips the bindings table.
fn recount(txn: &WriteTransaction<'_>, topic: &str) -> Result<()> {
    let mut topics = txn.table(TOPICS)?;
    let mut record = topic::load(&topics, topic)?;
    let id = record.id;
    let count = txn
        .table(BINDINGS)?
        .range((id, 0)..=(id, u64::MAX))?
        .count();
    record.bindings = Some(u32::try_from(count).unwrap_or(u32::MAX));
    topics.insert(topic, codec::encode_topic(&record).as_slice())?;
    Ok(())
}

/// One binding as listed by [`ReadTransaction::bindings`](crate::ReadTransaction::bindings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindingInfo {
    /// The source topic.
    pub topic: String,
    /// The target queue.
    pub queue: String,
    /// The rule.
    pub rule: Binding,
}

pub(crate) fn list(
    bindings: &impl ReadableTable<(u64, u64), &'static [u8]>,
    topic_name: &str,
    topic_id: u64,
) -> Result<Vec<BindingInfo>> {
    let mut out = Vec::new();
    for entry in bindings.range((topic_id, 0)..=(topic_id, u64::MAX))? {
        let (_, value) = entry?;
        let record = codec::decode_binding(value.value())?;
        out.push(BindingInfo {
            topic: topic_name.to_owned(),
            queue: record.queue,
            rule: record.rule,
        });
    }
    Ok(out)
}

impl WriteTransaction<'_> {
    /// Binds a queue to a topic: from now on, every message published to the topic that
    /// `rule` matches is enqueued in the queue. Binding the same rule twice is a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`], [`Error::UnknownQueue`], [`Error::InvalidRoutingKey`].
    ///
    /// # Examples
    ///
    /// ```
    /// use mqlite::{Binding, Message, QueueConfig, TopicConfig};
    /// let db = mqlite::Database::in_memory()?;
    /// db.write(|txn| {
    ///     txn.create_topic("events", TopicConfig::default())?;
    ///     txn.create_queue("eu-orders", QueueConfig::default())?;
    ///     txn.bind("events", "eu-orders", Binding::pattern("orders.*.eu"))?;
    ///     txn.publish("events", &Message::new("x").with_routing_key("orders.new.eu"))
    /// })?;
    /// assert_eq!(db.read(|r| r.queue_info("eu-orders"))?.ready, 1);
    /// # Ok::<(), mqlite::Error>(())
    /// ```
    pub fn bind(&self, topic: &str, queue: &str, rule: Binding) -> Result<()> {
        rule.check()?;
        let topic_record = topic::load(&self.table(TOPICS)?, topic)?;
        queue::load(&self.table(QUEUES)?, queue)?;
        let mut table = self.table(BINDINGS)?;
        let id = topic_record.id;
        let mut last = 0;
        for entry in table.range((id, 0)..=(id, u64::MAX))? {
            let (key, value) = entry?;
            last = key.value().1 + 1;
            let existing = codec::decode_binding(value.value())?;
            if existing.queue == queue && existing.rule == rule {
                return Ok(());
            }
        }
        let record = BindingRecord {
            queue: queue.to_owned(),
            rule,
        };
        table.insert((id, last), codec::encode_binding(&record).as_slice())?;
        drop(table);
        recount(self, topic)
    }

    /// Removes a binding; returns whether it existed.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownTopic`].
    pub fn unbind(&self, topic: &str, queue: &str, rule: &Binding) -> Result<bool> {
        let topic_record = topic::load(&self.table(TOPICS)?, topic)?;
        let mut table = self.table(BINDINGS)?;
        let id = topic_record.id;
        let mut found = None;
        for entry in table.range((id, 0)..=(id, u64::MAX))? {
            let (key, value) = entry?;
            let existing = codec::decode_binding(value.value())?;
            if existing.queue == queue && existing.rule == *rule {
                found = Some(key.value());
                break;
            }
        }
        let Some(key) = found else {
            return Ok(false);
        };
        table.remove(key)?;
        drop(table);
        recount(self, topic)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::pattern_matches as m;

    #[test]
    fn wildcards_follow_rabbitmq() {
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a.b.c"));
        assert!(m("#", ""));
        assert!(m("#", "a.b"));
        assert!(!m("*", ""));
        assert!(m("*", "a"));
        assert!(!m("a.*", "a"));
        assert!(!m("a.*.c", "a.b.b.c"));
        assert!(m("#.c", "c"));
        assert!(m("a.#.c", "a.c"));
        assert!(m("a.#.c", "a.x.y.c"));
        assert!(m("#.#", ""));
        assert!(m("a.*", "a."), "an empty word is a word");
        assert!(m("a..b", "a..b"));
        assert!(!m("a.b", "a..b"));
        assert!(!m("a*", "ab"), "a star inside a word is literal");
        assert!(m("a*", "a*"));
    }
}
