//! Pure sequence logic, kept free of I/O so it can be property-tested.
//!
//! - [`accept_in_order`]: the idempotent inbox append. A conversation re-sends freely
//!   (at-least-once); the inbox takes each seq exactly once and in order.
//! - [`Reorder`]: a session's emitter. Events may reach a session out of `inbox_seq`
//!   order (replay pages and live pushes race); the client sees them strictly in order,
//!   each once.

use std::collections::BTreeMap;

/// Given the highest seq already taken (`head`) and an ascending batch of seqs, returns
/// how many of the batch's leading items to skip (already taken) and how many to take
/// (the run that continues `head` without a gap). Items past a gap are left for a
/// re-send, which the conversation makes from the head the inbox reports.
pub fn accept_in_order(head: u64, seqs: &[u64]) -> (usize, usize) {
    let skip = seqs.iter().take_while(|&&s| s <= head).count();
    let mut next = head + 1;
    let take = seqs[skip..]
        .iter()
        .take_while(|&&s| {
            let ok = s == next;
            next += 1;
            ok
        })
        .count();
    (skip, take)
}

/// Emits items in strict sequence order from a cursor, holding early arrivals.
#[derive(Debug)]
pub struct Reorder<T> {
    cursor: u64,
    held: BTreeMap<u64, T>,
    max_held: usize,
}

/// The reorder buffer overflowed: the session must resync.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

impl<T> Reorder<T> {
    /// Starts after `cursor` (the last seq the client has), holding at most `max_held`.
    pub fn new(cursor: u64, max_held: usize) -> Self {
        Reorder {
            cursor,
            held: BTreeMap::new(),
            max_held,
        }
    }

    /// The last seq emitted.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Moves the cursor forward (never back), dropping held items it passes; returns
    /// the held items that are now next in line.
    pub fn advance_to(&mut self, cursor: u64) -> Vec<(u64, T)> {
        if cursor > self.cursor {
            self.cursor = cursor;
            self.held = self.held.split_off(&(cursor + 1));
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<(u64, T)> {
        let mut ready = Vec::new();
        while let Some(item) = self.held.remove(&(self.cursor + 1)) {
            self.cursor += 1;
            ready.push((self.cursor, item));
        }
        ready
    }

    /// Offers an item; returns the items now ready, in order. Duplicates are dropped.
    pub fn offer(&mut self, seq: u64, item: T) -> Result<Vec<(u64, T)>, Overflow> {
        if seq <= self.cursor {
            return Ok(Vec::new());
        }
        self.held.insert(seq, item);
        if self.held.len() > self.max_held {
            return Err(Overflow);
        }
        Ok(self.drain())
    }

    /// Items held beyond a gap.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accept_examples() {
        assert_eq!(accept_in_order(0, &[1, 2, 3]), (0, 3));
        assert_eq!(accept_in_order(2, &[1, 2, 3, 4]), (2, 2));
        assert_eq!(accept_in_order(2, &[4, 5]), (0, 0));
        assert_eq!(accept_in_order(2, &[3, 5]), (0, 1));
        assert_eq!(accept_in_order(5, &[1, 2]), (2, 0));
        assert_eq!(accept_in_order(0, &[]), (0, 0));
    }

    proptest! {
        /// However a conversation's fan-out is cut, repeated and re-sent, an inbox that
        /// follows `accept_in_order` ends with 1..=n exactly once, in order.
        #[test]
        fn inbox_takes_each_seq_once_in_order(
            n in 1u64..60,
            deliveries in proptest::collection::vec((0u64..60, 1usize..8, any::<bool>()), 1..80),
        ) {
            let mut inbox: Vec<u64> = Vec::new();
            let mut head = 0u64;
            // Arbitrary (possibly stale, duplicate or gapped) batches...
            for (start, len, _) in &deliveries {
                let start = 1 + start % n;
                let seqs: Vec<u64> = (start..start + *len as u64).filter(|s| *s <= n).collect();
                let (skip, take) = accept_in_order(head, &seqs);
                inbox.extend(&seqs[skip..skip + take]);
                head += take as u64;
            }
            // ...then the conversation's re-send loop from the reported head.
            while head < n {
                let seqs: Vec<u64> = (head + 1..=n.min(head + 5)).collect();
                let (skip, take) = accept_in_order(head, &seqs);
                prop_assert_eq!(skip, 0);
                inbox.extend(&seqs[..take]);
                head += take as u64;
            }
            prop_assert_eq!(inbox, (1..=n).collect::<Vec<_>>());
        }

        /// Whatever order (with duplicates) events arrive in, the emitter yields each seq
        /// after the cursor once, in order.
        #[test]
        fn reorder_emits_in_order_once(
            cursor in 0u64..5,
            mut seqs in proptest::collection::vec(1u64..40, 0..120),
        ) {
            let n = 40u64;
            seqs.extend(1..=n);
            let mut r = Reorder::new(cursor, 1000);
            let mut out = Vec::new();
            for s in seqs {
                for (seq, item) in r.offer(s, s).unwrap() {
                    prop_assert_eq!(seq, item);
                    out.push(seq);
                }
            }
            prop_assert_eq!(out, (cursor + 1..=n).collect::<Vec<_>>());
            prop_assert_eq!(r.held(), 0);
        }
    }

    #[test]
    fn reorder_overflow_and_advance() {
        let mut r = Reorder::new(0, 2);
        assert_eq!(r.offer(3, ()).unwrap(), vec![]);
        assert_eq!(r.offer(4, ()).unwrap(), vec![]);
        assert_eq!(r.offer(5, ()), Err(Overflow));
        let mut r = Reorder::new(0, 10);
        r.offer(3, 'c').unwrap();
        r.offer(5, 'e').unwrap();
        assert_eq!(r.advance_to(2), vec![(3, 'c')]);
        assert_eq!(r.offer(1, 'a').unwrap(), vec![]);
        assert_eq!(r.cursor(), 3);
        assert_eq!(r.advance_to(1), vec![]);
        assert_eq!(r.offer(4, 'd').unwrap(), vec![(4, 'd'), (5, 'e')]);
    }
}
