#!/usr/bin/env python3
"""svqd data-path benchmark: direct vs svqd passthrough vs svqd shadow, side by side in one run.

DPDK testpmd is both peers (virtio-user driver -> [svqd] -> net_vhost device). Each round runs the
three paths back to back (adjacent in time, so the machine's drift hits them alike) and reports,
per round, each path's rate, its ratio to direct, the CPU share every process got, and svqd's
worker CPU time per forwarded descriptor; then the median of the per-round ratios.

Layouts (2-core machine):
  contended  two testpmd processes, the driver (txonly) on CPU 0 and the device (rxonly) on CPU 1;
             svqd shares both CPUs with busy-polling lcores.
  dedicated  one testpmd holding both ports, one forwarding lcore on CPU 1 looping io between
             them; CPU 0 is svqd's (the virtio-user port is attached after svqd is up).

  scripts/bench/run.py --rounds 5 --seconds 8 --layout contended --pkt 64 --queues 1
Writes bench-results/<stamp>/{results.json,table.md,plot.svg}. Not a test: numbers drift by
tens of percent between runs on a shared machine; compare only within one run.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLK = os.sysconf("SC_CLK_TCK")


def die(msg):
    print(f"bench: {msg}", file=sys.stderr)
    sys.exit(2)


def cpu_ticks(pid, prefix=None):
    """utime+stime of a process, or of its threads whose name starts with `prefix`."""
    total = 0
    tasks = Path(f"/proc/{pid}/task")
    for t in tasks.iterdir() if prefix else [Path(f"/proc/{pid}")]:
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if prefix and not name.startswith(prefix):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total


class Proc:
    def __init__(self, name, argv, workdir):
        self.name = name
        self.log = open(workdir / f"{name}.log", "w+")
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.PIPE, start_new_session=True)

    def alive(self):
        return self.p.poll() is None

    def text(self):
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self):
        if self.alive():
            try:
                os.killpg(self.p.pid, signal.SIGINT)
                self.p.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


def wait_path(p, secs=30):
    end = time.time() + secs
    while not os.path.exists(p):
        if time.time() > end:
            die(f"{p} never appeared")
        time.sleep(0.05)


def testpmd_base(prefix, lcores, vdevs):
    # stdbuf: testpmd's stdout is a file here, and its answers must arrive when asked for.
    argv = ["stdbuf", "-oL", "dpdk-testpmd", "--lcores", lcores, "--no-pci", "--no-huge", "-m", "512",
            f"--file-prefix={prefix}{os.getpid()}"]
    for v in vdevs:
        argv += ["--vdev", v]
    return argv


def rx_pps(text, port):
    """Mean Rx-pps of `port` over testpmd's periodic stats (the first two skipped: warm-up)."""
    blocks = re.findall(r"NIC statistics for port (\d+)\s*#+(.*?)#{20,}", text, re.S)
    vals = [int(m.group(1)) for p, b in blocks if int(p) == port
            for m in [re.search(r"Rx-pps:\s+(\d+)", b)] if m]
    vals = vals[2:] if len(vals) > 3 else vals
    return statistics.mean(vals) if vals else 0.0


def io_packets(proc):
    """Packets the forwarding lcore of an interactive testpmd received, both ports together."""
    before = len(proc.text())
    proc.p.stdin.write(b"show port stats all\n")
    proc.p.stdin.flush()
    end = time.time() + 5
    while time.time() < end:
        got = re.findall(r"RX-packets:\s+(\d+)", proc.text()[before:])
        if len(got) >= 2:
            return int(got[0]) + int(got[1])
        time.sleep(0.05)
    die("testpmd did not answer show port stats")


def svqd_stats(ctl):
    out = subprocess.run([str(REPO / "target/release/svqctl"), "-c", ctl, "--json", "stats"],
                         capture_output=True, text=True, check=True).stdout
    return sum(q["descriptors"] for q in json.loads(out)["queues"])


