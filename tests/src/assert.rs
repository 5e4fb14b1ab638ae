//! Polling assertions for a distributed system: a test states the condition it waits for,
//! never a sleep that hopes long enough has passed.
//!
//! [`assert_eventually!`](crate::assert_eventually) retries a condition until it holds
//! (the cluster converged); [`assert_stays!`](crate::assert_stays) checks that a condition
//! holds at every poll of a whole quiet window (nothing happened that must not). Both
//! poll every 50 ms and accept an expression that may `.await`.

/// Retries `$cond` (an expression, may `.await`) until it is true or `$secs` pass.
#[macro_export]
macro_rules! assert_eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("not true after {}s: {}", $secs, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }};
}

/// Checks `$cond` (an expression, may `.await`) every 50 ms for `$secs`: it must hold at
/// every check, and the first check it fails panics at once with the message.
#[macro_export]
macro_rules! assert_stays {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let started = std::time::Instant::now();
        let until = started + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if !$cond {
                panic!(
                    "stopped being true after {:.1}s of {}s: {}",
                    started.elapsed().as_secs_f64(),
                    $secs,
                    format!($($msg)+)
                );
            }
            if std::time::Instant::now() >= until {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }};
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn stays_checks_the_whole_window() {
        let started = Instant::now();
        let mut checks = 0;
        crate::assert_stays!(
            0.3,
            {
                checks += 1;
                true
            },
            "true"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(checks >= 4, "{checks} checks");
    }

    #[tokio::test]
    #[should_panic(expected = "stopped being true")]
    async fn stays_fails_when_the_condition_breaks_in_the_window() {
        let started = Instant::now();
        crate::assert_stays!(5, started.elapsed() < Duration::from_millis(200), "broke");
    }

    #[tokio::test]
    async fn eventually_waits_for_the_condition() {
        let started = Instant::now();
        crate::assert_eventually!(5, started.elapsed() > Duration::from_millis(100), "never");
    }

    #[tokio::test]
    #[should_panic(expected = "not true after")]
    async fn eventually_fails_after_the_deadline() {
        crate::assert_eventually!(0.2, false, "never");
    }
}
