//! How the node's inbound connections arrived over the last minutes: over mTLS, in plaintext
//! (and from where), or in plaintext and refused. `culvert check` reads it to answer "is all my
//! traffic encrypted?".
//!
//! Bounded whatever the traffic: one bucket per minute for [`MINUTES`], each naming at most
//! 32 plaintext (source, destination) pairs and counting the rest.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use serde::Serialize;

/// The window, in minutes.
pub const MINUTES: u64 = 10;
/// Plaintext (source, destination) pairs named per minute.
const SOURCES: usize = 32;

/// How one inbound connection arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Mtls,
    /// Plain TCP a PERMISSIVE pod accepted.
    Plaintext,
    /// Plain TCP refused by policy.
    Refused,
}

/// The node's inbound connections over the window.
pub struct Tally {
    start: Instant,
    minutes: Mutex<VecDeque<Minute>>,
}

#[derive(Default)]
struct Minute {
    index: u64,
    mtls: u64,
    plaintext: u64,
    refused: u64,
    sources: BTreeMap<(Arc<str>, Arc<str>), u64>,
}

/// What the window holds, as the admin API shows it.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub minutes: u64,
    pub mtls: u64,
    pub plaintext: u64,
    pub refused: u64,
    /// Plaintext accepted, by source and destination pod, most connections first.
    pub plaintext_sources: Vec<Source>,
    /// Plaintext connections from pairs beyond the ones named.
    pub plaintext_unnamed: u64,
}

#[derive(Debug, Serialize)]
pub struct Source {
    /// The source workload (`namespace/name`), or its address when the node knows none there.
    pub from: Arc<str>,
    /// The destination pod (`namespace/name`).
    pub to: Arc<str>,
    pub connections: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            minutes: Mutex::default(),
        }
    }
}

impl Tally {
    /// Counts an inbound connection to pod `to`; `from` names its source, asked only for
    /// plaintext.
    pub fn note(&self, arrival: Arrival, from: impl FnOnce() -> Arc<str>, to: &Arc<str>) {
        self.note_at(Instant::now(), arrival, from, to);
    }

    fn note_at(
        &self,
        now: Instant,
        arrival: Arrival,
        from: impl FnOnce() -> Arc<str>,
        to: &Arc<str>,
    ) {
        let index = self.minute(now);
        let mut minutes = self.minutes.lock().expect("tally poisoned");
        if minutes.back().is_none_or(|m| m.index != index) {
            minutes.push_back(Minute {
                index,
                ..Minute::default()
            });
        }
        while minutes.front().is_some_and(|m| m.index + MINUTES <= index) {
            minutes.pop_front();
        }
        let minute = minutes.back_mut().expect("pushed above");
        match arrival {
            Arrival::Mtls => minute.mtls += 1,
            Arrival::Refused => minute.refused += 1,
            Arrival::Plaintext => {
                minute.plaintext += 1;
                let key = (from(), to.clone());
                if let Some(n) = minute.sources.get_mut(&key) {
                    *n += 1;
                } else if minute.sources.len() < SOURCES {
                    minute.sources.insert(key, 1);
                }
            }
        }
    }

    /// The last [`MINUTES`] minutes (the current one included).
    pub fn summary(&self) -> Summary {
        self.summary_at(Instant::now())
    }

    fn summary_at(&self, now: Instant) -> Summary {
        let index = self.minute(now);
        let minutes = self.minutes.lock().expect("tally poisoned");
        let mut summary = Summary {
            minutes: MINUTES,
            ..Summary::default()
        };
        let mut sources: BTreeMap<&(Arc<str>, Arc<str>), u64> = BTreeMap::new();
        for minute in minutes.iter().filter(|m| m.index + MINUTES > index) {
            summary.mtls += minute.mtls;
            summary.plaintext += minute.plaintext;
            summary.refused += minute.refused;
            for (key, n) in &minute.sources {
                *sources.entry(key).or_default() += n;
            }
        }
        let named: u64 = sources.values().sum();
        summary.plaintext_unnamed = summary.plaintext - named;
        summary.plaintext_sources = sources
            .into_iter()
            .map(|((from, to), connections)| Source {
                from: from.clone(),
                to: to.clone(),
                connections,
            })
            .collect();
        summary
            .plaintext_sources
            .sort_by_key(|s| std::cmp::Reverse(s.connections));
        summary
    }

    fn minute(&self, now: Instant) -> u64 {
        now.duration_since(self.start).as_secs() / 60
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_the_window_names_plaintext_sources_and_forgets_old_minutes() {
        let tally = Tally::default();
        let t0 = tally.start;
        let pod: Arc<str> = "shop/cart".into();
        let at = |m: u64| t0 + Duration::from_secs(m * 60 + 1);
        tally.note_at(at(0), Arrival::Mtls, || unreachable!(), &pod);
        tally.note_at(at(0), Arrival::Plaintext, || "shop/legacy".into(), &pod);
        tally.note_at(at(3), Arrival::Plaintext, || "shop/legacy".into(), &pod);
        tally.note_at(at(3), Arrival::Plaintext, || "10.0.0.9".into(), &pod);
        tally.note_at(at(3), Arrival::Refused, || unreachable!(), &pod);

        let s = tally.summary_at(at(4));
        assert_eq!((s.mtls, s.plaintext, s.refused), (1, 3, 1));
        let named: Vec<_> = s
            .plaintext_sources
            .iter()
            .map(|s| (&*s.from, &*s.to, s.connections))
            .collect();
        assert_eq!(
            named,
            [
                ("shop/legacy", "shop/cart", 2),
                ("10.0.0.9", "shop/cart", 1)
            ]
        );
        // Minute 0 leaves the window at minute 10.
        let s = tally.summary_at(at(10));
        assert_eq!((s.mtls, s.plaintext, s.refused), (0, 2, 1));
        assert!(tally.summary_at(at(13)).plaintext_sources.is_empty());
    }

    #[test]
    fn a_flood_of_distinct_sources_names_a_bounded_few_and_counts_the_rest() {
        let tally = Tally::default();
        let pod: Arc<str> = "shop/cart".into();
        for i in 0..10_000u32 {
            tally.note(
                Arrival::Plaintext,
                || format!("10.1.{}.{}", i / 256, i % 256).into(),
                &pod,
            );
        }
        let s = tally.summary();
        assert_eq!(s.plaintext, 10_000);
        assert!(
            s.plaintext_sources.len() <= SOURCES * 2,
            "{}",
            s.plaintext_sources.len()
        );
        let named: u64 = s.plaintext_sources.iter().map(|s| s.connections).sum();
        assert_eq!(named + s.plaintext_unnamed, 10_000);
        assert!(tally.minutes.lock().unwrap().len() <= 2);
    }
}
