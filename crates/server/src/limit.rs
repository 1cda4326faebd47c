//! A token bucket per caller: a sustained rate and a burst. A call beyond them is refused at once with
//! RESOURCE_EXHAUSTED (reason `RATE_LIMITED`) rather than queued, so a flooding caller slows only itself
//! and the services behind it keep their capacity for everyone else.

use std::sync::Mutex;
use std::time::Instant;

use socialcard_domain::{Rejection, RejectionKind};

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// `per_second` sustained, up to `burst` at once (both at least 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(per_second.max(1)), burst, state: Mutex::new((burst, Instant::now())) }
    }

    /// Takes one token, or refuses.
    pub fn admit(&self) -> Result<(), Rejection> {
        let mut guard = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = &mut *guard;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Rejection::new(
                RejectionKind::ResourceExhausted,
                "RATE_LIMITED",
                "too many calls from this caller; slow down and retry",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_admitted_then_refused_until_tokens_come_back() {
        let limiter = RateLimiter::new(1, 3);
        assert!((0..3).all(|_| limiter.admit().is_ok()));
        let refused = limiter.admit().unwrap_err();
        assert_eq!(refused.kind, RejectionKind::ResourceExhausted);
        assert_eq!(refused.reason, "RATE_LIMITED");
    }
}
