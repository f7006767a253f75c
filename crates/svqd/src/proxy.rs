//! The daemon loop: accept a VMM, serve its requests, watch the backend, start over.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::ControlTarget;
use crate::backend::{BackendDevice, VdpaBackend, VhostUserDevice};
use crate::config::{BackendTarget, ProxyConfig, ShadowPolicy};
use crate::early_enable::EarlyEnable;
use crate::error::ProxyError;
use crate::report::{StatsReport, StatusReport};
use crate::session::Session;
use crate::stats::QueueStats;

/// Shared handle on the proxy state.
pub type SharedState = Arc<Mutex<Session>>;

/// How long a control query waits for the session before it answers from the last snapshot.
const QUERY_PATIENCE: Duration = Duration::from_millis(50);

/// The session as last seen by the proxy thread, for control queries that must not wait behind
/// a VMM request or a mode switch (which may be waiting on a peer that does not answer).
struct Snapshot {
    status: StatusReport,
    /// Each queue's mode and live counters.
    queues: Vec<(String, Arc<QueueStats>)>,
    taken: Instant,
}

/// Where the proxy thread publishes its [`Snapshot`].
#[derive(Clone)]
struct Published(Arc<Mutex<Option<Snapshot>>>);

impl Published {
    fn publish(&self, s: &Session) {
        let snap = Snapshot {
            status: StatusReport::of(s),
            queues: s
                .queues
                .iter()
                .map(|q| (q.mode.name().to_owned(), q.stats.clone()))
                .collect(),
            taken: Instant::now(),
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
    }

    fn with<T>(&self, f: impl FnOnce(&Snapshot) -> T) -> Option<T> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(f)
    }
}

/// The session lock, if it can be had within [`QUERY_PATIENCE`].
fn lock_briefly(state: &SharedState) -> Option<MutexGuard<'_, Session>> {
    let deadline = Instant::now() + QUERY_PATIENCE;
    loop {
        match state.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(std::sync::TryLockError::WouldBlock) => return None,
        }
    }
}

fn lock(state: &SharedState) -> MutexGuard<'_, Session> {
    // A panic in a request handler poisons the lock; the state is still consistent enough to
    // report and to be reset by the next session.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vhost-user proxy: one VMM socket, one backend.
pub struct Proxy {
    cfg: Arc<ProxyConfig>,
    listener: UnixListener,
    state: SharedState,
    published: Published,
    shutdown: Arc<EventFd>,
}

/// Stops a running [`Proxy`] from another thread (or a signal handler's helper thread).
#[derive(Clone)]
pub struct ShutdownHandle {
    evt: Arc<EventFd>,
}

impl ShutdownHandle {
    /// Ask the proxy to stop; `run` returns soon after.
    pub fn shutdown(&self) {
        let _ = self.evt.write(1);
    }

    /// Raw fd of the eventfd (for async-signal-safe writes from a signal handler).
    pub fn raw_fd(&self) -> i32 {
        self.evt.as_raw_fd()
    }
}

/// A proxy running on its own thread.
pub struct ProxyThread {
    handle: ShutdownHandle,
    join: Option<JoinHandle<Result<(), ProxyError>>>,
    control: Arc<dyn ControlTarget>,
}

impl ProxyThread {
    /// The control interface of the running proxy.
    pub fn control(&self) -> Arc<dyn ControlTarget> {
        self.control.clone()
    }

