//! Child processes that are always cleaned up: SIGTERM, then SIGKILL, on drop.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A spawned peer process with stdout and stderr in one log file.
pub struct Proc {
    /// Short name for messages.
    pub name: String,
    child: Child,
    /// The log file (stdout + stderr).
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with its output in `log`. Panics with the command line if it cannot start.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("dup log fd");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot spawn {cmd:?}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exited: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (and how), without blocking.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends SIGTERM and waits up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit() {
            return Some(s);
        }
        // SAFETY: signalling our own child by pid; it has not been reaped (try_wait said so).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if let Some(s) = self.wait_exit(grace) {
            return Some(s);
        }
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// The log contents so far (lossy UTF-8), for error messages.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for the socket file `path` to appear. It does not connect: a probe connection would
    /// look like a client to a vhost-user daemon, which may serve only one. Fails early, with the
    /// log tail, if the process exits first.
    pub fn wait_socket(&mut self, path: &Path, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            if path.exists() {
                return Ok(());
            }
            if let Some(s) = self.try_exit() {
                return Err(format!(
                    "{} exited ({s}) before creating {}:\n{}",
                    self.name,
                    path.display(),
                    self.log_tail(30)
                ));
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "{} did not create {} within {timeout:?}:\n{}",
                    self.name,
                    path.display(),
                    self.log_tail(30)
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// Connects to a unix socket, retrying until `timeout`.
pub fn connect_retry(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > timeout => return Err(e),
            Err(_) => sleep(Duration::from_millis(20)),
        }
    }
}
