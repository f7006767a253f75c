//! The control socket: QMP-style JSON lines.
//!
//! Each request is one JSON object on one line, `{"execute": NAME, "arguments": {...}, "id": ANY}`;
//! each reply is one line, `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, echoing
//! `id` when given. Commands:
//!
//! * `query-status`: mode per queue, features, backend (from [`ControlTarget::query_status`]);
//! * `set-shadow` `{"enable": bool}`: force shadow mode on, or back to automatic;
//! * `query-stats`: per-queue counters.
//!
//! One thread per client: clients are operators and scripts, a handful at most.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::ControlTarget;

/// Longest request line accepted; anything longer is answered with an error and the client dropped.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request as it arrives on the wire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    execute: String,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}

/// Arguments of `set-shadow`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetShadowArgs {
    enable: bool,
}

/// A running control server. Dropping it stops accepting clients and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    /// A second handle on the listening socket, to wake the acceptor on drop.
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// Binds `path` (mode 0600) and serves control requests for `target` on a background thread.
///
/// Fails if `path` exists and another process is listening on it; a stale socket file left by a
/// dead process is replaced.
pub fn serve(path: &Path, target: Arc<dyn ControlTarget>) -> io::Result<ControlServer> {
    let listener = bind_private(path)?;
    let waker = listener.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("svqd-control".into())
            .spawn(move || accept_loop(listener, target, stop))?
    };
    Ok(ControlServer {
        path: path.to_path_buf(),
        listener: waker,
        stop,
        acceptor: Some(acceptor),
    })
}

