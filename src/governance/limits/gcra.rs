//! The generic cell rate algorithm over one number per counter: its
//! theoretical arrival time (TAT), in microseconds.
//!
//! A limit of `L` per minute spaces its cells `60 s / L` apart and lets a
//! fresh counter take the whole minute at once (burst = `L`). A request of
//! cost `n` (1 for requests, its tokens for tokens) moves the TAT by
//! `n × 60 s / L`, rounded down to a microsecond; it is admitted when the
//! moved TAT is within one minute of now. The same integer rule runs in the
//! Redis script (`redis.rs`), on Redis's clock, so one limit behaves alike in
//! both stores. Rounding down per request (not per cell) keeps the burst
//! exact: `L` requests at once move the TAT by at most one minute, so all `L`
//! are admitted and the next is refused (for limits up to 7,745 per minute;
//! above, a limit of `L` may admit `L × L / 60,000,000` more, e.g. 0.1 % at
//! 60,000; a request of many tokens rounds once, so token limits stay exact
//! to a microsecond's worth of tokens per request).

/// The window every limit is per: one minute.
pub const WINDOW_US: u64 = 60_000_000;

/// How far a request of `cost` moves a TAT under a limit of `limit` per minute
/// (at least 1 µs for a non-zero cost, so a cost is never free).
pub fn increment(limit: u64, cost: u64) -> u64 {
    if cost == 0 {
        return 0;
    }
    let inc = u128::from(cost) * u128::from(WINDOW_US) / u128::from(limit.max(1));
    u64::try_from(inc).unwrap_or(u64::MAX).max(1)
}

/// Why a request does not fit a rate limit now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It fits after this many microseconds.
    Wait(u64),
    /// It never fits: its cost is more than the whole minute's allowance.
    Never,
}

/// The TAT after admitting a move of `inc` at `now`, or why not.
pub fn admit(tat: u64, now: u64, inc: u64) -> Result<u64, Refusal> {
    if inc > WINDOW_US {
        return Err(Refusal::Never);
    }
    let new = tat.max(now).saturating_add(inc);
    let horizon = now.saturating_add(WINDOW_US);
    if new <= horizon {
        Ok(new)
    } else {
        Err(Refusal::Wait(new - horizon))
    }
}

/// The TAT after charging `inc` regardless of the limit (output tokens,
/// settled after the response): the counter may go into debt, which delays
/// the next requests.
pub fn charge(tat: u64, now: u64, inc: u64) -> u64 {
    tat.max(now).saturating_add(inc)
}

/// What is left of the minute's allowance at `now` (0 while in debt).
pub fn remaining(tat: u64, now: u64, limit: u64) -> u64 {
    let room = now.saturating_add(WINDOW_US).saturating_sub(tat.max(now));
    u64::try_from(u128::from(room) * u128::from(limit) / u128::from(WINDOW_US)).unwrap_or(u64::MAX)
}

/// Microseconds until the counter is back to its full allowance.
pub fn reset(tat: u64, now: u64) -> u64 {
    tat.saturating_sub(now)
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it:
/// `20ms`, `1s`, `6m0s`, `1h2m3s` (whole seconds rounded up past one second).
pub fn duration_text(us: u64) -> String {
    if us < 1_000_000 {
        return format!("{}ms", us.div_ceil(1000));
    }
    let s = us.div_ceil(1_000_000);
    let (h, m, s) = (s / 3600, (s % 3600) / 60, s % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A fresh counter admits exactly its burst (the whole minute) at once,
    /// for limits that do and do not divide the minute (up to 7,745).
    #[test]
    fn burst_is_exactly_the_limit() {
        for limit in [1u64, 3, 7, 60, 61, 997, 7_745] {
            let now = 5_000_000;
            let inc = increment(limit, 1);
            let mut tat = 0;
            for i in 0..limit {
                tat = admit(tat, now, inc)
                    .unwrap_or_else(|e| panic!("limit {limit}: request {i} refused: {e:?}"));
            }
            assert!(
                admit(tat, now, inc).is_err(),
                "limit {limit}: one more than the burst was admitted"
            );
            assert_eq!(remaining(tat, now, limit), 0);
        }
    }

    #[test]
    fn refusal_says_when_it_fits() {
        let now = 1_000;
        let inc = increment(60, 1); // one a second
        let mut tat = 0;
        for _ in 0..60 {
            tat = admit(tat, now, inc).unwrap();
        }
        let Err(Refusal::Wait(w)) = admit(tat, now, inc) else {
            panic!("not refused")
        };
        assert_eq!(w, 1_000_000);
        assert!(admit(tat, now + w - 1, inc).is_err());
        assert!(admit(tat, now + w, inc).is_ok());
        assert_eq!(remaining(tat, now + 2_500_000, 60), 2);
        assert_eq!(reset(tat, now), 60_000_000);
    }

    #[test]
    fn tokens_over_the_minute_never_fit_and_debt_delays() {
        let now = 0;
        assert_eq!(admit(0, now, increment(1000, 1001)), Err(Refusal::Never));
        let tat = admit(0, now, increment(1000, 600)).unwrap();
        // 900 output tokens settled: 500 into debt.
        let tat = charge(tat, now, increment(1000, 900));
        assert_eq!(remaining(tat, now, 1000), 0);
        let Err(Refusal::Wait(w)) = admit(tat, now, increment(1000, 100)) else {
            panic!("a request in debt was admitted")
        };
        assert_eq!(w, 36_000_000); // 600 tokens at 1000 a minute
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        assert_eq!(increment(1, u64::MAX), u64::MAX);
        assert_eq!(charge(u64::MAX - 1, 0, u64::MAX), u64::MAX);
        assert_eq!(remaining(u64::MAX, u64::MAX, u64::MAX), 0);
    }

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration_text(0), "0ms");
        assert_eq!(duration_text(17_300), "18ms");
        assert_eq!(duration_text(1_000_000), "1s");
        assert_eq!(duration_text(1_200_000), "2s");
        assert_eq!(duration_text(360_000_000), "6m0s");
        assert_eq!(duration_text(3_723_000_000), "1h2m3s");
    }
}
