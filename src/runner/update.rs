//! `spec.pack.update`: how often a pack that follows a hub channel is checked for a new version, and
//! when a new one may be applied.

use std::time::Duration;

use jiff::civil::Weekday;

use crate::api::{PackSpec, UpdateMode, UpdatePolicy};

/// How often the source is checked when `interval` is omitted.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
/// The shortest interval taken: a hub is not polled more often than this.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest interval taken (168h): a longer one is checked this often.
const MAX_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The checks a pack spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Time between two checks.
    pub interval: Duration,
    /// Apply what a check finds (`auto`), or only report it (`manual`).
    pub auto: bool,
    /// When an update may be applied; `None`: any time.
    pub window: Option<Window>,
    /// Apply only while nobody is online.
    pub require_no_players: bool,
}

impl Schedule {
    /// The checks `pack` asks for: only a hub source followed on its channel (no pinned version) can
    /// change under the same spec, so any other pack has none.
    pub fn of(pack: &PackSpec) -> Result<Option<Self>, String> {
        let Some(policy) = &pack.update else { return Ok(None) };
        let schedule = Self::parse(policy)?;
        Ok(super::prepare::follows_channel(pack).then_some(schedule))
    }

    /// Parses a policy, whatever its source.
    pub fn parse(policy: &UpdatePolicy) -> Result<Self, String> {
        let interval = match &policy.interval {
            Some(text) => parse_interval(text)
                .map_err(|e| format!("spec.pack.update.interval {text:?}: {e}; write it like 30s, 5m or 1h30m"))?,
            None => DEFAULT_INTERVAL,
        };
        let window = match &policy.window {
            Some(text) => Some(Window::parse(text).map_err(|e| {
                format!(
                    "spec.pack.update.window {text:?}: {e}; write it like \"Sat,Sun 02:00-06:00\" or \"03:00-05:00\""
                )
            })?),
            None => None,
        };
        Ok(Self {
            interval: interval.clamp(MIN_INTERVAL, MAX_INTERVAL),
            auto: policy.mode == UpdateMode::Auto,
            window,
            require_no_players: policy.require_no_players,
        })
    }

    /// Whether `now` (the server's local time) is inside the window.
    pub fn window_allows(&self, now: &jiff::Zoned) -> bool {
        self.window.as_ref().is_none_or(|w| w.contains(now.weekday(), minute_of_day(now)))
    }
}

fn minute_of_day(now: &jiff::Zoned) -> u16 {
    u16::try_from(now.hour()).unwrap_or(0) * 60 + u16::try_from(now.minute()).unwrap_or(0)
}

/// `30s`, `5m`, `1h30m`: one or more numbers, each with a unit.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(format!("{c:?} is not a unit (s, m or h)")),
        };
        let n: u64 = digits.parse().map_err(|_| format!("a number must come before {c:?}"))?;
        total = n.checked_mul(unit).and_then(|secs| total.checked_add(Duration::from_secs(secs))).ok_or("too long")?;
        digits.clear();
    }
    if !digits.is_empty() || text.is_empty() {
        return Err("every number needs a unit (s, m or h)".into());
    }
    Ok(total)
}

/// Why `TZ` (set, not empty) names no time zone this system knows, for people; `None` when it is
/// unset or known. jiff would read such a zone as UTC (`Etc/Unknown`) without a word, and with it
/// every update window.
pub fn unknown_time_zone() -> Option<String> {
    let zone = std::env::var_os("TZ")?;
    // jiff's error retells its whole search; the name is what the reader must fix.
    match jiff::tz::TimeZone::try_system() {
        Ok(_) => None,
        Err(_) => Some(format!("TZ={:?} is not a time zone this system knows", zone.to_string_lossy())),
    }
}

/// Days of the week and a time range, `Sat,Sun 02:00-06:00`. A range whose end comes before its start
/// runs past midnight into the next day (the days name the day it starts on); a range ending where it
/// starts is the whole day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bit `n` set: the window opens on the `n`th day from Monday. All set when no day is given.
    days: u8,
    /// Minutes after midnight.
    start: u16,
    end: u16,
}

const DAYS: [(&str, Weekday); 7] = [
    ("Mon", Weekday::Monday),
    ("Tue", Weekday::Tuesday),
    ("Wed", Weekday::Wednesday),
    ("Thu", Weekday::Thursday),
    ("Fri", Weekday::Friday),
    ("Sat", Weekday::Saturday),
    ("Sun", Weekday::Sunday),
];

fn day_bit(day: Weekday) -> u8 {
    1 << (day.to_monday_zero_offset() as u8)
}

