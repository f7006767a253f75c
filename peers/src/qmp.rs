//! A minimal QMP client (JSON lines over a unix socket), enough to migrate and dump RAM.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::proc::connect_retry;

/// A QMP connection after capability negotiation. Asynchronous events are collected in `events`.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received so far (in order), e.g. `MIGRATION`, `STOP`, `RESUME`.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying up to `timeout`), reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let s = connect_retry(path, timeout).map_err(|e| format!("QMP {}: {e}", path.display()))?;
        // A QEMU that hangs in device realize never answers: bound every read.
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_msg()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_msg(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP bad JSON {line:?}: {e}"))
    }

    /// Runs a command; returns its `return` value, or the QMP error as text.
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": name });
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP write {name}: {e}"))?;
        loop {
            let v = self.read_msg()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {name}: {e}"));
            }
            return Err(format!("QMP {name}: unexpected reply {v}"));
        }
    }

    /// `query-status` → the run state string ("running", "paused", "inmigrate", "postmigrate"...).
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.cmd("query-status", json!({}))?;
        Ok(r["status"].as_str().unwrap_or("?").to_string())
    }
}
