//! The offsets stage: what may be committed, and when.
//!
//! [`OffsetTracker`] keeps one partition's contiguous watermark: the offset
//! below which every record is finished (sunk, duplicate, or dead-lettered).
//! Work may finish out of order; the watermark never passes unfinished work.
//!
//! [`CommitBook`] is where partition tasks publish their watermarks and the
//! source reads them to commit. Before a commit it runs the store's
//! durability barrier, so no offset is committed before the decisions and
//! effects behind it are durable. The values here are already "next offset
//! to read" (last finished + 1), the form a commit takes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::error::StoreError;
// Shared with the core and the sinks through the `values` leaf; kept here, where the
// consumer group's code names them.
pub use crate::values::{OutputMark, TopicPartition};

/// One partition's in-flight records, in offset order.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    pending: VecDeque<(i64, bool)>,
    watermark: Option<i64>,
}

/// A partition's records were begun or finished out of the tracker's rules: a bug, not bad input.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrackError {
    /// `begin` was given an offset not above the last one begun.
    #[error("offset {offset} begun after {last}: offsets must increase within a partition")]
    NotIncreasing {
        /// The offset begun.
        offset: i64,
        /// The last offset begun before it.
        last: i64,
    },
    /// `finish` was given an offset never begun (or finished twice).
    #[error("offset {0} finished but never begun")]
    Unknown(i64),
}

impl OffsetTracker {
    /// A tracker with nothing begun and no watermark.
    pub fn new() -> OffsetTracker {
        OffsetTracker::default()
    }

    /// A record enters the pipeline.
    pub fn begin(&mut self, offset: i64) -> Result<(), TrackError> {
        let last = self.pending.back().map(|(o, _)| *o).or(self.watermark.map(|w| w - 1));
        if let Some(last) = last {
            if offset <= last {
                return Err(TrackError::NotIncreasing { offset, last });
            }
        }
        self.pending.push_back((offset, false));
        Ok(())
    }

    /// A record is finished; returns the new watermark if it moved.
    pub fn finish(&mut self, offset: i64) -> Result<Option<i64>, TrackError> {
        let index = self.pending.binary_search_by_key(&offset, |(o, _)| *o).map_err(|_| TrackError::Unknown(offset))?;
        self.pending[index].1 = true;
        let before = self.watermark;
        while let Some(&(o, true)) = self.pending.front() {
            self.watermark = Some(o + 1);
            self.pending.pop_front();
        }
        Ok((self.watermark != before).then_some(self.watermark).flatten())
    }

    /// Nothing is in flight and the consumer's next offset is `next`: the offsets up to it
    /// held no record for the application (transaction markers, aborted records), so the
    /// watermark moves there, or a partition whose last write was a transaction would be
    /// committed one short of its end forever. Returns the new watermark if it moved.
    pub fn skip_to(&mut self, next: i64) -> Option<i64> {
        if !self.pending.is_empty() || self.watermark.is_some_and(|w| w >= next) {
            return None;
        }
        self.watermark = Some(next);
        self.watermark
    }

    /// Next offset to commit, if any record has finished.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark
    }

    /// Records begun and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Mark {
    watermark: Option<i64>,
    committed: Option<i64>,
    /// Never commit past this offset (a record that did not reach its partition task).
    hold: Option<i64>,
    logs: LogMarks,
}

/// Where a partition's writes stand in the output and dead-letter topics.
/// Travels in the commit's metadata, so the next owner knows where to start
/// reading them to find writes made after the last commit ([`crate::reconcile`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogMarks {
    /// Where the output topic's writes were.
    pub output: Option<OutputMark>,
    /// Where the dead-letter topic's writes were.
    pub dead_letter: Option<OutputMark>,
}

impl LogMarks {
    const PREFIX: &'static str = "kdedup1";

    /// `kdedup1 out=P:O dlq=P:O`, each part present when known.
    pub fn to_metadata(self) -> String {
        let mut s = String::from(Self::PREFIX);
        for (name, mark) in [("out", self.output), ("dlq", self.dead_letter)] {
            if let Some(m) = mark {
                s.push_str(&format!(" {name}={}:{}", m.partition, m.offset));
            }
        }
        s
    }

    /// Parses [`LogMarks::to_metadata`]'s text; anything else (another tool's metadata) is no marks.
    pub fn from_metadata(metadata: &str) -> LogMarks {
        let mut marks = LogMarks::default();
        let mut words = metadata.split(' ');
        if words.next() != Some(Self::PREFIX) {
            return marks;
        }
        for word in words {
            let Some((name, at)) = word.split_once('=') else { continue };
            let Some((p, o)) = at.split_once(':') else { continue };
            let (Ok(partition), Ok(offset)) = (p.parse(), o.parse()) else { continue };
            let mark = Some(OutputMark { partition, offset });
            match name {
                "out" => marks.output = mark,
                "dlq" => marks.dead_letter = mark,
                _ => {}
            }
        }
        marks
    }

