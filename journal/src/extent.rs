//! Sets of dirty byte ranges.

use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};

/// A set of byte offsets kept as sorted, non-overlapping, non-adjacent half-open ranges
/// `[start, end)`. Inserting only ever grows the set, so applying writes in any order gives
/// the same result (the join that replay relies on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet {
    /// Invariant: `start < end` for each range, and `ranges[i].1 < ranges[i + 1].0`
    /// (a gap of at least one byte between neighbours, otherwise they would be coalesced).
    ranges: Vec<(u64, u64)>,
}

impl ExtentSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `[start, end)`, merging it with every range it overlaps or touches.
    /// An empty or inverted range adds nothing.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Ranges[i..j] overlap or touch [start, end): those ending at or after `start` and
        // starting at or before `end`.
        let i = self.ranges.partition_point(|&(_, e)| e < start);
        let j = self.ranges.partition_point(|&(s, _)| s <= end);
        if i == j {
            self.ranges.insert(i, (start, end));
        } else {
            let merged = (start.min(self.ranges[i].0), end.max(self.ranges[j - 1].1));
            self.ranges.splice(i..j, std::iter::once(merged));
        }
        debug_assert!(
            self.check_invariant(),
            "ExtentSet invariant broken: {self:?}"
        );
    }

    /// The ranges in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Number of bytes covered.
    pub fn total_len(&self) -> u64 {
        self.ranges.iter().map(|&(s, e)| e - s).sum()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when no byte is covered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True when `offset` is covered.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, e)| e <= offset);
        self.ranges.get(i).is_some_and(|&(s, _)| s <= offset)
    }

    /// The parts of `[start, end)` the set does not cover, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(s, e) in &self.ranges[self.ranges.partition_point(|&(_, e)| e <= start)..] {
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    fn check_invariant(&self) -> bool {
        self.ranges.iter().all(|&(s, e)| s < e) && self.ranges.windows(2).all(|w| w[0].1 < w[1].0)
    }
}

impl FromIterator<(u64, u64)> for ExtentSet {
    fn from_iter<I: IntoIterator<Item = (u64, u64)>>(iter: I) -> Self {
        let mut set = ExtentSet::new();
        for (s, e) in iter {
            set.insert(s, e);
        }
        set
    }
}

/// Serialized as a list of `[start, end]` pairs.
impl Serialize for ExtentSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.ranges.len()))?;
        for r in &self.ranges {
            seq.serialize_element(&[r.0, r.1])?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(ranges: &[(u64, u64)]) -> ExtentSet {
        ranges.iter().copied().collect()
    }

    fn ranges(s: &ExtentSet) -> Vec<(u64, u64)> {
        s.iter().collect()
    }

    #[test]
    fn empty_and_inverted_ranges_add_nothing() {
        let s = set(&[(5, 5), (7, 3)]);
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert_eq!(s.total_len(), 0);
    }

    #[test]
    fn disjoint_ranges_stay_sorted() {
        let s = set(&[(20, 30), (0, 5), (10, 12)]);
        assert_eq!(ranges(&s), vec![(0, 5), (10, 12), (20, 30)]);
        assert_eq!(s.total_len(), 17);
    }

    #[test]
    fn adjacent_ranges_coalesce() {
        assert_eq!(ranges(&set(&[(0, 5), (5, 10)])), vec![(0, 10)]);
        assert_eq!(ranges(&set(&[(5, 10), (0, 5)])), vec![(0, 10)]);
    }

    #[test]
    fn overlapping_ranges_coalesce() {
        assert_eq!(ranges(&set(&[(0, 6), (4, 10)])), vec![(0, 10)]);
        assert_eq!(ranges(&set(&[(2, 3), (0, 10)])), vec![(0, 10)]);
        assert_eq!(ranges(&set(&[(0, 10), (2, 3)])), vec![(0, 10)]);
    }

    #[test]
    fn one_insert_bridges_many_ranges() {
        let mut s = set(&[(0, 2), (4, 6), (8, 10), (20, 21)]);
        s.insert(1, 9);
        assert_eq!(ranges(&s), vec![(0, 10), (20, 21)]);
        s.insert(10, 20);
        assert_eq!(ranges(&s), vec![(0, 21)]);
    }

    #[test]
    fn gap_of_one_byte_is_kept() {
        assert_eq!(ranges(&set(&[(0, 5), (6, 10)])), vec![(0, 5), (6, 10)]);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let s = set(&[(u64::MAX - 1, u64::MAX), (0, 1)]);
        assert_eq!(ranges(&s), vec![(0, 1), (u64::MAX - 1, u64::MAX)]);
        assert!(s.contains(u64::MAX - 1));
        assert!(!s.contains(1));
    }

    #[test]
    fn serializes_as_pairs() {
        let json = serde_json::to_string(&set(&[(0, 4), (8, 9)])).unwrap();
        assert_eq!(json, "[[0,4],[8,9]]");
    }

    proptest! {
        /// Against a bitmap of 256 bytes: same bytes covered, and the canonical form is the
        /// maximal runs of the bitmap.
        #[test]
        fn matches_bitmap_model(ops in proptest::collection::vec((0u64..256, 0u64..40), 0..40)) {
            let mut s = ExtentSet::new();
            let mut bits = [false; 300];
            for (start, len) in ops {
                s.insert(start, start + len);
                for b in &mut bits[start as usize..(start + len) as usize] {
                    *b = true;
                }
            }
            let mut runs = Vec::new();
            let mut i = 0;
            while i < bits.len() {
                if bits[i] {
                    let st = i;
                    while i < bits.len() && bits[i] { i += 1; }
                    runs.push((st as u64, i as u64));
                } else {
                    i += 1;
                }
            }
            prop_assert_eq!(ranges(&s), runs);
            prop_assert_eq!(s.total_len(), bits.iter().filter(|b| **b).count() as u64);
            for (off, b) in bits.iter().enumerate() {
                prop_assert_eq!(s.contains(off as u64), *b);
            }
        }

        /// Insertion order does not matter (the property replay after reordering relies on).
        #[test]
        fn order_independent(mut ops in proptest::collection::vec((0u64..1000, 0u64..100), 0..30)) {
            let a: ExtentSet = ops.iter().map(|&(s, l)| (s, s + l)).collect();
            ops.reverse();
            let b: ExtentSet = ops.iter().map(|&(s, l)| (s, s + l)).collect();
            prop_assert_eq!(a, b);
        }
    }
}