def run_path(path, a, work, logs):
    """One measurement: `path` in direct/passthrough/shadow. Returns a dict of results."""
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    dev_sock, vmm_sock, ctl = str(work / "dev.sock"), str(work / "svqd.sock"), str(work / "ctl.sock")
    procs = {}
    try:
        q = a.queues
        if a.layout == "contended":
            procs["device"] = Proc("device", testpmd_base("dev", "0@1,1@1", [
                f"net_vhost0,iface={dev_sock},queues={q}"]) + [
                "--", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=rxonly",
                "--stats-period=1", "--total-num-mbufs=16384"], logs)
        else:
            # One testpmd, one forwarding lcore on CPU 1 (its main lcore too): CPU 0 is svqd's.
            procs["testpmd"] = Proc("testpmd", testpmd_base("one", "0@1,1@1", [
                f"net_vhost0,iface={dev_sock},queues={q}"]) + [
                "--", "-i", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=io",
                f"--txpkts={a.pkt}", "--total-num-mbufs=16384"], logs)
        wait_path(dev_sock)
        target = dev_sock
        if path != "direct":
            policy = "never" if path == "passthrough" else "always"
            argv = [str(REPO / "target/release/svqd"), "--socket", vmm_sock, "--backend", dev_sock,
                    "--control", ctl, "--shadow", policy] + a.svqd_arg
            if a.layout == "dedicated":
                argv = ["taskset", "-c", "0"] + argv
            procs["svqd"] = Proc("svqd", argv, logs)
            wait_path(vmm_sock)
            target = vmm_sock
        if a.layout == "contended":
            procs["driver"] = Proc("driver", testpmd_base("drv", "0@0,1@0", [
                f"net_virtio_user0,path={target},queues={q},queue_size=1024"]) + [
                "--", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=txonly",
                f"--txpkts={a.pkt}", "--stats-period=1", "--total-num-mbufs=16384"], logs)
            rate_proc, port = procs["device"], 0
        else:
            # Attach the driver port now that its socket listens, then loop packets between the
            # two ports with io forwarding, seeded by one burst.
            tp = procs["testpmd"]
            cmd = (f"port attach net_virtio_user0,path={target},queues={q},queue_size=1024\n"
                   "port start all\n")
            tp.p.stdin.write(cmd.encode())
            tp.p.stdin.flush()
            # Seed only once both ports run end to end (a burst sent while the driver's receive
            # ring is still being set up is dropped, and the loop would run one way only).
            time.sleep(1.0)
            tp.p.stdin.write(b"start tx_first 32\n")
            tp.p.stdin.flush()
            rate_proc, port = tp, None
        time.sleep(1.5)
        if port is None:
            c0 = io_packets(rate_proc)
        t0 = time.time()
        ticks0 = {k: cpu_ticks(p.p.pid) for k, p in procs.items()}
        w0 = cpu_ticks(procs["svqd"].p.pid, "svqd-q") if "svqd" in procs else 0
        d0 = svqd_stats(ctl) if "svqd" in procs else 0
        time.sleep(a.seconds)
        wall = time.time() - t0
        share = {k: (cpu_ticks(p.p.pid) - ticks0[k]) / CLK / wall for k, p in procs.items()}
        res = {"path": path, "share": share}
        if "svqd" in procs:
            w1 = cpu_ticks(procs["svqd"].p.pid, "svqd-q")
            d1 = svqd_stats(ctl)
            res["descriptors"] = d1 - d0
            res["ns_per_desc"] = ((w1 - w0) / CLK * 1e9 / (d1 - d0)) if d1 > d0 else None
        if port is None:
            res["pps"] = (io_packets(rate_proc) - c0) / (time.time() - t0)
        for p in procs.values():
            p.stop()
        if port is not None:
            res["pps"] = rx_pps(rate_proc.text(), port)
        return res
    finally:
        for p in procs.values():
            if not p.log.closed:
                p.stop()
        for s in (dev_sock, vmm_sock, ctl):
            try:
                os.unlink(s)
            except OSError:
                pass


