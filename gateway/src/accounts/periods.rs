//! Budget periods: calendar days, weeks (from Monday) and months in the operator's time zone
//! (an offset from UTC), and the clock they are read by, which tests set by hand.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

/// Where the time comes from: the system's, or one a test moves.
pub trait Clock: Send + Sync {
    /// Unix milliseconds.
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that says what it was last told: time passes in a test without sleeping.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(now_ms: u64) -> Self {
        ManualClock(AtomicU64::new(now_ms))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A budget period.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    /// From Monday 00:00 to the next Monday.
    Week,
    /// From the 1st 00:00 to the next month's 1st.
    Month,
}

impl Period {
    pub const ALL: [Period; 3] = [Period::Day, Period::Week, Period::Month];

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period that holds `now_ms`, in the zone `utc_offset_minutes` east of UTC.
    pub fn window(self, now_ms: u64, utc_offset_minutes: i32) -> Window {
        let offset = i64::from(utc_offset_minutes) * MINUTE_MS;
        let local = i64::try_from(now_ms).unwrap_or(i64::MAX) + offset;
        let day = local.div_euclid(DAY_MS);
        let (start_day, end_day) = match self {
            Period::Day => (day, day + 1),
            Period::Week => {
                // 1970-01-01 was a Thursday: three days after a Monday.
                let monday = day - (day + 3).rem_euclid(7);
                (monday, monday + 7)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
            }
        };
        let (y, m, d) = civil_from_days(start_day);
        let label = match self {
            Period::Month => format!("{y:04}-{m:02}"),
            _ => format!("{y:04}-{m:02}-{d:02}"),
        };
        let utc = |local_day: i64| u64::try_from(local_day * DAY_MS - offset).unwrap_or(0);
        Window {
            period: self,
            name: format!("{}:{label}", self.as_str()),
            start_ms: utc(start_day),
            end_ms: utc(end_day),
        }
    }
}

/// One period of a budget: its name (`day:2026-12-07`, `week:2026-12-07` for the week of that
/// Monday, `month:2026-12`, local dates) and its bounds in Unix ms (start included, end not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub period: Period,
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Window {
    /// Whole seconds until the period ends (at least 1: `retry-after` of 0 invites a storm).
    pub fn secs_left(&self, now_ms: u64) -> u64 {
        self.end_ms.saturating_sub(now_ms).div_ceil(1000).max(1)
    }
}

/// Year, month (1..=12) and day of a count of days since 1970-01-01 (proleptic Gregorian;
/// Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a date (`days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC date and time.
    fn utc(y: i64, m: u32, d: u32, h: i64, min: i64) -> u64 {
        (days_from_civil(y, m, d) * DAY_MS + h * 3_600_000 + min * MINUTE_MS) as u64
    }

    #[test]
    fn days_round_trip() {
        for days in [-800_000, -1, 0, 1, 11_016, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn a_day_ends_at_local_midnight() {
        // 2026-12-07 21:30 UTC is 2026-12-07 23:30 at UTC+2: the day ends at 22:00 UTC.
        let now = utc(2026, 12, 7, 21, 30);
        let day = Period::Day.window(now, 120);
        assert_eq!(day.name, "day:2026-12-07");
        assert_eq!(day.start_ms, utc(2026, 12, 6, 22, 0));
        assert_eq!(day.end_ms, utc(2026, 12, 7, 22, 0));
        assert_eq!(day.secs_left(now), 30 * 60);
        // Half an hour later it is the 8th there.
        let next = Period::Day.window(utc(2026, 12, 7, 22, 0), 120);
        assert_eq!(next.name, "day:2026-12-08");
        // West of UTC, the day is still the 7th when UTC's is the 8th.
        let west = Period::Day.window(utc(2026, 12, 8, 3, 0), -300);
        assert_eq!(west.name, "day:2026-12-07");
        assert_eq!(west.end_ms, utc(2026, 12, 8, 5, 0));
    }

    #[test]
    fn a_week_runs_monday_to_monday() {
        // 2026-12-07 is a Monday.
        let sunday_night = utc(2026, 12, 6, 23, 59);
        let week = Period::Week.window(sunday_night, 0);
        assert_eq!(week.name, "week:2026-11-30");
        assert_eq!(week.end_ms, utc(2026, 12, 7, 0, 0));
        let monday = Period::Week.window(utc(2026, 12, 7, 0, 0), 0);
        assert_eq!(monday.name, "week:2026-12-07");
        assert_eq!(monday.start_ms, utc(2026, 12, 7, 0, 0));
        assert_eq!(monday.end_ms, utc(2026, 12, 14, 0, 0));
        // Sunday 23:30 UTC is already Monday at UTC+1.
        let east = Period::Week.window(utc(2026, 12, 6, 23, 30), 60);
        assert_eq!(east.name, "week:2026-12-07");
        // The epoch's Thursday belongs to the week of Monday 1969-12-29.
        assert_eq!(Period::Week.window(0, 0).name, "week:1969-12-29");
    }

    #[test]
    fn months_end_on_their_last_day_leap_years_included() {
        let feb = Period::Month.window(utc(2028, 2, 29, 12, 0), 0);
        assert_eq!(feb.name, "month:2028-02");
        assert_eq!(feb.end_ms, utc(2028, 3, 1, 0, 0));
        let feb = Period::Month.window(utc(2027, 2, 28, 23, 59), 0);
        assert_eq!(feb.end_ms, utc(2027, 3, 1, 0, 0));
        let dec = Period::Month.window(utc(2026, 12, 31, 23, 0), 0);
        assert_eq!(dec.name, "month:2026-12");
        assert_eq!(dec.end_ms, utc(2027, 1, 1, 0, 0));
        // New Year at UTC+9 comes nine hours before UTC's.
        let tokyo = Period::Month.window(utc(2026, 12, 31, 15, 0), 540);
        assert_eq!(tokyo.name, "month:2027-01");
        assert_eq!(tokyo.start_ms, utc(2026, 12, 31, 15, 0));
    }

    #[test]
    fn the_manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(500);
        assert_eq!(clock.now_ms(), 1_500);
        clock.set(7);
        assert_eq!(clock.now_ms(), 7);
    }
}