    /// Handle to stop it.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Stop the proxy and wait for its thread.
    pub fn stop(mut self) -> Result<(), ProxyError> {
        self.handle.shutdown();
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), ProxyError> {
        match self.join.take() {
            Some(j) => j
                .join()
                .unwrap_or_else(|_| Err(ProxyError::NotAllowed("proxy thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        self.handle.shutdown();
        let _ = self.join_inner();
    }
}

impl Proxy {
    /// Connect to the backend (retrying while it starts) and bind the VMM socket (mode 0600;
    /// refused if another process listens on it).
    pub fn new(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        let cfg = Arc::new(cfg);
        // Socket first: a path in use is reported at once, before waiting on the backend.
        let listener =
            crate::control::bind_private(&cfg.socket).map_err(|e| ProxyError::Listen {
                path: cfg.socket.display().to_string(),
                source: e,
            })?;
        let device = match connect_device(&cfg) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&cfg.socket);
                return Err(e);
            }
        };
        let mut st = Session::new(cfg.clone());
        st.attach(device);
        let shutdown =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| ProxyError::Io("eventfd", e))?);
        tracing::info!(socket = %cfg.socket.display(), policy = cfg.shadow.as_str(), "listening for the VMM");
        let published = Published(Arc::default());
        published.publish(&st);
        Ok(Proxy {
            cfg,
            listener,
            state: Arc::new(Mutex::new(st)),
            published,
            shutdown,
        })
    }

    /// The control interface (for the control socket or in-process callers).
    pub fn control(&self) -> Arc<dyn ControlTarget> {
        Arc::new(ProxyControl {
            state: self.state.clone(),
            published: self.published.clone(),
        })
    }

    /// A handle that stops [`Proxy::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            evt: self.shutdown.clone(),
        }
    }

    /// Run on a new thread.
    pub fn spawn(self) -> Result<ProxyThread, ProxyError> {
        let handle = self.shutdown_handle();
        let control = self.control();
        let join = std::thread::Builder::new()
            .name("svqd".into())
            .spawn(move || self.run())
            .map_err(|e| ProxyError::Io("spawn proxy thread", e))?;
        Ok(ProxyThread {
            handle,
            join: Some(join),
            control,
        })
    }

    /// Serve VMMs one after the other until shut down. Returns an error only when the backend
    /// cannot be reached any more.
    pub fn run(self) -> Result<(), ProxyError> {
        // Every log line of this proxy (and of its workers, which inherit the span) names the
        // device by its VMM socket.
        let _device = device_span(&self.cfg).entered();
        let res = self.serve();
        lock(&self.state).reset_session();
        let _ = std::fs::remove_file(&self.cfg.socket);
        tracing::info!("svqd stopped");
        res
    }

    fn serve(&self) -> Result<(), ProxyError> {
        loop {
            // Wait for a VMM (or shutdown).
            match poll2(
                self.listener.as_raw_fd(),
                libc::POLLIN,
                self.shutdown.as_raw_fd(),
                None,
            )? {
                Ready::Shutdown => return Ok(()),
                Ready::Other => {
                    // Only the backend can be watched here: reconnect if it went away while idle.
                    let mut st = lock(&self.state);
                    if st.device.as_ref().is_some_and(|d| d.hung_up()) {
                        tracing::warn!("backend closed the connection while no VMM was connected");
                        st.device = None;
                    }
                    continue;
                }
                Ready::First => {}
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            {
                let mut st = lock(&self.state);
                if st.device.is_none() {
                    match connect_device(&self.cfg) {
                        Ok(d) => st.attach(d),
                        Err(e) => {
                            tracing::error!(error = %e, "backend unavailable; refusing the VMM");
                            drop(stream);
                            return Err(e);
                        }
                    }
                }
                st.vmm_connected = true;
            }
            tracing::info!("VMM connected");
            let vmm_fd = stream.as_raw_fd();
            let handler_stream = match stream.try_clone() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot clone the VMM socket");
                    continue;
                }
            };
            let mut handler = BackendReqHandler::from_stream(handler_stream, self.state.clone());
            // Works around the vhost crate refusing SET_VRING_ENABLE before SET_FEATURES.
            let mut early = EarlyEnable::default();
            let backend_fd = lock(&self.state).device.as_ref().and_then(|d| d.watch_fd());
            let outcome = loop {
                match poll2(vmm_fd, libc::POLLIN, self.shutdown.as_raw_fd(), backend_fd)? {
                    Ready::Shutdown => break Outcome::Shutdown,
                    Ready::Other => {
                        if lock(&self.state)
                            .device
                            .as_ref()
                            .is_none_or(|d| d.hung_up())
                        {
                            break Outcome::BackendGone;
                        }
                    }
                    Ready::First => {
                        if let Err(e) = wait_whole_message(&stream, MESSAGE_TIMEOUT) {
                            break Outcome::VmmError(e);
                        }
                        let res = {
                            let mut st = lock(&self.state);
                            st.refusable = false;
                            early.intercept(&stream, &mut st)
                        };
                        // Outside the lock: the handler takes it for each request.
                        let res = res.unwrap_or_else(|| handler.handle_request());
                        {
                            let mut st = lock(&self.state);
                            early.after_request(&mut st);
                            self.published.publish(&st);
                        }
                        match res {
                            Ok(()) => {}
                            Err(vhost::vhost_user::Error::Disconnected)
                            | Err(vhost::vhost_user::Error::PartialMessage) => {
                                break Outcome::VmmGone
                            }
                            Err(e) => {
                                let st = lock(&self.state);
                                if st.device.as_ref().is_none_or(|d| d.hung_up()) {
                                    break Outcome::BackendGone;
                                }
                                if !st.refusable {
                                    // Malformed or unknown message, or a request whose reply
                                    // could not be produced: the VMM may be waiting for an
                                    // answer that will never come.
                                    break Outcome::VmmError(e);
                                }
                                // Refused and nacked (already logged): carry on.
                            }
                        }
                    }
                }
            };
            drop(handler);
            drop(stream);
            let mut st = lock(&self.state);
            match outcome {
                Outcome::Shutdown => return Ok(()),
                Outcome::VmmGone => {
                    tracing::info!("VMM disconnected; resetting the backend connection")
                }
                Outcome::VmmError(e) => {
                    tracing::warn!(error = %e, "closing the VMM connection after an invalid request")
                }
                Outcome::BackendGone => {
                    tracing::error!("backend disconnected; closed the VMM connection")
                }
            }
            // The backend resets its state on disconnect; the next VMM starts from scratch on a
            // fresh connection, made now so a backend that is gone for good is reported at once.
            st.reset_session();
            match connect_device(&self.cfg) {
                Ok(d) => st.attach(d),
                Err(e) => {
                    tracing::error!(error = %e, "backend unavailable");
                    return Err(e);
                }
            }
        }
    }
}

