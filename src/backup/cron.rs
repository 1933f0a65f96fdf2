//! Five-field cron schedules (`minute hour day-of-month month day-of-week`) and the `@hourly`-style
//! shorthands, with the next matching time: pure, no clock.
//!
//! Semantics as Vixie cron: `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, lists `a,b`, month and
//! weekday names (`jan`, `mon`), 0 and 7 both Sunday; when both day fields are restricted a day matching
//! either one matches.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{ToSpan, Zoned};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

/// Why a schedule did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cron schedule {schedule:?}: {reason} (expected five fields `minute hour day month weekday`, e.g. `0 */6 * * *`, or @hourly, @daily, @weekly, @monthly)"
)]
pub struct CronError {
    /// The schedule as written.
    pub schedule: String,
    /// What is wrong with it.
    pub reason: String,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    /// Parses a schedule.
    pub fn parse(schedule: &str) -> Result<Self, CronError> {
        let err = |reason: String| CronError { schedule: schedule.to_owned(), reason };
        let text = match schedule.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other if other.starts_with('@') => return Err(err(format!("unknown shorthand {other}"))),
            other => other,
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(err(format!("{} fields", fields.len())));
        };
        let weekdays = field(weekday, 0, 7, &WEEKDAYS, 0).map_err(&err)?;
        // 7 is Sunday too.
        let weekdays = (weekdays | (weekdays >> 7)) & 0x7f;
        Ok(Self {
            minutes: field(minute, 0, 59, &[], 0).map_err(&err)?,
            hours: field(hour, 0, 23, &[], 0).map_err(&err)?,
            days: field(day, 1, 31, &[], 0).map_err(&err)?,
            months: field(month, 1, 12, &MONTHS, 1).map_err(&err)?,
            weekdays,
            days_restricted: !day.starts_with('*'),
            weekdays_restricted: !weekday.starts_with('*'),
        })
    }

    fn day_matches(&self, date: Date) -> bool {
        let dom = self.days & (1 << date.day()) != 0;
        let dow = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first matching minute strictly after `after`, in `after`'s time zone. A time a clock change skips
    /// runs shifted by the gap (02:30 -> 03:30); a repeated hour runs once, at its first occurrence. `None`
    /// when nothing matches within 5 years (`0 0 30 2 *`).
    pub fn next_after(&self, after: &Zoned) -> Option<Zoned> {
        let tz: TimeZone = after.time_zone().clone();
        let start = after.datetime();
        // The next whole minute.
        let mut t = start.date().at(start.hour(), start.minute(), 0, 0).checked_add(1.minute()).ok()?;
        let limit = start.checked_add(5.years()).ok()?;
        while t < limit {
            if self.months & (1 << t.month()) == 0 {
                let first = t.date().first_of_month().checked_add(1.month()).ok()?;
                t = first.at(0, 0, 0, 0);
                continue;
            }
            if !self.day_matches(t.date()) {
                t = t.date().tomorrow().ok()?.at(0, 0, 0, 0);
                continue;
            }
            if self.hours & (1 << t.hour()) == 0 {
                t = next_hour(t)?;
                continue;
            }
            if self.minutes & (1 << t.minute()) == 0 {
                t = t.checked_add(1.minute()).ok()?;
                continue;
            }
            let zoned = tz.to_zoned(t).ok()?;
            // A repeated hour (clocks going back) would match twice; only times after `after` count.
            if zoned.timestamp() > after.timestamp() {
                return Some(zoned);
            }
            t = t.checked_add(1.minute()).ok()?;
        }
        None
    }
}

fn next_hour(t: DateTime) -> Option<DateTime> {
    t.date().at(t.hour(), 0, 0, 0).checked_add(1.hour()).ok()
}

