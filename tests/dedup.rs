//! Guards the idempotency table: the same message id handled twice has one effect, a failed
//! transaction records neither the effect nor the mark, and after its TTL an id is forgotten.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first error")]

use mqlite::redb::{ReadableTable, TableDefinition};
use mqlite::{Database, Dedup, Error, ManualClock, MessageId};

const BALANCE: TableDefinition<&str, i64> = TableDefinition::new("balance");

fn apply(db: &Database, id: MessageId, fail: bool) -> Result<Dedup, Error> {
    db.write(|txn| {
        let seen = txn.dedup("payments", id, 60_000)?;
        if seen == Dedup::New {
            let mut t = txn.open_table(BALANCE)?;
            let now = t.get("acct")?.map_or(0, |v| v.value());
            t.insert("acct", now - 10)?;
        }
        if fail {
            return Err(Error::InvalidConfig("crash before commit".into()));
        }
        Ok(seen)
    })
}

fn balance(db: &Database) -> i64 {
    db.read(|r| Ok::<_, Error>(r.open_table(BALANCE)?.get("acct")?.map_or(0, |v| v.value())))
        .unwrap()
}

#[test]
fn the_same_message_twice_has_one_effect_and_is_forgotten_after_its_ttl() {
    let clock = ManualClock::new(1_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    let id = MessageId::generate();
    assert!(apply(&db, id, true).is_err());
    assert_eq!(
        db.dedup_len().unwrap(),
        0,
        "a failed transaction records no mark"
    );
    assert_eq!(apply(&db, id, false).unwrap(), Dedup::New);
    assert_eq!(apply(&db, id, false).unwrap(), Dedup::Seen);
    assert_eq!(balance(&db), -10, "one effect");
    clock.advance_ms(59_999);
    assert_eq!(apply(&db, id, false).unwrap(), Dedup::Seen);
    clock.advance_ms(1);
    assert_eq!(db.expire_dedup().unwrap(), 1);
    assert_eq!(db.dedup_len().unwrap(), 0);
    assert_eq!(
        apply(&db, id, false).unwrap(),
        Dedup::New,
        "forgotten after the TTL"
    );
    let err = db.write(|txn| txn.dedup("bad scope", id, 1)).unwrap_err();
    assert!(matches!(err, Error::InvalidName { kind: "scope", .. }));
}

#[test]
fn expiry_runs_in_bounded_batches() {
    let clock = ManualClock::new(1_000);
    let db = Database::builder()
        .clock(clock.clone())
        .open_in_memory()
        .unwrap();
    db.write(|txn| {
        for i in 0..3000u128 {
            txn.dedup("s", MessageId(i), 10)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    clock.advance_ms(10);
    assert_eq!(db.expire_dedup().unwrap(), 3000);
    assert_eq!(db.dedup_len().unwrap(), 0);
}