/// The span every log line about this proxy's device is in (workers inherit it).
fn device_span(cfg: &ProxyConfig) -> tracing::Span {
    tracing::info_span!("device", socket = %cfg.socket.display())
}

/// Connect to the configured backend (open it, for a vhost-vdpa device).
fn connect_device(cfg: &ProxyConfig) -> Result<Box<dyn BackendDevice>, ProxyError> {
    let path = match cfg.backend_target() {
        BackendTarget::Vdpa(dev) => return Ok(Box::new(VdpaBackend::open(dev)?)),
        BackendTarget::VhostUser(path) => path,
    };
    let mut device = VhostUserDevice::connect(
        path,
        cfg.backend_connect_timeout,
        cfg.backend_request_timeout,
    )?;
    if !cfg.backend_mem_slots {
        device = device.without_mem_slots();
    }
    Ok(Box::new(device))
}

/// How long the rest of a VMM message may take to arrive once its first byte is there (the
/// vhost crate's handler would wait for it forever, ignoring shutdown).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// vhost-user header: request, flags, payload size (u32 each).
const HEADER_LEN: usize = 12;
/// Largest payload a vhost-user message carries (MAX_MSG_SIZE in the vhost crate).
const MAX_PAYLOAD: usize = 0x1000;

/// Wait until the whole message (header and the payload it announces) is in the socket, without
/// consuming it. A VMM that sends half a message and stalls gets an error after `timeout`.
fn wait_whole_message(
    vmm: &std::os::unix::net::UnixStream,
    timeout: Duration,
) -> Result<(), vhost::vhost_user::Error> {
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        // SAFETY: `buf` is valid for writes of its length for the call; MSG_PEEK leaves the
        // data (and any attached fds, which this call does not receive) in the socket.
        let n = unsafe {
            libc::recv(
                vmm.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        Err(vhost::vhost_user::Error::PartialMessage)
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                }
                _ => Err(vhost::vhost_user::Error::SocketError(e)),
            };
        }
        let n = n as usize;
        if n == 0 {
            // End of stream: the handler reports the disconnect.
            return Ok(());
        }
        if n >= HEADER_LEN {
            let size = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
            if size > MAX_PAYLOAD || n >= HEADER_LEN + size {
                // Complete, or invalid (the handler refuses an oversized message itself).
                return Ok(());
            }
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                bytes = n,
                "the VMM sent part of a message and stopped; closing the connection"
            );
            return Err(vhost::vhost_user::Error::PartialMessage);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

