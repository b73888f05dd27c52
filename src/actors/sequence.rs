//! Pure sequence logic, kept free of I/O so it can be property-tested.
//!
//! - [`accept_in_order`]: the idempotent inbox append. A conversation re-sends freely
//!   (at-least-once); the inbox takes each seq exactly once and in order.
//! - [`next_run`], [`change_spans`], [`accept_run`]: fan-out over membership spans. A
//!   group member receives only the seqs of its stays in the group; a conversation
//!   sends it one contiguous run at a time, and the inbox takes a run that starts past
//!   its head when everything in between was never the member's.
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

/// A stay of one member in a conversation: seqs `from..=until` (`None`: still there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub from: u64,
    pub until: Option<u64>,
}

impl Span {
    /// A member for the whole life of the conversation (a direct chat).
    pub const ALWAYS: Span = Span {
        from: 1,
        until: None,
    };
}

/// The next seqs to send a member whose fan-out has settled everything up to `done`:
/// the first seq after `done` (and at most `upto`) that lies in one of its `spans`
/// (ascending, disjoint), continued to the end of that span, `upto`, or `max` seqs.
/// `None`: the member has everything it is entitled to up to `upto`.
pub fn next_run(spans: &[Span], done: u64, upto: u64, max: u64) -> Option<(u64, u64)> {
    spans.iter().find_map(|span| {
        let start = span.from.max(done.saturating_add(1));
        let end = span.until.unwrap_or(u64::MAX).min(upto);
        (start <= end).then(|| (start, end.min(start.saturating_add(max.max(1) - 1))))
    })
}

/// Opens and closes stays for a membership change announced by the message at `seq`:
/// whoever is in `members` and has no open stay starts one at `seq` (so it sees its
/// own arrival); whoever has an open stay and is not in `members` ends it at `seq` (so
/// it sees its own departure, and nothing after it).
pub fn change_spans<K: Copy + Eq + std::hash::Hash>(
    spans: &mut std::collections::HashMap<K, Vec<Span>>,
    members: &[K],
    seq: u64,
) {
    let now: std::collections::HashSet<K> = members.iter().copied().collect();
    for (user, stays) in spans.iter_mut() {
        if let Some(open) = stays.last_mut().filter(|s| s.until.is_none()) {
            if !now.contains(user) {
                open.until = Some(seq);
            }
        }
    }
    for user in members {
        let stays = spans.entry(*user).or_default();
        if stays.last().is_none_or(|s| s.until.is_some()) {
            stays.push(Span {
                from: seq,
                until: None,
            });
        }
    }
}

/// The last seq before `from` that a member with these `spans` is entitled to (0 if
/// none): the predecessor its inbox must already hold before it takes a run starting
/// at `from`.
pub fn prev_entitled(spans: &[Span], from: u64) -> u64 {
    spans
        .iter()
        .filter(|s| s.from < from)
        .map(|s| s.until.unwrap_or(u64::MAX).min(from - 1))
        .max()
        .unwrap_or(0)
}