impl ControlServer {
    /// The socket path this server listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag. shutdown() on the listening
        // socket makes accept() fail at once, even when the socket file was deleted meanwhile
        // (a connect() to the path would then fail and leave the thread blocked forever).
        // SAFETY: shutdown() on a socket fd we own; it neither closes nor invalidates the fd.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a unix socket readable and writable by the owner only, refusing a path in live use.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: socket in use by another process", path.display()),
                ));
            }
            // A stale socket of an earlier run: nobody listens on it.
            std::fs::remove_file(path)?;
        }
        Ok(meta) => {
            // Never delete what is not a socket: a mistyped path must not cost a file.
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket ({}); refusing to replace it",
                    path.display(),
                    file_kind(&meta)
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

fn accept_loop(listener: UnixListener, target: Arc<dyn ControlTarget>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        // Checked before the result: after shutdown() accept() keeps failing.
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(stream) => {
                let target = target.clone();
                let spawned = std::thread::Builder::new()
                    .name("svqd-control-client".into())
                    .spawn(move || {
                        if let Err(e) = serve_client(stream, target.as_ref()) {
                            tracing::debug!("control client ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("control: cannot start a client thread: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("control: accept failed: {e}");
                // Do not spin on a persistent error (EMFILE): give the system a moment.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn serve_client(stream: UnixStream, target: &dyn ControlTarget) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST_BYTES {
            let reply = error_reply(None, "GenericError", "request line too long");
            send_line(&mut writer, &reply)?;
            return Ok(());
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = handle_line(&line, target);
        send_line(&mut writer, &reply)?;
    }
}

/// Write `v` and a newline in one write: formatting straight into the socket would send each
/// JSON token in a syscall of its own (a stats reply took hundreds).
fn send_line(w: &mut impl Write, v: &Value) -> io::Result<()> {
    w.write_all(format!("{v}\n").as_bytes())
}

/// Parses and executes one request line, returning the reply object.
pub fn handle_line(line: &[u8], target: &dyn ControlTarget) -> Value {
    let request: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return error_reply(None, "GenericError", &format!("malformed request: {e}")),
    };
    let id = request.id.clone();
    match execute(&request, target) {
        Ok(value) => with_id(json!({ "return": value }), id),
        Err((class, desc)) => error_reply(id, class, &desc),
    }
}

/// A typed answer ([`crate::report`]) as the JSON of a reply.
fn to_reply(answer: impl serde::Serialize) -> Result<Value, (&'static str, String)> {
    serde_json::to_value(answer)
        .map_err(|e| ("GenericError", format!("cannot encode the answer: {e}")))
}

fn execute(request: &Request, target: &dyn ControlTarget) -> Result<Value, (&'static str, String)> {
    let no_arguments = |name: &str| match &request.arguments {
        None => Ok(()),
        Some(Value::Object(map)) if map.is_empty() => Ok(()),
        Some(_) => Err(("GenericError", format!("{name} takes no arguments"))),
    };
    match request.execute.as_str() {
        "query-status" => {
            no_arguments("query-status")?;
            to_reply(target.query_status())
        }
        "query-stats" => {
            no_arguments("query-stats")?;
            to_reply(target.query_stats())
        }
        "set-shadow" => {
            // Only an object with exactly the documented members: serde would also take the
            // struct's fields from an array (`[true]`).
            let arguments = match &request.arguments {
                Some(a @ Value::Object(_)) => a.clone(),
                _ => {
                    return Err((
                        "GenericError",
                        "set-shadow needs the arguments {\"enable\": bool}".to_string(),
                    ))
                }
            };
            let args: SetShadowArgs = serde_json::from_value(arguments)
                .map_err(|e| ("GenericError", format!("set-shadow: {e}")))?;
            target
                .set_shadow(args.enable)
                .map_err(|e| ("GenericError", e))?;
            Ok(json!({}))
        }
        other => Err((
            "CommandNotFound",
            format!("the command {other} has not been found"),
        )),
    }
}

fn error_reply(id: Option<Value>, class: &str, desc: &str) -> Value {
    with_id(json!({ "error": { "class": class, "desc": desc } }), id)
}

fn with_id(mut reply: Value, id: Option<Value>) -> Value {
    if let (Some(id), Some(map)) = (id, reply.as_object_mut()) {
        map.insert("id".into(), id);
    }
    reply
}

/// A blocking client for the control socket (used by `svqctl` and tests).
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the control socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let writer = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Self { reader, writer })
    }

    /// Sends `{"execute": command, "arguments": arguments}` and returns the raw reply object.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> io::Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        send_line(&mut self.writer, &request)?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "svqd closed the control connection",
            ));
        }
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{FeatureSet, QueueCounters, QueueStatsReport, QueueStatus};
    use crate::{StatsReport, StatusReport};
    use std::sync::Mutex;

    #[derive(Default)]
    struct FakeTarget {
        shadow: Mutex<Vec<bool>>,
    }

    impl ControlTarget for FakeTarget {
        fn query_status(&self) -> StatusReport {
            let features = FeatureSet {
                backend: "0x0".into(),
                offered: "0x0".into(),
                acked: "0x0".into(),
            };
            StatusReport {
                socket: "vmm.sock".into(),
                backend: "backend.sock".into(),
                backend_connected: true,
                vmm_connected: false,
                policy: "auto".into(),
                forced: false,
                log_all: false,
                logging: false,
                log_bytes: None,
                features: features.clone(),
                protocol_features: features,
                queues: vec![QueueStatus {
                    index: 0,
                    mode: "passthrough".into(),
                    started: false,
                    enabled: false,
                    size: 0,
                    shadow: None,
                    parked_region: None,
                }],
                busy: None,
            }
        }
        fn set_shadow(&self, enable: bool) -> Result<(), String> {
            if !enable && self.shadow.lock().unwrap().is_empty() {
                return Err("not in shadow mode".into());
            }
            self.shadow.lock().unwrap().push(enable);
            Ok(())
        }
        fn query_stats(&self) -> StatsReport {
            StatsReport {
                queues: vec![QueueStatsReport {
                    index: 0,
                    mode: "passthrough".into(),
                    counters: QueueCounters {
                        kicks: 3,
                        ..Default::default()
                    },
                }],
            }
        }
    }

    fn run(line: &str, target: &FakeTarget) -> Value {
        handle_line(line.as_bytes(), target)
    }

    #[test]
    fn commands_return_the_target_values_and_echo_ids() {
        let t = FakeTarget::default();
        let r = run(r#"{"execute":"query-status","id":7}"#, &t);
        assert_eq!(r["return"]["queues"][0]["mode"], "passthrough");
        assert_eq!(r["id"], 7);
        let r = run(r#"{"execute":"query-stats","arguments":{}}"#, &t);
        assert_eq!(r["return"]["queues"][0]["kicks"], 3);
        let r = run(
            r#"{"execute":"set-shadow","arguments":{"enable":true}}"#,
            &t,
        );
        assert_eq!(r, json!({ "return": {} }));
        assert_eq!(*t.shadow.lock().unwrap(), vec![true]);
    }

    #[test]
    fn bad_requests_get_typed_errors() {
        let t = FakeTarget::default();
        let r = run(r#"{"execute":"frobnicate"}"#, &t);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        let r = run("not json", &t);
        assert_eq!(r["error"]["class"], "GenericError");
        let r = run(r#"{"execute":"set-shadow"}"#, &t);
        assert!(r["error"]["desc"].as_str().unwrap().contains("enable"));
        let r = run(
            r#"{"execute":"set-shadow","arguments":{"enable":"yes"}}"#,
            &t,
        );
        assert_eq!(r["error"]["class"], "GenericError");
        let r = run(r#"{"execute":"query-status","arguments":{"x":1}}"#, &t);
        assert_eq!(r["error"]["class"], "GenericError");
        // The target's own refusal is passed through.
        let r = run(
            r#"{"execute":"set-shadow","arguments":{"enable":false}}"#,
            &t,
        );
        assert_eq!(r["error"]["desc"], "not in shadow mode");
        assert!(t.shadow.lock().unwrap().is_empty());
    }

    #[test]
    fn socket_round_trip_permissions_and_in_use() {
        let dir = std::env::temp_dir().join(format!("svqd-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let target = Arc::new(FakeTarget::default());
        let server = serve(&path, target.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second server on the same live path is refused.
        let err = serve(&path, target.clone()).err().expect("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);

        let mut client = ControlClient::connect(&path).unwrap();
        let r = client
            .execute("set-shadow", Some(json!({ "enable": true })))
            .unwrap();
        assert_eq!(r, json!({ "return": {} }));
        let r = client.execute("query-status", None).unwrap();
        assert_eq!(r["return"]["queues"][0]["index"], 0);
        drop(client);
        drop(server);
        assert!(!path.exists());
        // A stale socket file (nobody listening) is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let server = serve(&path, target).unwrap();
        drop(server);
        // Dropping a server whose socket file was deleted still returns (no hang).
        let server = serve(&path, Arc::new(FakeTarget::default())).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn set_shadow_takes_only_an_object_with_enable() {
        let t = FakeTarget::default();
        for bad in [
            r#"{"execute":"set-shadow","arguments":[true]}"#,
            r#"{"execute":"set-shadow","arguments":true}"#,
            r#"{"execute":"set-shadow","arguments":"on"}"#,
            r#"{"execute":"set-shadow"}"#,
            r#"{"execute":"set-shadow","arguments":{}}"#,
            r#"{"execute":"set-shadow","arguments":{"enable":1}}"#,
            r#"{"execute":"set-shadow","arguments":{"enable":true,"force":true}}"#,
        ] {
            let r = run(bad, &t);
            assert_eq!(r["error"]["class"], "GenericError", "{bad}: {r}");
        }
        assert!(t.shadow.lock().unwrap().is_empty(), "nothing was applied");
        let r = run(
            r#"{"execute":"set-shadow","arguments":{"enable":true}}"#,
            &t,
        );
        assert_eq!(r, json!({ "return": {} }));
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = Arc::new(FakeTarget::default());
        // A regular file, a directory and a symbolic link at the path: refused, left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"precious").unwrap();
        let err = serve(&file, target.clone()).err().expect("not a socket");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("regular file"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        let sub = dir.path().join("dir");
        std::fs::create_dir(&sub).unwrap();
        assert!(serve(&sub, target.clone()).is_err());
        assert!(sub.is_dir());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(serve(&link, target.clone()).is_err());
        assert_eq!(std::fs::read(&link).unwrap(), b"precious");
        // A stale socket is replaced.
        let sock = dir.path().join("sock");
        drop(UnixListener::bind(&sock).unwrap());
        drop(serve(&sock, target).unwrap());
    }
}
