//! The VDUSE guest: a QEMU TCG guest with a bookworm-backports 6.12 kernel in which
//! qemu-storage-daemon exports a raw image as VDUSE blk device(s) bound to vhost_vdpa, so that our
//! binaries can run against a real `/dev/vhost-vdpa-N` (this host's kernel has no vDPA).
//!
//! The fixture (`scripts/peers/vduse.sh`, run by `fixtures.sh`) holds the kernel and a base
//! initramfs. A test appends a second cpio archive with its binaries (and the libraries `ldd`
//! names for them) and `/svq/run.sh`, boots, and reads `SVQ-` lines from the console; the guest
//! powers off when the script ends. Without the fixture, the tests skip and say why.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proc::Proc;
use crate::{fixtures_dir, Fixtures, Setup};

/// The VDUSE kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct VduseFixture {
    /// bookworm-backports 6.12 kernel.
    pub kernel: PathBuf,
    /// Base initramfs (busybox, qemu-storage-daemon, vdpa, modules, /init).
    pub initrd: PathBuf,
}

/// Entry point of a VDUSE test: `None` (after printing why on stderr) when the real-peer tests
/// are off or the VDUSE fixture is absent; otherwise the machine-wide lock and the fixtures.
pub fn setup(test: &str) -> Option<(Setup, VduseFixture)> {
    if std::env::var("SVQ_PEERS").as_deref() == Ok("0") {
        eprintln!("{test}: skipped (SVQ_PEERS=0)");
        return None;
    }
    let env_file = fixtures_dir().join("env");
    let Ok(text) = fs::read_to_string(&env_file) else {
        eprintln!(
            "{test}: skipped: no fixtures ({} missing; scripts/peers/fixtures.sh builds them)",
            env_file.display()
        );
        return None;
    };
    let get = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| key.trim() == k)
            .map(|(_, v)| PathBuf::from(v.trim()))
            .filter(|p| !p.as_os_str().is_empty() && p.exists())
    };
    // The env file names them; an env file written by an older fixtures.sh does not, while
    // vduse.sh's output is still in its place.
    let default = |name: &str| Some(fixtures_dir().join("vduse").join(name)).filter(|p| p.exists());
    let kernel = get("SVQ_VDUSE_KERNEL").or_else(|| default("vmlinuz"));
    let initrd = get("SVQ_VDUSE_INITRD").or_else(|| default("initramfs.gz"));
    let (Some(kernel), Some(initrd)) = (kernel, initrd) else {
        eprintln!(
            "{test}: skipped: no VDUSE guest in {} (scripts/peers/fixtures.sh builds it with \
             scripts/peers/vduse.sh; it needs the bookworm-backports 6.12 kernel package)",
            env_file.display()
        );
        return None;
    };
    let s = crate::setup(test)?;
    Some((s, VduseFixture { kernel, initrd }))
}

/// How to boot one VDUSE guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Name (file names in the test directory).
    pub name: String,
    /// VDUSE blk devices, all exporting the same image.
    pub disks: u32,
    /// Image size in MiB.
    pub disk_mib: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub smp: u32,
    /// Host files copied to `/svq/<name>` (executable).
    pub files: Vec<(PathBuf, String)>,
    /// Body of `/svq/run.sh` (busy-box sh; `$SVQ_VDPA_DEVS`, `$SVQ_DISK` are set).
    pub script: String,
    /// Longest the guest may run.
    pub timeout: Duration,
}

