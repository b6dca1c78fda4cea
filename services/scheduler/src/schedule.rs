//! When a job fires: cron with seconds read in a time zone, or a fixed rate.
//!
//! Kept here, not in the mesh library: the time-zone database is large, and
//! only the scheduler (and meshctl, which checks jobs before writing them)
//! needs it. [`install_checks`] adds the schedule checks to every validation
//! of the settings, the config center's included.

use std::str::FromStr;

use crate::settings::JobSpec;
use chrono::{TimeZone, Utc};

/// When a job fires: a cron expression read in a time zone, or a fixed rate.
/// Slots are instants in milliseconds since the epoch; every scheduler
/// computes the same slots, so a slot names one firing across leaders.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<cron::Schedule>,
        tz: chrono_tz::Tz,
    },
    /// Slots at every multiple of this many milliseconds.
    Every(u64),
}

impl Schedule {
    /// Reads a job's schedule; the error names the setting and the problem.
    pub fn from_spec(job: &JobSpec) -> Result<Self, (&'static str, String)> {
        let tz = chrono_tz::Tz::from_str(&job.time_zone)
            .map_err(|_| ("time_zone", format!("{:?} is not an IANA time zone like Asia/Shanghai", job.time_zone)))?;
        let schedule = match (job.cron.trim().is_empty(), job.every_ms) {
            (true, 0) => return Err(("cron", "set cron or every_ms".into())),
            (false, n) if n > 0 => return Err(("every_ms", "set cron or every_ms, not both".into())),
            (true, n) if n < 100 => return Err(("every_ms", format!("{n} is below 100"))),
            (true, n) => Schedule::Every(n),
            (false, _) => {
                let fields = job.cron.split_whitespace().count();
                if !(6..=7).contains(&fields) {
                    return Err((
                        "cron",
                        format!(
                            "{:?} has {fields} fields; expected sec min hour day-of-month month day-of-week [year]",
                            job.cron
                        ),
                    ));
                }
                let cron = cron::Schedule::from_str(&job.cron)
                    .map_err(|e| ("cron", format!("{:?} is not a cron expression: {e}", job.cron)))?;
                Schedule::Cron { cron: Box::new(cron), tz }
            }
        };
        if schedule.next_after(Utc::now().timestamp_millis()).is_none() {
            return Err(("cron", format!("{:?} never fires again", job.cron)));
        }
        Ok(schedule)
    }

    /// The first slot strictly after `after_ms`, or none if it never fires again.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(every) => {
                let every = i64::try_from(*every).ok()?;
                Some((after_ms.div_euclid(every) + 1) * every)
            }
            Schedule::Cron { cron, tz } => {
                let after = tz.timestamp_millis_opt(after_ms).single()?;
                cron.after(&after).next().map(|t| t.timestamp_millis())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn job(cron: &str, tz: &str, every_ms: u64) -> JobSpec {
        JobSpec { cron: cron.into(), time_zone: tz.into(), every_ms, ..JobSpec::default() }
    }

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn cron_with_seconds_fires_on_its_slots_in_its_time_zone() {
        let every5 = Schedule::from_spec(&job("0/5 * * * * *", "UTC", 0)).unwrap();
        assert_eq!(every5.next_after(ms("2026-01-01T00:00:00Z")), Some(ms("2026-01-01T00:00:05Z")), "strictly after");
        assert_eq!(every5.next_after(ms("2026-01-01T00:00:03.500Z")), Some(ms("2026-01-01T00:00:05Z")));
        // 02:00 every day in Shanghai (UTC+8) is 18:00 UTC the day before.
        let daily = Schedule::from_spec(&job("0 0 2 * * *", "Asia/Shanghai", 0)).unwrap();
        assert_eq!(daily.next_after(ms("2026-03-01T12:00:00Z")), Some(ms("2026-03-01T18:00:00Z")));
        // Weekdays only: Saturday 2026-03-07 → Monday 2026-03-09.
        let weekdays = Schedule::from_spec(&job("0 30 9 * * MON-FRI", "UTC", 0)).unwrap();
        assert_eq!(weekdays.next_after(ms("2026-03-06T10:00:00Z")), Some(ms("2026-03-09T09:30:00Z")));
    }

    #[test]
    fn fixed_rate_slots_are_multiples_of_the_period() {
        let every = Schedule::from_spec(&job("", "UTC", 1500)).unwrap();
        assert_eq!(every.next_after(0), Some(1500));
        assert_eq!(every.next_after(1499), Some(1500));
        assert_eq!(every.next_after(1500), Some(3000));
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_setting() {
        let err = |j: JobSpec| Schedule::from_spec(&j).expect_err("must be refused");
        assert_eq!(err(job("", "UTC", 0)).0, "cron");
        assert_eq!(err(job("* * * * *", "UTC", 0)).0, "cron", "five fields: seconds are required");
        assert!(err(job("* * * * *", "UTC", 0)).1.contains("has 5 fields"));
        assert_eq!(err(job("0 0 25 * * *", "UTC", 0)).0, "cron");
        assert_eq!(err(job("0 0 1 * * * 2001", "UTC", 0)).1, "\"0 0 1 * * * 2001\" never fires again");
        assert_eq!(err(job("0 * * * * *", "Mars/Olympus", 0)).0, "time_zone");
        assert_eq!(err(job("0 * * * * *", "UTC", 1000)).0, "every_ms");
        assert_eq!(err(job("", "UTC", 10)).0, "every_ms");
    }
}