enum Outcome {
    Shutdown,
    VmmGone,
    VmmError(vhost::vhost_user::Error),
    BackendGone,
}

enum Ready {
    First,
    Shutdown,
    Other,
}

/// Wait until `fd` has `events`, the shutdown eventfd fires, or `watch` hangs up.
fn poll2(fd: i32, events: i16, shutdown: i32, watch: Option<i32>) -> Result<Ready, ProxyError> {
    let mut fds = vec![
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    if let Some(w) = watch {
        fds.push(libc::pollfd {
            fd: w,
            events: libc::POLLRDHUP,
            revents: 0,
        });
    }
    loop {
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ProxyError::Io("poll", e));
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Shutdown);
        }
        if fds.len() > 2 && fds[2].revents != 0 {
            return Ok(Ready::Other);
        }
        if fds[0].revents != 0 {
            return Ok(Ready::First);
        }
    }
}

/// The [`ControlTarget`] of a proxy.
pub struct ProxyControl {
    state: SharedState,
    published: Published,
}

impl ControlTarget for ProxyControl {
    /// Live when the session is free within [`QUERY_PATIENCE`]; otherwise the last snapshot,
    /// saying so (the proxy thread is waiting on a peer: a VMM request or a mode switch).
    fn query_status(&self) -> StatusReport {
        if let Some(st) = lock_briefly(&self.state) {
            let status = StatusReport::of(&st);
            self.published.publish(&st);
            return status;
        }
        self.published
            .with(|snap| {
                let mut status = snap.status.clone();
                status.busy = Some(format!(
                    "svqd is handling a VMM request or a mode switch and waiting on a peer \
                     (backend not responding?); status as of {} ms ago",
                    snap.taken.elapsed().as_millis()
                ));
                status
            })
            .expect("published at creation")
    }

    fn set_shadow(&self, enable: bool) -> Result<(), String> {
        let mut st = lock(&self.state);
        // Switches run on the control client's thread: name the device in their log lines too.
        let _device = device_span(&st.cfg).entered();
        match (st.cfg.shadow, enable) {
            (ShadowPolicy::Never, true) => return Err("svqd runs with --shadow never".into()),
            (ShadowPolicy::Always, false) => return Err("svqd runs with --shadow always".into()),
            _ => {}
        }
        let was = st.forced;
        st.forced = enable;
        let res = st.reconcile();
        if res.is_err() && enable {
            st.forced = was;
        }
        res.map_err(|e| e.to_string())
    }

    /// The counters are atomics: read live even while the session is busy.
    fn query_stats(&self) -> StatsReport {
        if let Some(st) = lock_briefly(&self.state) {
            return StatsReport::of(&st);
        }
        self.published
            .with(|snap| StatsReport::from_queues(&snap.queues))
            .expect("published at creation")
    }
}