impl Window {
    /// Parses `[DAY[,DAY...] ]HH:MM-HH:MM`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (days, range) = match text.trim().split_once(' ') {
            Some((days, range)) => (Some(days), range.trim()),
            None => (None, text.trim()),
        };
        let days = match days {
            None => 0x7f,
            Some(list) => list.split(',').try_fold(0u8, |bits, name| {
                DAYS.iter()
                    .find(|(short, _)| *short == name)
                    .map(|(_, day)| bits | day_bit(*day))
                    .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, ... Sun)"))
            })?,
        };
        let (start, end) = range.split_once('-').ok_or("the time range needs a '-'")?;
        Ok(Self { days, start: parse_time(start)?, end: parse_time(end)? })
    }

    /// Whether the window is open at `minute` (after midnight) on `day`.
    pub fn contains(&self, day: Weekday, minute: u16) -> bool {
        let opens_on = |d: Weekday| self.days & day_bit(d) != 0;
        if self.start < self.end {
            opens_on(day) && (self.start..self.end).contains(&minute)
        } else if self.start == self.end {
            opens_on(day)
        } else {
            (opens_on(day) && minute >= self.start) || (opens_on(day.previous()) && minute < self.end)
        }
    }
}

fn parse_time(text: &str) -> Result<u16, String> {
    let bad = || format!("{text:?} is not a time (HH:MM, 00:00 to 23:59)");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || text.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_add_their_parts_and_refuse_a_missing_unit() {
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_interval("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_interval("5").is_err());
        assert!(parse_interval("m").is_err());
        assert!(parse_interval("5d").is_err());
        assert!(parse_interval("").is_err());
        assert!(parse_interval("99999999999999999999s").is_err(), "over u64");
        assert!(parse_interval("18446744073709551615s1s").is_err(), "an overflowing sum");
        assert!(parse_interval("18446744073709551615m").is_err(), "an overflowing product");
    }

    #[test]
    fn a_window_opens_on_its_days_between_its_times() -> Result<(), String> {
        let w = Window::parse("Sat,Sun 02:00-06:00")?;
        assert!(w.contains(Weekday::Saturday, 2 * 60));
        assert!(w.contains(Weekday::Sunday, 5 * 60 + 59));
        assert!(!w.contains(Weekday::Sunday, 6 * 60), "the end is not inside");
        assert!(!w.contains(Weekday::Saturday, 60 + 59));
        assert!(!w.contains(Weekday::Friday, 3 * 60));
        let any_day = Window::parse("03:00-05:00")?;
        assert!(any_day.contains(Weekday::Wednesday, 4 * 60));
        Ok(())
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_opens() -> Result<(), String> {
        let w = Window::parse("Fri 23:00-01:00")?;
        assert!(w.contains(Weekday::Friday, 23 * 60 + 30));
        assert!(w.contains(Weekday::Saturday, 30), "Friday's window runs into Saturday");
        assert!(!w.contains(Weekday::Friday, 30), "Thursday's night is not Friday's window");
        assert!(!w.contains(Weekday::Saturday, 23 * 60 + 30));
        let whole = Window::parse("Mon 04:00-04:00")?;
        assert!(whole.contains(Weekday::Monday, 0) && !whole.contains(Weekday::Tuesday, 0));
        Ok(())
    }

    #[test]
    fn bad_windows_say_what_is_wrong() {
        assert!(Window::parse("Sat 2:00-06:00").is_err_and(|e| e.contains("\"2:00\"")));
        assert!(Window::parse("Caturday 02:00-06:00").is_err_and(|e| e.contains("Caturday")));
        assert!(Window::parse("02:00").is_err_and(|e| e.contains('-')));
        assert!(Window::parse("24:00-01:00").is_err());
    }

    #[test]
    fn only_a_hub_followed_on_its_channel_is_checked() -> Result<(), String> {
        let yaml = |source: &str, version: &str| {
            format!("source: {source}\n{version}update: {{mode: auto, interval: 2m, window: \"Sat 02:00-06:00\"}}\n")
        };
        let hub = "{hub: {url: \"http://127.0.0.1:1\", pack: p, channel: stable}}";
        let url = format!("{{url: {{url: \"http://127.0.0.1:1/p.tar.zst\", sha256: \"{}\"}}}}", "a".repeat(64));
        let parse = |text: String| serde_yaml::from_str::<PackSpec>(&text).map_err(|e| e.to_string());
        let schedule = Schedule::of(&parse(yaml(hub, ""))?)?.ok_or("a followed channel has checks")?;
        assert_eq!(schedule.interval, Duration::from_secs(120));
        assert!(schedule.auto && schedule.window.is_some() && !schedule.require_no_players);
        assert_eq!(Schedule::of(&parse(yaml(hub, "version: \"1.0.0\"\n"))?)?, None, "a pinned version");
        let weekly = parse(yaml(hub, "").replace("interval: 2m", "interval: 200h"))?;
        assert_eq!(Schedule::of(&weekly)?.map(|s| s.interval), Some(MAX_INTERVAL), "at most weekly");
        assert_eq!(Schedule::of(&parse(yaml(&url, ""))?)?, None, "a url names one archive");
        Ok(())
    }
}
