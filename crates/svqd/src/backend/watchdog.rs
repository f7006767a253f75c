//! Bounds how long a request to a device may go unanswered. The vhost crate's frontend blocks
//! in `recv` until the reply arrives (and retries a receive timeout forever), so a hung backend
//! would hang svqd with it: a watchdog thread shuts the connection down when a request's
//! deadline passes, the blocked receive then fails, and the request reports a timeout. Arming
//! costs an uncontended lock; the thread looks every 50 ms (never woken per request).

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// The request in progress and when it must have been answered.
    armed: Option<(Instant, &'static str)>,
    /// The request that timed out (the connection is shut down for good).
    fired: Option<&'static str>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The watchdog of one connection.
pub struct RequestWatchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl RequestWatchdog {
    /// Watch requests on `stream` (a clone of the connection the requests use).
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("svqd-watchdog".into())
            .spawn(move || watch(&s, &stream))?;
        Ok(RequestWatchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Run request `what` (`f`), shutting the connection down if it takes longer than
    /// `timeout` (zero: no limit).
    pub fn run<T>(&self, what: &'static str, timeout: Duration, f: impl FnOnce() -> T) -> T {
        if timeout.is_zero() {
            return f();
        }
        // No wake-up of the watchdog thread here: it looks every `TICK`. Waking it per request
        // would put a context switch next to every request, on the switch paths too.
        self.shared.lock().armed = Some((Instant::now() + timeout, what));
        let out = f();
        self.shared.lock().armed = None;
        out
    }

    /// The request that timed out, if one did.
    pub fn fired(&self) -> Option<&'static str> {
        self.shared.lock().fired
    }
}

impl Drop for RequestWatchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the watchdog looks at the request in progress (a deadline fires at most this late).
const TICK: Duration = Duration::from_millis(50);

fn watch(shared: &Shared, stream: &UnixStream) {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return;
        }
        if let Some((deadline, what)) = st.armed {
            if Instant::now() >= deadline {
                tracing::error!(
                    request = what,
                    "backend did not answer in time; closing the connection"
                );
                st.fired = Some(what);
                st.armed = None;
                let _ = stream.shutdown(std::net::Shutdown::Both);
                continue;
            }
        }
        st = shared
            .cv
            .wait_timeout(st, TICK)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn a_request_past_its_deadline_shuts_the_connection() {
        let (mut ours, _peer) = UnixStream::pair().unwrap();
        let dog = RequestWatchdog::new(ours.try_clone().unwrap()).unwrap();
        // Answered in time: nothing happens.
        assert_eq!(dog.run("FAST", Duration::from_secs(5), || 7), 7);
        assert_eq!(dog.fired(), None);
        // A receive nobody answers: the watchdog ends it.
        let n = dog.run("SLOW", Duration::from_millis(50), || {
            let mut b = [0u8; 1];
            ours.read(&mut b)
        });
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert_eq!(dog.fired(), Some("SLOW"));
    }
}
