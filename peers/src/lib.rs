//! Harness for end-to-end tests of `svqd` with real, unmodified peers: QEMU 10 (TCG, shared memfd
//! RAM), qemu-storage-daemon, DPDK testpmd and the rust-vmm `vhost-device-*` daemons.
//!
//! The peers are fixtures built by `scripts/peers/fixtures.sh` into `$SVQ_FIXTURES` (default
//! `~/.cache/svq-fixtures`), which writes an `env` file this crate reads. Tests call [`setup`]:
//! with `SVQ_PEERS=0` they skip (developers running the fast suite); otherwise missing fixtures
//! are a hard, explained failure, never a silent pass.
//!
//! Every test takes a machine-wide lock ([`Setup::lock`]) so that only one TCG guest set runs at a
//! time on the 2-core CI machine, whatever the test runner's parallelism.

#![warn(missing_docs)]

pub mod guest;
pub mod proc;
pub mod qmp;
pub mod scenario;
pub mod vduse;
pub mod vm;

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

/// Paths of the fixture programs and files (from `$SVQ_FIXTURES/env`).
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// The fixture directory.
    pub dir: PathBuf,
    /// `qemu-system-x86_64` 10.x, unpacked (not installed).
    pub qemu: PathBuf,
    /// QEMU data directories passed with `-L` (QEMU's own, then SeaBIOS).
    pub qemu_data: Vec<PathBuf>,
    /// QEMU's module directory (`QEMU_MODULE_DIR`).
    pub qemu_modules: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (busybox + virtio modules + the `/init` workloads).
    pub initrd: PathBuf,
    /// `qemu-storage-daemon` 10.x.
    pub qsd: PathBuf,
    /// `dpdk-testpmd`, if installed.
    pub testpmd: Option<PathBuf>,
    /// `vhost-device-rng`, if installed.
    pub vhost_rng: Option<PathBuf>,
    /// `vhost-device-vsock`, if installed.
    pub vhost_vsock: Option<PathBuf>,
}

/// What a test gets from [`setup`]: the fixtures and the machine-wide lock, held until dropped.
pub struct Setup {
    /// The fixtures.
    pub fx: Fixtures,
    _lock: fs::File,
}

impl Setup {
    /// The lock is held for the life of the `Setup`; this accessor exists so it is not "unused".
    pub fn lock(&self) -> &fs::File {
        &self._lock
    }
}

/// The fixture directory: `$SVQ_FIXTURES` or `~/.cache/svq-fixtures`.
pub fn fixtures_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SVQ_FIXTURES") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/svq-fixtures")
}

/// Entry point of every real-peer test. Returns `None` (the test returns early, after saying so on
/// stderr) only when `SVQ_PEERS=0`. Panics with instructions when the fixtures are missing.
pub fn setup(test: &str) -> Option<Setup> {
    if std::env::var("SVQ_PEERS").as_deref() == Ok("0") {
        eprintln!("{test}: skipped (SVQ_PEERS=0)");
        return None;
    }
    let dir = fixtures_dir();
    let env_file = dir.join("env");
    let text = fs::read_to_string(&env_file).unwrap_or_else(|e| {
        panic!(
            "real-peer fixtures missing ({}: {e}). Build them with `scripts/peers/fixtures.sh` \
             (set SVQ_FIXTURES to choose the directory), or skip these tests with SVQ_PEERS=0.",
            env_file.display()
        )
    });
    let env: HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let req = |k: &str| -> PathBuf {
        let v = env.get(k).copied().unwrap_or("");
        let p = PathBuf::from(v);
        assert!(
            !v.is_empty() && p.exists(),
            "fixture {k}={v:?} from {} does not exist: re-run scripts/peers/fixtures.sh",
            env_file.display()
        );
        p
    };
    let opt = |k: &str| -> Option<PathBuf> {
        env.get(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .filter(|p| p.exists())
    };
    let fx = Fixtures {
        qemu: req("SVQ_QEMU"),
        qemu_data: vec![req("SVQ_QEMU_DATA"), req("SVQ_QEMU_BIOS")],
        qemu_modules: req("QEMU_MODULE_DIR"),
        kernel: req("SVQ_KERNEL"),
        initrd: req("SVQ_INITRD"),
        qsd: req("SVQ_QSD"),
        testpmd: opt("SVQ_TESTPMD"),
        vhost_rng: opt("SVQ_VHOST_RNG"),
        vhost_vsock: opt("SVQ_VHOST_VSOCK"),
        dir,
    };
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(fx.dir.join(".peers.lock"))
        .expect("open the peers lock file");
    // SAFETY: flock on an fd we own; blocks until no other real-peer test runs on this machine.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    Some(Setup { fx, _lock: lock })
}

/// Where the workspace's binaries are: `$SVQ_BIN_DIR`, else the directory above this test
/// executable's `deps/` (cargo's `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SVQ_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("exe dir");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary (`svqd`, `svqctl`). Unless `SVQ_BIN_DIR` names the binaries
/// explicitly, a missing binary, or one older than any source file of svqd or the engine, is
/// (re)built once per test process with `cargo build -p svqd --bins` in this test's own target
/// directory and profile (`cargo test -p svq-peers` alone does not build other packages' bins;
/// cargo does not hold its build lock while tests run). A stale build never passes for the
/// current code.
pub fn workspace_bin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let p = bin_dir().join(name);
    if std::env::var_os("SVQ_BIN_DIR").is_some() {
        // An explicitly chosen binary (e.g. a snapshot while svqd's sources are being edited).
        assert!(p.exists(), "{} not found (SVQ_BIN_DIR)", p.display());
        return p;
    }
    if let Err(why) = fresh(&p) {
        // After a successful build cargo's own fingerprints are the authority (sources may be
        // edited concurrently while the tests run; the mtime check is only the trigger).
        BUILD.call_once(|| build_svqd(&why));
        assert!(
            p.exists(),
            "{} missing after cargo build -p svqd --bins",
            p.display()
        );
    }
    p
}