    /// Takes the parts `newer` knows.
    fn merge(&mut self, newer: LogMarks) {
        self.output = newer.output.or(self.output);
        self.dead_letter = newer.dead_letter.or(self.dead_letter);
    }

    /// Neither log has a mark.
    pub fn is_empty(&self) -> bool {
        self.output.is_none() && self.dead_letter.is_none()
    }
}

/// One partition's offset to commit, with its log marks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The partition.
    pub tp: TopicPartition,
    /// The offset to commit: the next one to read.
    pub offset: i64,
    /// Where its writes were.
    pub logs: LogMarks,
}

/// The durability barrier run before each commit (the store's `sync`).
pub type Barrier = Box<dyn Fn() -> Result<(), StoreError> + Send + Sync>;

/// Watermarks published by partition tasks, read by the committer.
pub struct CommitBook {
    marks: Mutex<HashMap<TopicPartition, Mark>>,
    barrier: Barrier,
}

impl CommitBook {
    /// A book whose commits first run `barrier`.
    pub fn new(barrier: Barrier) -> CommitBook {
        CommitBook { marks: Mutex::new(HashMap::new()), barrier }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Mark>> {
        // A poisoned lock means a panic mid-update of plain integers; the data is still usable.
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A partition was assigned: start clean from the group's committed offset,
    /// carrying its log marks forward until this owner writes records of its own.
    pub fn open(&self, tp: TopicPartition, committed: Option<i64>, logs: LogMarks) {
        self.marks().insert(tp, Mark { committed, logs, ..Mark::default() });
    }

    /// A partition task reports its watermark (and where its writes stand for
    /// everything before it). Ignored once the partition is closed, so a late
    /// task can never move a revoked partition's offset.
    pub fn publish(&self, tp: &TopicPartition, watermark: i64, logs: LogMarks) {
        if let Some(mark) = self.marks().get_mut(tp) {
            mark.watermark = Some(mark.watermark.map_or(watermark, |w| w.max(watermark)));
            mark.logs.merge(logs);
        }
    }

    /// Caps a partition's commits at `offset`, so that record is redelivered to
    /// the partition's next owner instead of being skipped.
    pub fn hold(&self, tp: &TopicPartition, offset: i64) {
        if let Some(mark) = self.marks().get_mut(tp) {
            mark.hold = Some(mark.hold.map_or(offset, |h| h.min(offset)));
        }
    }

    /// The partition is gone (revoked or lost).
    pub fn close(&self, tp: &TopicPartition) {
        self.marks().remove(tp);
    }

    /// Offsets that moved since the last commit, for `only` (or all partitions),
    /// made durable first: snapshot, then barrier, so everything behind the
    /// snapshot was written before the barrier ran.
    pub fn prepare(&self, only: Option<&[TopicPartition]>) -> Result<Vec<Ready>, StoreError> {
        let snapshot: Vec<Ready> = self
            .marks()
            .iter()
            .filter(|(tp, _)| only.is_none_or(|o| o.contains(tp)))
            .filter_map(|(tp, m)| match (m.watermark.map(|w| m.hold.map_or(w, |h| w.min(h))), m.committed) {
                (Some(w), Some(c)) if w <= c => None,
                (Some(w), _) => Some(Ready { tp: tp.clone(), offset: w, logs: m.logs }),
                (None, _) => None,
            })
            .collect();
        if !snapshot.is_empty() {
            (self.barrier)()?;
        }
        Ok(snapshot)
    }

    /// The broker accepted these offsets.
    pub fn committed(&self, offsets: &[Ready]) {
        let mut marks = self.marks();
        for r in offsets {
            if let Some(m) = marks.get_mut(&r.tp) {
                m.committed = Some(m.committed.map_or(r.offset, |c| c.max(r.offset)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn watermark_waits_for_the_oldest_record() {
        let mut t = OffsetTracker::new();
        for o in [10, 11, 12] {
            t.begin(o).unwrap();
        }
        assert_eq!(t.finish(12).unwrap(), None);
        assert_eq!(t.finish(11).unwrap(), None);
        assert_eq!(t.watermark(), None);
        assert_eq!(t.finish(10).unwrap(), Some(13), "commit form is offset + 1");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn an_idle_partition_skips_to_the_consumers_position_never_past_work() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.skip_to(4), Some(4), "a partition that starts on a transaction marker");
        t.begin(4).unwrap();
        assert_eq!(t.skip_to(6), None, "a record in flight holds the watermark");
        assert_eq!(t.finish(4).unwrap(), Some(5));
        assert_eq!(t.skip_to(6), Some(6), "the commit marker after the last record");
        assert_eq!(t.skip_to(6), None);
        assert_eq!(t.skip_to(3), None, "never back");
        assert!(matches!(t.begin(5), Err(TrackError::NotIncreasing { .. })));
        t.begin(6).unwrap();
    }

    #[test]
    fn gaps_in_offsets_are_fine_but_going_back_is_not() {
        let mut t = OffsetTracker::new();
        t.begin(5).unwrap();
        t.begin(9).unwrap(); // compaction or transaction markers leave gaps
        assert_eq!(t.begin(9), Err(TrackError::NotIncreasing { offset: 9, last: 9 }));
        assert_eq!(t.finish(7), Err(TrackError::Unknown(7)));
        t.finish(5).unwrap();
        assert_eq!(t.finish(9).unwrap(), Some(10));
        assert!(matches!(t.begin(9), Err(TrackError::NotIncreasing { .. })));
    }

    #[test]
    fn commit_book_skips_closed_partitions_and_unmoved_offsets() {
        let book = CommitBook::new(Box::new(|| Ok(())));
        let tp: TopicPartition = (Arc::from("t"), 0);
        book.publish(&tp, 5, LogMarks::default());
        assert!(book.prepare(None).unwrap().is_empty(), "not open: ignored");
        let carried = LogMarks { output: Some(OutputMark { partition: 2, offset: 40 }), dead_letter: None };
        book.open(tp.clone(), None, carried);
        book.publish(&tp, 5, LogMarks::default());
        let ready = book.prepare(None).unwrap();
        assert_eq!(ready, vec![Ready { tp: tp.clone(), offset: 5, logs: carried }], "marks carried forward");
        book.committed(&ready);
        assert!(book.prepare(None).unwrap().is_empty(), "nothing moved");
        book.hold(&tp, 7);
        let dlq = OutputMark { partition: 0, offset: 3 };
        book.publish(&tp, 9, LogMarks { output: None, dead_letter: Some(dlq) });
        let both = LogMarks { dead_letter: Some(dlq), ..carried };
        assert_eq!(
            book.prepare(None).unwrap(),
            vec![Ready { tp: tp.clone(), offset: 7, logs: both }],
            "held below the stray record"
        );
        book.close(&tp);
        book.publish(&tp, 9, LogMarks::default());
        assert!(book.prepare(None).unwrap().is_empty());
    }

    #[test]
    fn a_failed_barrier_commits_nothing() {
        let book = CommitBook::new(Box::new(|| Err(StoreError::Task("disk gone".into()))));
        let tp: TopicPartition = (Arc::from("t"), 0);
        book.open(tp.clone(), None, LogMarks::default());
        book.publish(&tp, 3, LogMarks::default());
        assert!(book.prepare(None).is_err());
    }

    #[test]
    fn log_marks_round_trip_through_commit_metadata() {
        let m = LogMarks {
            output: Some(OutputMark { partition: 3, offset: 1 << 40 }),
            dead_letter: Some(OutputMark { partition: 0, offset: 7 }),
        };
        assert_eq!(LogMarks::from_metadata(&m.to_metadata()), m);
        let only_dlq = LogMarks { output: None, ..m };
        assert_eq!(LogMarks::from_metadata(&only_dlq.to_metadata()), only_dlq);
        assert!(LogMarks::from_metadata("").is_empty());
        assert!(LogMarks::from_metadata("someone else's metadata").is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Begin(u8),
        Finish(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(prop_oneof![(1u8..4).prop_map(Op::Begin), (0usize..64).prop_map(Op::Finish)], 0..200)
    }

    proptest! {
        /// Model: the set of begun offsets and the set of finished ones. The
        /// watermark is one past the longest finished prefix of begun offsets.
        #[test]
        fn tracker_matches_model(ops in ops()) {
            let mut t = OffsetTracker::new();
            let mut begun: Vec<i64> = Vec::new();
            let mut finished: BTreeSet<i64> = BTreeSet::new();
            let mut next = 100i64;
            for op in ops {
                match op {
                    Op::Begin(step) => {
                        next += step as i64;
                        t.begin(next).unwrap();
                        begun.push(next);
                    }
                    Op::Finish(i) => {
                        let open: Vec<i64> = begun.iter().copied().filter(|o| !finished.contains(o)).collect();
                        if open.is_empty() { continue; }
                        let o = open[i % open.len()];
                        t.finish(o).unwrap();
                        finished.insert(o);
                    }
                }
                let model = begun.iter().take_while(|o| finished.contains(o)).last().map(|o| o + 1);
                prop_assert_eq!(t.watermark(), model);
                // Never past unfinished work.
                if let Some(w) = t.watermark() {
                    prop_assert!(begun.iter().filter(|o| **o < w).all(|o| finished.contains(o)));
                }
            }
        }
    }
}
