//! Arrival history of a function and the forecast of its next burst.
//!
//! Arrivals closer than `burst_gap` to the previous one belong to the same
//! burst. A burst remembers when it started, its last arrival and its demand:
//! the most invocations in flight at once during it. The function is
//! *periodic* when at least [`MIN_BURSTS`] bursts are known and the
//! intervals between the starts of the last [`MAX_INTERVALS`] + 1 of them all
//! lie within `tolerance` of their median; the median is the period. The next
//! burst is then expected at the last start plus the period, needing the
//! largest demand of those bursts. A forecast lapses once the expected burst
//! is later than `tolerance` of a period overdue, until the history shows a
//! pattern again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bursts needed before a pattern is trusted (two intervals that agree).
pub(crate) const MIN_BURSTS: usize = 3;
/// Intervals compared for the pattern: the most recent ones.
pub(crate) const MAX_INTERVALS: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Burst {
    start: Instant,
    last: Instant,
    demand: usize,
}

/// Recent bursts of one function.
#[derive(Debug, Default)]
pub(crate) struct Arrivals {
    bursts: VecDeque<Burst>,
}

/// What the history says about the next burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Forecast {
    /// Median interval between burst starts.
    pub period: Duration,
    /// When the next burst should start.
    pub next: Instant,
    /// Sandboxes it should need at once.
    pub demand: usize,
    /// The latest arrival seen.
    pub last_arrival: Instant,
}

/// Where `now` lies relative to a forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Within `lead` of the next burst (or a little late for it): have
    /// `demand` sandboxes ready.
    Prewarm,
    /// Between bursts, with this long until the pre-warm window opens.
    Gap(Duration),
    /// In a burst, or no usable forecast.
    Other,
}

impl Arrivals {
    /// An invocation arrived at `now` with `in_flight` invocations (itself
    /// included) running or waiting.
    pub(crate) fn record(&mut self, now: Instant, in_flight: usize, burst_gap: Duration) {
        match self.bursts.back_mut() {
            Some(b) if now.saturating_duration_since(b.last) < burst_gap => {
                b.last = b.last.max(now);
                b.demand = b.demand.max(in_flight);
            }
            _ => {
                self.bursts.push_back(Burst {
                    start: now,
                    last: now,
                    demand: in_flight.max(1),
                });
                while self.bursts.len() > MAX_INTERVALS + 1 {
                    self.bursts.pop_front();
                }
            }
        }
    }

    /// The forecast, when the recent bursts are periodic within `tolerance`
    /// (a fraction of the period, e.g. 0.25).
    pub(crate) fn forecast(&self, tolerance: f64) -> Option<Forecast> {
        if self.bursts.len() < MIN_BURSTS {
            return None;
        }
        let starts: Vec<Instant> = self.bursts.iter().map(|b| b.start).collect();
        let mut intervals: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        intervals.sort();
        let period = intervals[intervals.len() / 2];
        if period.is_zero() {
            return None;
        }
        let slack = period.mul_f64(tolerance);
        if intervals.iter().any(|d| d.abs_diff(period) > slack) {
            return None;
        }
        let last = self.bursts.back()?;
        Some(Forecast {
            period,
            next: last.start + period,
            demand: self.bursts.iter().map(|b| b.demand).max().unwrap_or(1),
            last_arrival: last.last,
        })
    }
}

impl Forecast {
    /// The phase at `now`: the pre-warm window opens `lead` before the next
    /// burst and closes `tolerance` of a period after it; the gap starts
    /// `burst_gap` after the last arrival.
    pub(crate) fn phase(
        &self,
        now: Instant,
        lead: Duration,
        burst_gap: Duration,
        tolerance: f64,
    ) -> Phase {
        let lead = lead.min(self.period / 2);
        let open = self.next.checked_sub(lead).unwrap_or(self.next);
        let close = self.next + self.period.mul_f64(tolerance);
        if now >= open && now <= close {
            Phase::Prewarm
        } else if now < open && now >= self.last_arrival + burst_gap {
            Phase::Gap(open - now)
        } else {
            Phase::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_secs(1);
    const S: fn(u64) -> Duration = Duration::from_secs;

    fn bursts(t0: Instant, starts: &[u64], size: usize) -> Arrivals {
        let mut a = Arrivals::default();
        for &s in starts {
            for i in 0..size {
                a.record(t0 + S(s) + Duration::from_millis(10 * i as u64), i + 1, GAP);
            }
        }
        a
    }

    #[test]
    fn two_bursts_are_not_a_pattern_three_are() {
        let t0 = Instant::now();
        assert_eq!(bursts(t0, &[0, 60], 2).forecast(0.25), None);
        let f = bursts(t0, &[0, 60, 121], 3).forecast(0.25).unwrap();
        assert_eq!(f.next, t0 + S(121) + f.period);
        assert!(f.period == S(60) || f.period == S(61), "{f:?}");
        assert_eq!(f.demand, 3);
        assert_eq!(f.last_arrival, t0 + S(121) + Duration::from_millis(20));
    }

    #[test]
    fn irregular_arrivals_have_no_forecast() {
        let t0 = Instant::now();
        assert_eq!(bursts(t0, &[0, 10, 60, 65, 200], 1).forecast(0.25), None);
    }

    #[test]
    fn only_recent_intervals_count() {
        let t0 = Instant::now();
        // An old irregular start, then a steady 30 s rhythm.
        let a = bursts(t0, &[0, 7, 37, 67, 97, 127], 1);
        assert_eq!(a.forecast(0.25).unwrap().period, S(30));
    }

    #[test]
    fn phases_around_the_next_burst() {
        let t0 = Instant::now();
        let f = bursts(t0, &[0, 60, 120], 2).forecast(0.25).unwrap();
        let lead = S(5);
        let at = |s: u64| f.phase(t0 + S(s), lead, GAP, 0.25);
        assert_eq!(at(120), Phase::Other, "still in the burst");
        assert_eq!(at(130), Phase::Gap(S(45)));
        assert_eq!(at(175), Phase::Prewarm);
        assert_eq!(at(180), Phase::Prewarm);
        assert_eq!(at(195), Phase::Prewarm, "a little late");
        assert_eq!(at(196), Phase::Other, "lapsed");
    }
}
