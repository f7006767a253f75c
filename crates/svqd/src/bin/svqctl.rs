//! `svqctl`: drives svqd's control socket.
//!
//! ```text
//! svqctl --control /run/svqd-blk0.ctl query-status
//! svqctl --control /run/svqd-blk0.ctl set-shadow on
//! svqctl --control /run/svqd-blk0.ctl execute query-stats '{}'
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use svqd::control::ControlClient;

#[derive(Parser)]
#[command(name = "svqctl", version, about = "Control a running svqd")]
struct Cli {
    /// svqd's control socket (svqd --control PATH).
    #[arg(long, short = 'c')]
    control: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mode of every queue, negotiated features, backend.
    QueryStatus,
    /// Per-queue counters: descriptors, bytes, kicks, calls, dirty pages, mode switches.
    QueryStats,
    /// Force shadow mode on, or off (back to automatic: shadow only while the VMM logs).
    SetShadow {
        /// on or off
        state: OnOff,
    },
    /// Send any command: NAME with optional JSON arguments.
    Execute {
        /// Command name, e.g. query-status.
        name: String,
        /// Arguments as a JSON object.
        arguments: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, arguments) = match cli.command {
        Command::QueryStatus => ("query-status".to_string(), None),
        Command::QueryStats => ("query-stats".to_string(), None),
        Command::SetShadow { state } => (
            "set-shadow".to_string(),
            Some(json!({ "enable": matches!(state, OnOff::On) })),
        ),
        Command::Execute { name, arguments } => {
            let arguments = match arguments
                .map(|a| serde_json::from_str::<Value>(&a))
                .transpose()
            {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("svqctl: arguments are not JSON: {e}");
                    return ExitCode::from(2);
                }
            };
            (name, arguments)
        }
    };
    let reply = ControlClient::connect(&cli.control).and_then(|mut c| c.execute(&name, arguments));
    match reply {
        Ok(reply) => {
            if let Some(error) = reply.get("error") {
                eprintln!(
                    "svqctl: {}: {}",
                    error["class"].as_str().unwrap_or("Error"),
                    error["desc"].as_str().unwrap_or("")
                );
                return ExitCode::FAILURE;
            }
            let value = reply.get("return").cloned().unwrap_or(Value::Null);
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("svqctl: {e}");
            ExitCode::FAILURE
        }
    }
}
