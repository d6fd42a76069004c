//! Which offset of a partition may be committed: everything below the lowest
//! record that is dispatched but not finished.

use std::collections::VecDeque;

/// Tracks dispatched-but-unfinished offsets of one partition.
///
/// Offsets are dispatched in increasing order (a partition is read in
/// order), so they are kept in a deque sorted by offset with a "finished"
/// flag: dispatching appends, finishing marks (binary search) and drops the
/// finished prefix. The lowest unfinished offset is then the front.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// `(offset, finished)`, sorted by offset; the front is unfinished.
    pending: VecDeque<(i64, bool)>,
    highest: Option<i64>,
    committed: Option<i64>,
}

impl OffsetTracker {
    /// A record was handed to a worker.
    pub fn dispatched(&mut self, offset: i64) {
        match self.pending.back() {
            Some(&(last, _)) if last >= offset => {
                // Out of order (not expected): keep the deque sorted.
                match self.pending.binary_search_by_key(&offset, |&(o, _)| o) {
                    Ok(i) => self.pending[i].1 = false,
                    Err(i) => self.pending.insert(i, (offset, false)),
                }
            }
            _ => self.pending.push_back((offset, false)),
        }
        self.highest = Some(self.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A record was finished (succeeded, filtered out, or written to the
    /// on-failure topic).
    pub fn finished(&mut self, offset: i64) {
        match self.pending.front() {
            // Batches mostly finish in offset order: the lowest first.
            Some(&(lowest, _)) if lowest == offset => self.pending[0].1 = true,
            _ => {
                if let Ok(i) = self.pending.binary_search_by_key(&offset, |&(o, _)| o) {
                    self.pending[i].1 = true;
                }
            }
        }
        while self.pending.front().is_some_and(|&(_, done)| done) {
            self.pending.pop_front();
        }
    }

    /// Unfinished offsets, lowest first.
    fn unfinished(&self) -> impl Iterator<Item = i64> + '_ {
        self.pending
            .iter()
            .filter(|&&(_, done)| !done)
            .map(|&(o, _)| o)
    }

    /// Records dispatched and not finished.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.unfinished().count()
    }

    /// The offset that would be committable once `offsets` are finished,
    /// if it is ahead of the last commit (nothing is changed).
    pub fn committable_after(&self, offsets: &[i64]) -> Option<i64> {
        let next = match self.unfinished().find(|o| !offsets.contains(o)) {
            Some(lowest) => lowest,
            None => self.highest? + 1,
        };
        if self.committed.is_some_and(|c| c >= next) {
            None
        } else {
            Some(next)
        }
    }

    /// Record that `next` was committed by other means (a transaction).
    pub fn mark_committed(&mut self, next: i64) {
        self.committed = Some(self.committed.map_or(next, |c| c.max(next)));
    }

    /// The next offset to commit if it moved forward since the last call
    /// (Kafka commits name the next record to read).
    pub fn take_committable(&mut self) -> Option<i64> {
        let next = match self.unfinished().next() {
            Some(lowest) => lowest,
            None => self.highest? + 1,
        };
        if self.committed.is_some_and(|c| c >= next) {
            return None;
        }
        self.committed = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_before_the_lowest_unfinished_record() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.take_committable(), None);
        for o in 10..15 {
            t.dispatched(o);
        }
        t.finished(10);
        t.finished(12);
        assert_eq!(t.take_committable(), Some(11));
        assert_eq!(t.take_committable(), None, "no change, no commit");
        t.finished(11);
        t.finished(14);
        assert_eq!(t.take_committable(), Some(13));
        t.finished(13);
        assert_eq!(t.take_committable(), Some(15));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn finishing_out_of_order_and_unknown_offsets() {
        let mut t = OffsetTracker::default();
        for o in [5, 6, 7, 9] {
            t.dispatched(o);
        }
        t.dispatched(8); // out of order: kept sorted
        t.finished(42); // unknown: ignored
        t.finished(9);
        t.finished(6);
        assert_eq!(t.take_committable(), Some(5));
        t.finished(5);
        assert_eq!(t.take_committable(), Some(7));
        t.finished(7);
        t.finished(8);
        assert_eq!(t.take_committable(), Some(10));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn committable_after_looks_ahead_without_changing_anything() {
        let mut t = OffsetTracker::default();
        for o in 0..4 {
            t.dispatched(o);
        }
        assert_eq!(t.committable_after(&[0, 1]), Some(2));
        assert_eq!(t.committable_after(&[1]), Some(0));
        assert_eq!(t.committable_after(&[0, 1, 2, 3]), Some(4));
        t.mark_committed(2);
        assert_eq!(t.committable_after(&[0, 1]), None);
        assert_eq!(t.pending(), 4);
    }
}
