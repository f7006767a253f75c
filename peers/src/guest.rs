//! Guest-side conventions shared with `scripts/peers/guest/init.sh`: the disk layout, the kernel
//! command line, and the console lines the guest prints.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

/// MiB of known data at the start of the disk (the guest reads it again and again).
pub const DATA_MIB: u64 = 16;
/// MiB of scratch space after the data (the guest writes and reads it back).
pub const SCRATCH_MIB: u64 = 4;

/// Writes a disk image: `DATA_MIB` of a pattern unique per 8-byte word (so every 4 KiB block, and
/// every page the device DMAs into guest RAM, has distinct contents), then zeroed scratch space.
/// Returns the md5 of the data region, which the guest checks.
pub fn make_disk(path: &Path) -> String {
    let mut f = fs::File::create(path).expect("create disk image");
    let words = (DATA_MIB << 20) / 8;
    let mut buf = Vec::with_capacity(1 << 20);
    for w in 0..words {
        buf.extend_from_slice(
            &(w.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5356_512d_7065_6572).to_le_bytes(),
        );
        if buf.len() == 1 << 20 {
            f.write_all(&buf).expect("write disk");
            buf.clear();
        }
    }
    f.set_len((DATA_MIB + SCRATCH_MIB) << 20)
        .expect("size disk");
    drop(f);
    data_md5(path)
}

/// The md5 of the disk's data region as the host sees it now (via `md5sum`).
pub fn data_md5(path: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} \"$0\" | md5sum | cut -d' ' -f1",
            DATA_MIB << 20
        ))
        .arg(path)
        .output()
        .expect("run md5sum");
    assert!(out.status.success(), "md5sum failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Kernel command line for a workload `mode` (see init.sh). `init_on_alloc=0` keeps freed pages'
/// old contents, so the device's writes into recycled page-cache pages really change guest RAM.
pub fn append(mode: &str, data_md5: &str) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 init_on_alloc=0 mode={mode} dmib={DATA_MIB} \
         smib={SCRATCH_MIB} dmd5={data_md5}"
    )
}

/// The highest `SVQ-ITER n ok` iteration in a console text, and whether any failure was printed.
pub fn iterations(console: &str) -> (u64, Option<String>) {
    let mut last = 0;
    let mut fail = None;
    for l in console.lines() {
        let l = l.trim_start_matches(|c: char| !c.is_ascii_graphic());
        if let Some(rest) = l.strip_prefix("SVQ-ITER ") {
            let mut it = rest.split_whitespace();
            let n = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            if it.next() == Some("ok") {
                last = last.max(n);
            }
        }
        if l.contains("SVQ-FAIL") && fail.is_none() {
            fail = Some(l.to_string());
        }
    }
    (last, fail)
}