impl GuestSpec {
    /// One disk of 64 MiB, 1 GiB of RAM, 2 vCPUs, 5 minutes.
    pub fn new(name: &str, script: &str) -> Self {
        GuestSpec {
            name: name.into(),
            disks: 1,
            disk_mib: 64,
            mem_mib: 1024,
            smp: 2,
            files: Vec::new(),
            script: script.into(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Adds a host binary as `/svq/<name>`.
    pub fn file(mut self, src: &Path, name: &str) -> Self {
        self.files.push((src.to_path_buf(), name.into()));
        self
    }
}

/// What a guest printed.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// The whole console.
    pub console: String,
    /// Host wall time from QEMU start to its exit.
    pub wall: Duration,
}

impl GuestOutcome {
    /// Lines starting with `prefix`, prefix removed.
    pub fn lines<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter_map(move |l| l.trim_end_matches('\r').strip_prefix(prefix))
    }

    /// Names of the checks the guest reported as passed (`SVQ-PASS <name> ...`).
    pub fn passed(&self) -> Vec<String> {
        self.lines("SVQ-PASS ")
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect()
    }

    /// Failure lines (`SVQ-FAIL ...`).
    pub fn failures(&self) -> Vec<String> {
        self.lines("SVQ-FAIL ").map(String::from).collect()
    }

    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> String {
        let l: Vec<&str> = self.console.lines().collect();
        l[l.len().saturating_sub(n)..].join("\n")
    }
}

/// Boots the guest, runs `spec.script` in it and returns the console once the guest powered off.
/// An error when QEMU cannot start, the guest outlives `spec.timeout`, or it never reached the
/// end of its script.
pub fn run_guest(
    fx: &Fixtures,
    vfx: &VduseFixture,
    dir: &Path,
    spec: &GuestSpec,
) -> Result<GuestOutcome, String> {
    let initrd = dir.join(format!("{}.initrd", spec.name));
    build_initrd(&vfx.initrd, &initrd, spec)?;
    let console = dir.join(format!("{}.console", spec.name));
    let _ = fs::remove_file(&console);
    let mut c = Command::new(&fx.qemu);
    c.env("QEMU_MODULE_DIR", &fx.qemu_modules);
    for d in &fx.qemu_data {
        c.arg("-L").arg(d);
    }
    c.args(["-machine", "q35,accel=tcg", "-cpu", "max"])
        .args(["-smp", &spec.smp.to_string()])
        .args(["-m", &format!("{}M", spec.mem_mib)])
        .args(["-nic", "none", "-display", "none", "-vga", "none"])
        .args(["-no-reboot", "-monitor", "none"])
        .args(["-serial", &format!("file:{}", console.display())])
        .arg("-kernel")
        .arg(&vfx.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 panic=-1 loglevel=4 svq.disks={} svq.disk_mib={}",
                spec.disks, spec.disk_mib
            ),
        ]);
    let t0 = Instant::now();
    let mut qemu = Proc::spawn(&spec.name, c, &dir.join(format!("{}.log", spec.name)));
    let exited = qemu.wait_exit(spec.timeout);
    let wall = t0.elapsed();
    let text = fs::read(&console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let out = GuestOutcome {
        console: text,
        wall,
    };
    let _ = fs::remove_file(&initrd);
    match exited {
        None => {
            qemu.stop(Duration::from_secs(1));
            Err(format!(
                "{}: the guest did not power off within {:?}\n--- console tail:\n{}",
                spec.name,
                spec.timeout,
                out.tail(40)
            ))
        }
        Some(_) if !out.console.contains("SVQ-VDUSE-END") => Err(format!(
            "{}: QEMU exited before the guest finished\n--- console tail:\n{}\n--- qemu log:\n{}",
            spec.name,
            out.tail(40),
            qemu.log_tail(20)
        )),
        Some(_) => Ok(out),
    }
}

/// The base initramfs, zero-padded to 4 bytes, followed by an uncompressed newc archive with the
/// spec's files, their libraries and `/svq/run.sh` (the kernel unpacks concatenated archives).
fn build_initrd(base: &Path, out: &Path, spec: &GuestSpec) -> Result<(), String> {
    let mut data = fs::read(base).map_err(|e| format!("{}: {e}", base.display()))?;
    data.resize(data.len().next_multiple_of(4), 0);
    let mut cpio = Cpio::default();
    cpio.dir("svq");
    let mut libs = Vec::new();
    for (src, name) in &spec.files {
        let bytes = fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
        cpio.file(&format!("svq/{name}"), 0o755, &bytes);
        for lib in ldd(src)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    for lib in &libs {
        let bytes = fs::read(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let mut parent = PathBuf::new();
        for comp in rel.parent().into_iter().flat_map(|p| p.components()) {
            parent.push(comp);
            cpio.dir(&parent.to_string_lossy());
        }
        cpio.file(&rel.to_string_lossy(), 0o755, &bytes);
    }
    let script = format!("#!/bin/sh\n{}\n", spec.script);
    cpio.file("svq/run.sh", 0o755, script.as_bytes());
    data.extend(cpio.finish());
    let mut f = fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    f.write_all(&data)
        .map_err(|e| format!("{}: {e}", out.display()))
}

/// The shared libraries (resolved paths, the loader included) `ldd` lists for `bin`.
fn ldd(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let path = match w.as_slice() {
            [_, "=>", p, ..] if p.starts_with('/') => p,
            [p, ..] if p.starts_with('/') => p,
            _ => continue,
        };
        // The real file, at the path the loader looks for.
        let p = PathBuf::from(path);
        if !p.exists() {
            return Err(format!("ldd {}: {path} missing", bin.display()));
        }
        libs.push(p);
    }
    Ok(libs)
}

/// A newc (SVR4, no CRC) cpio archive writer: what the kernel's initramfs unpacker reads.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}