/// Parses one field into a bit set over `min..=max`.
fn field(text: &str, min: u32, max: u32, names: &[&str], name_base: u32) -> Result<u64, String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(name_base + i as u32);
        }
        let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
        if n < min || n > max {
            return Err(format!("{n} is outside {min}-{max}"));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step.parse().map_err(|_| format!("step {step:?} is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".to_owned());
                }
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = match range {
            "*" => (min, max),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `5/15` means from 5 to the end, every 15.
                None if step > 1 => (value(range)?, max),
                None => {
                    let v = value(range)?;
                    (v, v)
                }
            },
        };
        if low > high {
            return Err(format!("the range {range} runs backwards"));
        }
        let mut v = low;
        while v <= high {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl Cron {
    /// The longest time between two consecutive runs among the next `runs` after `after`: how old
    /// the newest scheduled backup may get when every run succeeds (alerts compare against it).
    /// `None` when the schedule never matches.
    pub fn longest_gap(&self, after: &Zoned, runs: usize) -> Option<std::time::Duration> {
        let mut previous = self.next_after(after)?;
        let mut longest = std::time::Duration::ZERO;
        for _ in 1..runs.max(2) {
            let next = self.next_after(&previous)?;
            let gap = std::time::Duration::try_from(next.timestamp().duration_since(previous.timestamp())).ok()?;
            longest = longest.max(gap);
            previous = next;
        }
        Some(longest)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn next(schedule: &str, after: &str) -> String {
        let after: Zoned = after.parse().unwrap();
        Cron::parse(schedule).unwrap().next_after(&after).unwrap().to_string()
    }

    #[test]
    fn next_times() {
        let utc = |s: &str| format!("{s}+00:00[UTC]");
        assert_eq!(next("0 */6 * * *", &utc("2026-11-26T10:41:00")), utc("2026-11-26T12:00:00"));
        assert_eq!(next("* * * * *", &utc("2026-11-26T10:41:30")), utc("2026-11-26T10:42:00"));
        assert_eq!(next("@daily", &utc("2026-12-31T23:59:00")), utc("2027-01-01T00:00:00"));
        assert_eq!(next("30 2 * * mon-fri", &utc("2026-11-27T03:00:00")), utc("2026-11-30T02:30:00"));
        assert_eq!(next("0 0 29 feb *", &utc("2026-03-01T00:00:00")), utc("2028-02-29T00:00:00"));
        assert_eq!(next("5/20 * * * *", &utc("2026-11-26T10:26:00")), utc("2026-11-26T10:45:00"));
        assert_eq!(next("@weekly", &utc("2026-11-26T10:00:00")), utc("2026-11-29T00:00:00"));
        assert_eq!(next("0 12 * * 7", &utc("2026-11-26T10:00:00")), utc("2026-11-29T12:00:00"));
        // Both day fields restricted: either matches (the 1st, or a Friday).
        assert_eq!(next("0 0 1 * fri", &utc("2026-11-26T10:00:00")), utc("2026-11-27T00:00:00"));
        assert_eq!(next("0 0 1,15 * *", &utc("2026-11-26T10:00:00")), utc("2026-12-01T00:00:00"));
    }

    #[test]
    fn the_longest_gap_covers_uneven_schedules() {
        let after: Zoned = "2026-11-26T10:41:00+00:00[UTC]".parse().unwrap();
        let gap = |schedule: &str| Cron::parse(schedule).unwrap().longest_gap(&after, 16).unwrap().as_secs();
        assert_eq!(gap("0 */6 * * *"), 6 * 3600);
        assert_eq!(gap("@daily"), 24 * 3600);
        // Weekdays only: the weekend makes a three-day gap.
        assert_eq!(gap("30 2 * * mon-fri"), 3 * 24 * 3600);
        assert_eq!(gap("0 3,9 * * *"), 18 * 3600);
    }

    #[test]
    fn clock_changes() {
        // Europe/Berlin skips 02:00-03:00 on 2026-03-29 and repeats 02:00-03:00 on 2026-10-25.
        let spring = next("30 2 * * *", "2026-03-29T01:00:00+01:00[Europe/Berlin]");
        assert_eq!(spring, "2026-03-29T03:30:00+02:00[Europe/Berlin]");
        let autumn = next("30 2 * * *", "2026-10-25T01:00:00+02:00[Europe/Berlin]");
        assert_eq!(autumn, "2026-10-25T02:30:00+02:00[Europe/Berlin]");
        let after = next("30 2 * * *", "2026-10-25T02:40:00+02:00[Europe/Berlin]");
        assert_eq!(after, "2026-10-26T02:30:00+01:00[Europe/Berlin]");
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "*/0 * * * *",
            "5-1 * * * *",
            "@often",
            "x * * * *",
        ] {
            let err = Cron::parse(bad).unwrap_err();
            assert!(err.to_string().contains("expected five fields"), "{bad}: {err}");
        }
        assert!(
            Cron::parse("0 0 30 2 *").unwrap().next_after(&"2026-01-01T00:00:00+00:00[UTC]".parse().unwrap()).is_none()
        );
    }
}
