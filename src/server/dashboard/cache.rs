//! Results of the dashboard's own queries, kept per lake snapshot: a page asked for again before
//! the lake changes is answered from memory; a session over newer table versions starts afresh.

use std::collections::BTreeMap;
use std::sync::Mutex;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::scalar::ScalarValue;

/// A query's answer.
pub type Answer = (SchemaRef, Vec<RecordBatch>);

/// Table versions a session reads ([`crate::sql::Engine::versions`]).
pub type Snapshot = BTreeMap<String, u64>;

/// Query answers of one lake snapshot, least recently used dropped first beyond a byte budget.
pub struct PageCache {
    budget: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    snapshot: Snapshot,
    entries: lru::LruCache<String, (Answer, usize)>,
    bytes: usize,
}

impl PageCache {
    /// A cache holding at most `budget` bytes of Arrow data (0: keeps nothing).
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Inner {
                snapshot: Snapshot::new(),
                entries: lru::LruCache::unbounded(),
                bytes: 0,
            }),
        }
    }

    /// The key of `sql` with its parameter values.
    pub fn key(sql: &str, params: &[ScalarValue]) -> String {
        format!("{sql}\u{0}{params:?}")
    }

    /// Whether the answer of `sql` may be kept: it must depend on the lake alone. The mapping
    /// functions also depend on the model, which changes without a lake commit.
    pub fn cacheable(sql: &str) -> bool {
        let sql = sql.to_ascii_lowercase();
        !["map_technique", "map_report", "explain_mapping"]
            .iter()
            .any(|f| sql.contains(f))
    }

    /// The answer kept for `key` in `snapshot`.
    pub fn get(&self, snapshot: &Snapshot, key: &str) -> Option<Answer> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.snapshot != *snapshot {
            return None;
        }
        inner.entries.get(key).map(|(a, _)| a.clone())
    }

    /// Keep `answer` for `key` in `snapshot`; answers of another snapshot are dropped, and one
    /// larger than an eighth of the budget is not kept.
    pub fn put(&self, snapshot: &Snapshot, key: String, answer: &Answer) {
        let size: usize = key.len()
            + answer
                .1
                .iter()
                .map(RecordBatch::get_array_memory_size)
                .sum::<usize>();
        if size > self.budget / 8 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.snapshot != *snapshot {
            inner.entries.clear();
            inner.bytes = 0;
            inner.snapshot.clone_from(snapshot);
        }
        if let Some((_, old)) = inner.entries.put(key, (answer.clone(), size)) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        while inner.bytes > self.budget {
            match inner.entries.pop_lru() {
                Some((_, (_, n))) => inner.bytes -= n,
                None => break,
            }
        }
    }

    /// Answers kept and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.entries.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn answer(rows: i64) -> Answer {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        (schema, vec![b])
    }

    fn snap(v: u64) -> Snapshot {
        [("otx_pulse_log".to_string(), v)].into_iter().collect()
    }

    #[test]
    fn answers_only_within_the_snapshot_they_were_read_from() {
        let c = PageCache::new(1 << 20);
        let k = PageCache::key("SELECT $1", &[ScalarValue::Utf8(Some("a".into()))]);
        c.put(&snap(1), k.clone(), &answer(3));
        assert_eq!(c.get(&snap(1), &k).unwrap().1[0].num_rows(), 3);
        // Another parameter value is another query.
        let other = PageCache::key("SELECT $1", &[ScalarValue::Utf8(Some("b".into()))]);
        assert!(c.get(&snap(1), &other).is_none());
        // A newer table version: nothing is answered from the old one, and the first answer of the
        // new snapshot drops the old ones.
        assert!(c.get(&snap(2), &k).is_none());
        c.put(&snap(2), other.clone(), &answer(1));
        assert!(c.get(&snap(1), &k).is_none());
        assert_eq!(c.usage().0, 1);
    }

    #[test]
    fn stays_within_its_budget_dropping_the_least_recently_used() {
        let one = answer(1000);
        let size = one.1[0].get_array_memory_size();
        let c = PageCache::new(size * 8 + 100);
        for i in 0..20 {
            c.put(&snap(1), format!("q{i}"), &one);
            // q0 is used all along, so it stays.
            assert!(c.get(&snap(1), "q0").is_some(), "{i}");
        }
        let (n, bytes) = c.usage();
        assert!(
            bytes <= size * 8 + 100 && (7..20).contains(&n),
            "{n} {bytes}"
        );
        assert!(c.get(&snap(1), "q1").is_none() && c.get(&snap(1), "q19").is_some());
        // Larger than an eighth of the budget: not kept. A zero budget keeps nothing.
        c.put(&snap(1), "big".into(), &answer(10_000));
        assert!(c.get(&snap(1), "big").is_none());
        let off = PageCache::new(0);
        off.put(&snap(1), "q".into(), &answer(1));
        assert!(off.get(&snap(1), "q").is_none());
    }

    #[test]
    fn mapping_functions_are_not_kept() {
        assert!(PageCache::cacheable(
            "SELECT count(*) FROM threat_intelligence_data"
        ));
        assert!(!PageCache::cacheable(
            "SELECT EXPLAIN_MAPPING(t.text) FROM threat_intelligence_data t"
        ));
        assert!(!PageCache::cacheable(
            "SELECT map_techniques(text, 3) FROM t"
        ));
    }
}