/// The inbox side of [`next_run`]: like [`accept_in_order`], but a run may start past
/// `head + 1`, when the conversation says the seqs between were never the member's
/// (they fell between two of its stays in a group). The conversation sends `prev`, the
/// member's last entitled seq before the run ([`prev_entitled`]); the run is taken only
/// if the inbox already has it, so a gap is still refused, never skipped.
pub fn accept_run(head: u64, prev: u64, seqs: &[u64]) -> (usize, usize) {
    if head < prev {
        return (0, 0);
    }
    let base = seqs
        .first()
        .map_or(head, |first| head.max(first.saturating_sub(1)));
    accept_in_order(base, seqs)
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
    fn runs_follow_spans() {
        let spans = [
            Span {
                from: 1,
                until: Some(4),
            },
            Span {
                from: 9,
                until: None,
            },
        ];
        assert_eq!(next_run(&spans, 0, 20, 100), Some((1, 4)));
        assert_eq!(next_run(&spans, 2, 20, 100), Some((3, 4)));
        assert_eq!(next_run(&spans, 4, 20, 100), Some((9, 20)));
        assert_eq!(next_run(&spans, 4, 8, 100), None);
        assert_eq!(next_run(&spans, 9, 20, 5), Some((10, 14)));
        assert_eq!(next_run(&[Span::ALWAYS], 0, 0, 5), None);
        assert_eq!(prev_entitled(&spans, 9), 4);
        assert_eq!(prev_entitled(&spans, 12), 11);
        assert_eq!(prev_entitled(&spans, 3), 2);
        assert_eq!(prev_entitled(&spans, 1), 0);
        assert_eq!(prev_entitled(&[Span::ALWAYS], 7), 6);
        assert_eq!(accept_run(4, 4, &[9, 10]), (0, 2));
        assert_eq!(accept_run(10, 4, &[9, 10, 11]), (2, 1));
        assert_eq!(accept_run(4, 4, &[9, 11]), (0, 1));
        // The inbox lacks the end of the earlier stay: refused, not skipped.
        assert_eq!(accept_run(3, 4, &[9, 10]), (0, 0));
    }

    #[test]
    fn spans_open_and_close() {
        let mut spans = std::collections::HashMap::new();
        change_spans(&mut spans, &['a', 'b'], 1);
        change_spans(&mut spans, &['a'], 5);
        change_spans(&mut spans, &['a', 'b'], 8);
        change_spans(&mut spans, &['a', 'b'], 9);
        assert_eq!(
            spans[&'a'],
            vec![Span {
                from: 1,
                until: None
            }]
        );
        assert_eq!(
            spans[&'b'],
            vec![
                Span {
                    from: 1,
                    until: Some(5)
                },
                Span {
                    from: 8,
                    until: None
                }
            ]
        );
    }

    proptest! {
        /// Members join and leave a conversation while messages are posted; fan-out
        /// follows `next_run` from wherever it restarts, with stale re-sends mixed in.
        /// Every member's inbox ends with exactly the seqs of its stays, once, in order.
        #[test]
        fn members_get_exactly_their_stays(
            ops in proptest::collection::vec((0u8..4, 0usize..3), 1..60),
            restarts in proptest::collection::vec(any::<bool>(), 1..60),
            max in 1u64..6,
        ) {
            use std::collections::HashMap;
            let users = [0usize, 1, 2];
            let mut spans: HashMap<usize, Vec<Span>> = HashMap::new();
            let mut members: Vec<usize> = vec![0];
            let mut seq = 1u64;
            change_spans(&mut spans, &members, seq);
            for (op, user) in &ops {
                seq += 1;
                if *op == 0 {
                    // A membership change is itself a message.
                    if let Some(i) = members.iter().position(|m| m == user) {
                        members.remove(i);
                    } else {
                        members.push(*user);
                    }
                    change_spans(&mut spans, &members, seq);
                }
            }
            let last = seq;
            for u in users {
                let stays = spans.get(&u).cloned().unwrap_or_default();
                let entitled: Vec<u64> = (1..=last)
                    .filter(|s| stays.iter().any(|p| p.from <= *s && p.until.is_none_or(|e| *s <= e)))
                    .collect();
                let (mut inbox, mut head, mut done) = (Vec::<u64>::new(), 0u64, 0u64);
                let mut sent: Vec<(u64, u64)> = Vec::new();
                let mut step = 0;
                while let Some((a, b)) = next_run(&stays, done, last, max) {
                    sent.push((a, b));
                    // Now and then a stale batch arrives again, or the conversation
                    // restarts and forgets how far it got.
                    let fault = |i: usize| restarts.get(i).copied().unwrap_or(false);
                    let batch = if fault(step) && sent.len() > 1 {
                        sent[step % (sent.len() - 1)]
                    } else {
                        (a, b)
                    };
                    let seqs: Vec<u64> = (batch.0..=batch.1).collect();
                    let (skip, take) = accept_run(head, prev_entitled(&stays, batch.0), &seqs);
                    inbox.extend(&seqs[skip..skip + take]);
                    head = inbox.last().copied().unwrap_or(0);
                    done = if fault(step + 1) { 0 } else { head.max(done) };
                    step += 1;
                    prop_assert!(step < 10_000);
                }
                prop_assert_eq!(inbox, entitled);
            }
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
