//! The guest "vCPU": a thread that runs a workload until paused (VM stop) or stopped.
//!
//! While paused the runner holds no lock on the workload, so the orchestrator may move it to the
//! destination RAM and hand its eventfds to a new device before resuming it.

use std::os::fd::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::GuestWorkload;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    PauseRequested,
    Paused,
    Stop,
}

struct Control {
    state: Mutex<RunState>,
    cv: Condvar,
}

/// Handle on a running guest.
pub struct GuestRunner<W: GuestWorkload + 'static> {
    workload: Arc<Mutex<W>>,
    ctrl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits up to `timeout` for any of `fds` to be readable and drains the readable ones.
fn wait_calls(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the whole call.
    let r = unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    if r <= 0 {
        return;
    }
    for p in &pfds {
        if p.revents & libc::POLLIN != 0 {
            let mut v = 0u64;
            // SAFETY: reading 8 bytes into a u64 from an eventfd the workload owns (non-blocking).
            unsafe { libc::read(p.fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        }
    }
}

impl<W: GuestWorkload + 'static> GuestRunner<W> {
    /// Starts the vCPU thread on `workload`.
    pub fn spawn(workload: W) -> std::io::Result<Self> {
        let workload = Arc::new(Mutex::new(workload));
        let ctrl = Arc::new(Control {
            state: Mutex::new(RunState::Running),
            cv: Condvar::new(),
        });
        let (w2, c2) = (workload.clone(), ctrl.clone());
        let thread = std::thread::Builder::new()
            .name("guest-vcpu".into())
            .spawn(move || loop {
                {
                    let mut st = lock(&c2.state);
                    loop {
                        match *st {
                            RunState::Running => break,
                            RunState::Stop => return,
                            RunState::PauseRequested => {
                                *st = RunState::Paused;
                                c2.cv.notify_all();
                            }
                            RunState::Paused => {
                                st = c2.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                            }
                        }
                    }
                }
                let mut w = lock(&w2);
                w.step();
                let fds = w.call_fds();
                drop(w);
                wait_calls(&fds, Duration::from_millis(2));
                lock(&w2).reap();
            })?;
        Ok(GuestRunner {
            workload,
            ctrl,
            thread: Some(thread),
        })
    }

    /// Stops the vCPU (VM stop): returns once the guest no longer touches memory or rings.
    pub fn pause(&self) {
        let mut st = lock(&self.ctrl.state);
        if *st == RunState::Running {
            *st = RunState::PauseRequested;
            self.ctrl.cv.notify_all();
        }
        while *st == RunState::PauseRequested {
            st = self.ctrl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Resumes the vCPU.
    pub fn resume(&self) {
        let mut st = lock(&self.ctrl.state);
        if *st == RunState::Paused || *st == RunState::PauseRequested {
            *st = RunState::Running;
            self.ctrl.cv.notify_all();
        }
    }

    /// The workload (lock it only while paused, or briefly).
    pub fn workload(&self) -> &Arc<Mutex<W>> {
        &self.workload
    }

    /// Runs `f` on the workload under its lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        f(&mut lock(&self.workload))
    }

    /// Stops posting and waits (running) until nothing is outstanding, `timeout` passes, or no
    /// request completed for two seconds (the rest is lost); returns the number still outstanding.
    pub fn drain(&self, timeout: Duration) -> u64 {
        self.with(|w| w.set_posting(false));
        let deadline = Instant::now() + timeout;
        let mut last = self.with(|w| w.ledger().completed);
        let mut last_change = Instant::now();
        loop {
            let l = self.with(|w| w.ledger());
            let now = Instant::now();
            if l.completed != last {
                last = l.completed;
                last_change = now;
            }
            // Two seconds without a completion: the rest will not come (a 2-core CI machine
            // under load still completes something well within that).
            if l.outstanding == 0 || now >= deadline || now - last_change >= Duration::from_secs(2)
            {
                return l.outstanding;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the vCPU thread and returns the workload.
    pub fn stop(mut self) -> Arc<Mutex<W>> {
        self.stop_inner();
        self.workload.clone()
    }

    fn stop_inner(&mut self) {
        *lock(&self.ctrl.state) = RunState::Stop;
        self.ctrl.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<W: GuestWorkload + 'static> Drop for GuestRunner<W> {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