/// Ok if `bin` exists and is newer than every source it is built from.
fn fresh(bin: &Path) -> Result<(), String> {
    let built = fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in [
        "crates/svqd/src",
        "crates/svqd/Cargo.toml",
        "crates/svq/src",
    ] {
        let src = root.join(src);
        let newest = if src.is_dir() {
            newest_file(&src)
        } else {
            fs::metadata(&src)
                .ok()
                .and_then(|m| m.modified().ok())
                .map(|t| (t, src.clone()))
        };
        if let Some((newest, path)) = newest {
            if newest > built {
                return Err(format!(
                    "{} is older than {}",
                    bin.display(),
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// `cargo build -p svqd --bins` into the target directory and profile of this test executable.
fn build_svqd(why: &str) {
    let profile_dir = bin_dir();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let target = profile_dir.parent().expect("target dir").to_path_buf();
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    eprintln!("{why}: running cargo build -p svqd --bins --profile {profile}");
    let cargo_profile = if profile == "debug" { "dev" } else { &profile };
    let st = std::process::Command::new(cargo)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .env("CARGO_TARGET_DIR", &target)
        .args([
            "build",
            "-q",
            "-p",
            "svqd",
            "--bins",
            "--profile",
            cargo_profile,
        ])
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(st.success(), "cargo build -p svqd --bins failed ({st})");
}

fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let cand = if p.is_dir() {
            newest_file(&p)
        } else if p.extension().is_some_and(|x| x == "rs" || x == "toml") {
            e.metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(|t| (t, p))
        } else {
            None
        };
        if let Some(c) = cand {
            if best.as_ref().is_none_or(|b| c.0 > b.0) {
                best = Some(c);
            }
        }
    }
    best
}

/// A per-test scratch directory under `$SVQ_PEERS_TMP` (default `/tmp/svq-peers`). Removed on
/// success; kept (and its path printed) when the test panics, so the logs can be read.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory named after the test.
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("SVQ_PEERS_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/svq-peers"));
        let path = base.join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SVQ_PEERS_KEEP").is_some() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Compares two RAM dumps page by page (4 KiB, the vhost log granularity). Both files must exist
/// and be exactly `size` bytes: a missing or short dump is an error, never "0 pages differ".
pub fn count_differing_pages(a: &Path, b: &Path, size: u64) -> Result<Vec<u64>, String> {
    use std::io::Read;
    for p in [a, b] {
        let len = fs::metadata(p)
            .map_err(|e| format!("RAM dump {}: {e}", p.display()))?
            .len();
        if len != size {
            return Err(format!(
                "RAM dump {} is {len} bytes, want {size}",
                p.display()
            ));
        }
    }
    let mut fa = fs::File::open(a).map_err(|e| e.to_string())?;
    let mut fb = fs::File::open(b).map_err(|e| e.to_string())?;
    const CHUNK: usize = 1 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut diff = Vec::new();
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        fa.read_exact(&mut ba[..n]).map_err(|e| e.to_string())?;
        fb.read_exact(&mut bb[..n]).map_err(|e| e.to_string())?;
        for (i, (pa, pb)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if pa != pb {
                diff.push(off / 4096 + i as u64);
            }
        }
        off += n as u64;
    }
    Ok(diff)
}
