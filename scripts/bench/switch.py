#!/usr/bin/env python3
"""svqd mode-switch latency against a real device: blk-load (the testkit's guest driver, QD16)
-> svqd -> qemu-storage-daemon, switched to shadow and back N times at runtime with
`svqctl set-shadow`; svqd's own time per switch (`query-stats` last_switch_to_*_us) is read after
each one. Reports p50/p90/max per direction, the late completions svqd waited for, and whether
the load saw any error (reads are checked against the driver's model, the image at the end).

  scripts/bench/switch.py --switches 200
Writes bench-results/<stamp>-switch/{results.json,table.md,logs/}. Not a test (timings).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the harness: processes, qsd discovery, svqd start)


def pct(v, p):
    v = sorted(v)
    return v[(len(v) - 1) * p // 100]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--switches", type=int, default=200, help="round trips (to shadow and back)")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--gap-ms", type=float, default=20, help="pause after each switch")
    ap.add_argument("--out", default=str(run.REPO / "bench-results"))
    ap.add_argument("--svqd-arg", action="append", default=[])
    a = ap.parse_args()
    qsd = run.find_qsd()
    if not qsd:
        run.die("qemu-storage-daemon not found: set SVQ_QSD or run scripts/peers/fixtures.sh")
    for b in ("svqd", "svqctl", "blk-load"):
        if not (run.REPO / "target/release" / b).exists():
            run.die("build first: cargo build --release -p svqd -p svq-benches --bins")
    out = Path(a.out) / (time.strftime("%Y%m%d-%H%M%S") + "-switch")
    logs = out / "logs"
    logs.mkdir(parents=True)
    svqctl = str(run.REPO / "target/release/svqctl")
    with tempfile.TemporaryDirectory(prefix="svqs-") as tmp:
        dev, vmm, ctl = f"{tmp}/dev.sock", f"{tmp}/svqd.sock", f"{tmp}/ctl.sock"
        image = Path("/dev/shm") / f"svqs-{os.getpid()}.raw"
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.posix_fallocate(fd, 0, 64 << 20)
        os.close(fd)
        procs = []
        try:
            procs.append(run.Proc("qsd", [qsd, "--blockdev", f"driver=file,node-name=f0,filename={image}",
                                          "--export", "type=vhost-user-blk,id=e0,node-name=f0,"
                                          f"addr.type=unix,addr.path={dev},writable=on"], logs))
            run.wait_path(dev)
            a.svqd_arg = list(a.svqd_arg)
            procs.append(run.start_svqd("auto", a, dev, vmm, ctl, logs))
            # Long enough for every switch (each round trip takes ~2 gaps and three svqctl calls).
            seconds = 5 + a.switches * (2 * a.gap_ms / 1000 + 0.05)
            load = run.Proc("blk-load", [str(run.REPO / "target/release/blk-load"), "--socket", vmm,
                                         "--depth", str(a.depth), "--blocks", str((64 << 20) // 4096),
                                         "--warmup", "0.5", "--seconds", f"{seconds:.0f}",
                                         "--verify-image", str(image)], logs)
            procs.append(load)
            time.sleep(1.5)
            times = []
            for i in range(a.switches):
                for on in ("on", "off"):
                    rc = os.system(f"{svqctl} --control {ctl} set-shadow {on} >/dev/null")
                    if rc:
                        run.die(f"switch {i} {on} failed; see {logs}")
                    time.sleep(a.gap_ms / 1000)
                q = json.loads(os.popen(f"{svqctl} --control {ctl} --json query-stats").read())["queues"][0]
                times.append((q["last_switch_to_shadow_us"], q["last_switch_to_passthrough_us"],
                              q["late_completions"]))
            load.p.wait(seconds + 60)  # it verifies the image at the end
        finally:
            for p in reversed(procs):
                p.stop()
            image.unlink(missing_ok=True)
    errors = [l for l in (logs / "blk-load.log").read_text().splitlines() if l.startswith("{")]
    load_result = json.loads(errors[-1]) if errors else None
    res = {"switches": a.switches, "depth": a.depth, "gap_ms": a.gap_ms, "svqd_args": a.svqd_arg,
           "to_shadow_us": [t[0] for t in times], "to_passthrough_us": [t[1] for t in times],
           "late_completions": times[-1][2] if times else 0, "load": load_result}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"blk-load QD{a.depth} -> svqd -> qemu-storage-daemon, {a.switches} round trips, "
             f"{a.gap_ms:g} ms apart", "",
             "| direction | p50 µs | p90 µs | max µs |", "|---|---|---|---|"]
    for name, v in (("to shadow", res["to_shadow_us"]), ("to passthrough", res["to_passthrough_us"])):
        lines.append(f"| {name} | {pct(v, 50)} | {pct(v, 90)} | {max(v)} |")
    lines.append("")
    lines.append(f"late completions waited for: {res['late_completions']}; load: "
                 + (f"{load_result['requests']} requests, {load_result['errors']} errors, "
                    f"{load_result['reads_verified']} reads verified" if load_result else "no result"))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nresults in {out}")
    if not load_result or load_result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
