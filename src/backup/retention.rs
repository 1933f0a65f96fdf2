//! Which backups retention keeps: pure, over backup names and times.
//!
//! Semantics (as restic and borg): the newest `keep_last` backups; plus, walking from the newest, the newest
//! backup of each of the `keep_daily` most recent UTC days that have a backup; plus the newest of each of the
//! `keep_weekly` most recent ISO weeks that have a backup. The newest backup is always kept, whatever the
//! policy says, and so is the newest verified one (the newest known to restore), so a run of bad backups can
//! never push out the last good one.

use std::collections::BTreeSet;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::api::Retention;

/// A backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The backup's name.
    pub name: String,
    /// When it was taken.
    pub time: Timestamp,
    /// Whether `verify` read it back whole (digest and tar) since.
    pub verified: bool,
}

/// The outcome: names to keep and to delete, each newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Kept backups.
    pub keep: Vec<String>,
    /// Backups to delete.
    pub delete: Vec<String>,
}

/// Applies `policy` to `backups` (any order).
pub fn plan(backups: &[Candidate], policy: &Retention) -> Plan {
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    // Newest first; the name breaks ties so the plan does not depend on input order.
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.name.cmp(&a.name)));

    let mut keep = BTreeSet::new();
    for backup in sorted.iter().take(policy.keep_last.max(1) as usize) {
        keep.insert(backup.name.as_str());
    }
    keep_newest_per_period(&sorted, policy.keep_daily, &mut keep, |t| {
        let date = t.to_zoned(TimeZone::UTC).date();
        (i32::from(date.year()), i32::from(date.day_of_year()))
    });
    keep_newest_per_period(&sorted, policy.keep_weekly, &mut keep, |t| {
        let week = t.to_zoned(TimeZone::UTC).date().iso_week_date();
        (i32::from(week.year()), i32::from(week.week()))
    });

    if let Some(verified) = sorted.iter().find(|b| b.verified) {
        keep.insert(verified.name.as_str());
    }

    let (kept, deleted): (Vec<&Candidate>, Vec<&Candidate>) =
        sorted.into_iter().partition(|b| keep.contains(b.name.as_str()));
    Plan {
        keep: kept.into_iter().map(|b| b.name.clone()).collect(),
        delete: deleted.into_iter().map(|b| b.name.clone()).collect(),
    }
}

/// Keeps the newest backup of each of the `count` most recent periods that have one.
fn keep_newest_per_period<'a>(
    newest_first: &[&'a Candidate],
    count: u32,
    keep: &mut BTreeSet<&'a str>,
    period: impl Fn(Timestamp) -> (i32, i32),
) {
    let mut seen = 0u32;
    let mut last = None;
    for backup in newest_first {
        if seen >= count {
            break;
        }
        let this = period(backup.time);
        if last != Some(this) {
            last = Some(this);
            seen += 1;
            keep.insert(backup.name.as_str());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn month_every_6h() -> Vec<Candidate> {
        // 2026-10-01T00:00Z .. 2026-10-31T18:00Z: 124 backups.
        let start = at("2026-10-01T00:00:00Z");
        (0..124)
            .map(|i| {
                let time = start + jiff::SignedDuration::from_hours(6 * i);
                Candidate { name: format!("b{:03}-{}", i, time), time, verified: false }
            })
            .collect()
    }

    fn names(plan: &Plan) -> Vec<String> {
        plan.keep.iter().map(|n| n[5..].to_owned()).collect()
    }

    #[test]
    fn a_month_every_six_hours() {
        let backups = month_every_6h();
        let policy = Retention { keep_last: 4, keep_daily: 7, keep_weekly: 4 };
        let plan = plan(&backups, &policy);
        // Last 4: the whole of Oct 31. Daily 7: the 18:00 of Oct 31..25. Weekly 4: the newest of ISO weeks 44
        // (Oct 26-Nov 1: Oct 31 18:00), 43 (Oct 19-25: Oct 25 18:00), 42 (Oct 12-18: Oct 18 18:00) and
        // 41 (Oct 5-11: Oct 11 18:00).
        let expected = [
            "2026-10-31T18:00:00Z",
            "2026-10-31T12:00:00Z",
            "2026-10-31T06:00:00Z",
            "2026-10-31T00:00:00Z",
            "2026-10-30T18:00:00Z",
            "2026-10-29T18:00:00Z",
            "2026-10-28T18:00:00Z",
            "2026-10-27T18:00:00Z",
            "2026-10-26T18:00:00Z",
            "2026-10-25T18:00:00Z",
            "2026-10-18T18:00:00Z",
            "2026-10-11T18:00:00Z",
        ];
        assert_eq!(names(&plan), expected);
        assert_eq!(plan.keep.len() + plan.delete.len(), 124);
        assert!(!plan.delete.iter().any(|n| n.ends_with("2026-10-31T18:00:00Z")));
    }

    #[test]
    fn never_deletes_the_newest_and_ignores_input_order() {
        let mut backups = month_every_6h();
        backups.reverse();
        let plan = plan(&backups, &Retention { keep_last: 0, keep_daily: 0, keep_weekly: 0 });
        assert_eq!(names(&plan), ["2026-10-31T18:00:00Z"]);
        assert_eq!(plan.delete.len(), 123);
    }

    #[test]
    fn keeps_the_newest_verified_backup_besides_the_newest() {
        let mut backups = month_every_6h();
        // Verified: one from Oct 2 and an older one; the newer is kept whatever the policy.
        backups[4].verified = true;
        backups[2].verified = true;
        let plan = plan(&backups, &Retention { keep_last: 2, keep_daily: 0, keep_weekly: 0 });
        assert_eq!(names(&plan), ["2026-10-31T18:00:00Z", "2026-10-31T12:00:00Z", "2026-10-02T00:00:00Z"]);
        assert_eq!(plan.delete.len(), 121);
        // A verified backup already kept by the policy adds nothing.
        backups[123].verified = true;
        let plan = super::plan(&backups, &Retention { keep_last: 2, keep_daily: 0, keep_weekly: 0 });
        assert_eq!(names(&plan), ["2026-10-31T18:00:00Z", "2026-10-31T12:00:00Z"]);
    }

    #[test]
    fn empty_input() {
        assert_eq!(plan(&[], &Retention::default()), Plan::default());
    }
}