def svg_plot(rounds, out):
    paths = ["passthrough", "shadow"]
    colors = {"passthrough": "#4c78a8", "shadow": "#f58518"}
    w, h, pad = 120 + 90 * len(rounds), 260, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{pad}" y="16">svqd rate / direct rate, per round (1.0 = parity)</text>',
             f'<line x1="{pad}" y1="{h-pad}" x2="{w-10}" y2="{h-pad}" stroke="black"/>']
    scale = (h - 2 * pad) / 1.1
    y1 = h - pad - scale
    parts.append(f'<line x1="{pad}" y1="{y1:.1f}" x2="{w-10}" y2="{y1:.1f}" stroke="#999" stroke-dasharray="4"/>')
    parts.append(f'<text x="4" y="{y1+4:.1f}">1.0</text>')
    for i, r in enumerate(rounds):
        for j, p in enumerate(paths):
            ratio = r["ratios"].get(p) or 0
            bh = ratio * scale
            x = pad + 10 + i * 90 + j * 35
            parts.append(f'<rect x="{x}" y="{h-pad-bh:.1f}" width="30" height="{bh:.1f}" fill="{colors[p]}"/>')
            parts.append(f'<text x="{x}" y="{h-pad-bh-3:.1f}">{ratio:.2f}</text>')
        parts.append(f'<text x="{pad+20+i*90}" y="{h-pad+14}">round {i+1}</text>')
    for j, p in enumerate(paths):
        parts.append(f'<rect x="{w-110}" y="{24+j*14}" width="10" height="10" fill="{colors[p]}"/>')
        parts.append(f'<text x="{w-95}" y="{33+j*14}">{p}</text>')
    parts.append("</svg>")
    out.write_text("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--layout", choices=["contended", "dedicated"], default="contended")
    ap.add_argument("--pkt", type=int, default=64)
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench-results"))
    ap.add_argument("--svqd-arg", action="append", default=[],
                    help="extra svqd argument (repeatable), e.g. --svqd-arg=--poll-us=50")
    a = ap.parse_args()
    for tool in ("dpdk-testpmd", "taskset", "stdbuf"):
        if not shutil.which(tool):
            die(f"{tool} not found (dpdk-testpmd: Debian package dpdk-dev; scripts/peers/deps.sh)")
    if not (REPO / "target/release/svqd").exists():
        die("build first: cargo build --release -p svqd")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) / stamp
    out.mkdir(parents=True)
    rounds = []
    # Sockets live in a short temporary directory (sun_path is 108 bytes); logs are kept.
    with tempfile.TemporaryDirectory(prefix="svqb-") as tmp:
        for r in range(a.rounds):
            res = {p: run_path(p, a, Path(tmp) / f"r{r}-{p}", out / "logs" / f"r{r}-{p}")
                   for p in ("direct", "passthrough", "shadow")}
            if not res["direct"]["pps"]:
                die(f"no rate measured on the direct path; see {out / 'logs'}")
            direct = res["direct"]["pps"]
            ratios = {p: (res[p]["pps"] / direct if direct else None) for p in ("passthrough", "shadow")}
            rounds.append({"results": res, "ratios": ratios})
            print(f"round {r+1}: direct {direct/1e6:.2f} Mpps, passthrough x{ratios['passthrough']:.3f}, "
                  f"shadow x{ratios['shadow']:.3f} "
                  f"({res['shadow'].get('ns_per_desc') or 0:.0f} ns svqd CPU/descriptor)", flush=True)
    med = {p: statistics.median([r["ratios"][p] for r in rounds if r["ratios"][p] is not None] or [0])
           for p in ("passthrough", "shadow")}
    summary = {"args": vars(a), "cpus": os.cpu_count(), "rounds": rounds, "median_ratio": med}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = [f"layout {a.layout}, {a.pkt} B, {a.queues} queue pair(s), {a.rounds} rounds of {a.seconds} s, "
             f"svqd {' '.join(a.svqd_arg) or '(defaults)'}",
             "", "| round | direct Mpps | passthrough | shadow | svqd ns/desc (shadow) | CPU share, direct | CPU share, shadow |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds):
        d, s = r["results"]["direct"], r["results"]["shadow"]
        sh = lambda x: " ".join(f"{k} {v:.2f}" for k, v in x["share"].items())
        lines.append(f"| {i+1} | {d['pps']/1e6:.2f} | {r['ratios']['passthrough']:.3f} | {r['ratios']['shadow']:.3f} | "
                     f"{(s.get('ns_per_desc') or 0):.0f} | {sh(d)} | {sh(s)} |")
    lines.append(f"| **median ratio** | | **{med['passthrough']:.3f}** | **{med['shadow']:.3f}** | | | |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    svg_plot(rounds, out / "plot.svg")
    print("\n".join(lines))
    print(f"\nresults in {out}")


if __name__ == "__main__":
    main()
