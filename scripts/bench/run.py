#!/usr/bin/env python3
"""svqd data-path benchmark: direct vs svqd passthrough vs svqd shadow, side by side in one run.

Each round runs the three paths back to back (direct first in odd-numbered rounds, last in the
others, so a drift within rounds cancels over the run; adjacent in time, so the machine's drift hits them
alike) and reports, per round, each path's rate, its ratio to direct, the CPU share every process
got, and svqd's worker CPU time per forwarded descriptor; then the median of the per-round ratios.
Before the rounds it measures what a wake-up costs on the machine (target/release/wake-cost): shadow
mode adds wake-ups to the data path, so every shadow ratio of the run depends on that cost.

Workloads:
  dpdk  DPDK testpmd is both peers (virtio-user driver -> [svqd] -> net_vhost device); rate in
        packets/s.
  blk   target/release/blk-load (the testkit's guest driver behind a simulated VMM: 4 KiB random
        reads/writes at --depth per queue, every read checked against its model, the image
        compared with the model at the end) -> [svqd] -> qemu-storage-daemon's vhost-user-blk
        export of a fresh raw image in --image-dir (tmpfs by default); rate in IOPS, with p50/p99
        latency. A path with any data error is reported FAILED and the run exits 1.

DPDK layouts (2-core machine; the blk workload runs unpinned):
  contended  two testpmd processes, the driver (txonly) on CPU 0 and the device (rxonly) on CPU 1;
             svqd shares both CPUs with busy-polling lcores.
  dedicated  one testpmd holding both ports, one forwarding lcore on CPU 1 looping io between
             them; CPU 0 is svqd's (the virtio-user port is attached after svqd is up).

  scripts/bench/run.py --rounds 5 --seconds 8 --layout contended --pkt 64 --queues 1
  scripts/bench/run.py --workload blk --rounds 5 --seconds 8 --depth 16 --read-pct 50
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
# What starts the dedicated layout's io loop: forwarding, after one burst of 32 packets per port.
SEED = "start tx_first 32\n"


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


def wait_text(proc, text, secs=30):
    end = time.time() + secs
    while text not in proc.text():
        if time.time() > end or not proc.alive():
            die(f"{proc.name} never printed {text!r}")
        time.sleep(0.02)


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


def svqd_counts(ctl):
    """svqd's counters from one `svqctl stats`: descriptors and chains forwarded, summed over the
    queues, and the worker's wake-ups (every ring a thread serves counts each of its wakes, so the
    busiest ring's count is the thread's; exact with one worker thread, the default)."""
    out = subprocess.run([str(REPO / "target/release/svqctl"), "-c", ctl, "--json", "stats"],
                         capture_output=True, text=True, check=True).stdout
    queues = json.loads(out)["queues"]
    return {"descriptors": sum(q["descriptors"] for q in queues),
            "chains": sum(q["chains"] for q in queues),
            "wakes": max((q["worker_wakeups"] for q in queues), default=0)}


def counts_between(c0, c1):
    return {k: c1[k] - c0[k] for k in c0}


def virtio_user_vdev(target, q):
    # virtio-user refuses more than one queue pair without a control queue ("multi-q requires
    # ctrl-q"); it serves that queue itself, the backend only sees the data queue pairs.
    return f"net_virtio_user0,path={target},queues={q},queue_size=1024" + (",cq=1" if q > 1 else "")


def start_svqd(path, a, dev_sock, vmm_sock, ctl, logs, pin=None):
    policy = {"passthrough": "never", "shadow": "always"}.get(path, path)
    argv = [str(REPO / "target/release/svqd"), "--socket", vmm_sock, "--backend", dev_sock,
            "--control", ctl, "--shadow", policy] + a.svqd_arg
    if pin is not None:
        argv = ["taskset", "-c", pin] + argv
    p = Proc("svqd", argv, logs)
    if getattr(a, "svqd_nice", 0):
        set_group_nice(p.p.pid, a.svqd_nice)
    wait_path(vmm_sock)
    return p


def set_group_nice(pid, nice):
    """Weight svqd's scheduling group against the peers'. Every process here runs in a session of
    its own, so with CONFIG_SCHED_AUTOGROUP the kernel shares a CPU between the three processes
    as groups (a thread's own nice only counts inside its group): the autogroup's nice is what a
    cgroup's CPUWeight= is under systemd."""
    path = Path(f"/proc/{pid}/autogroup")
    try:
        path.write_text(str(nice))
    except OSError as e:
        die(f"--svqd-nice: cannot set {path} ({e}); is CONFIG_SCHED_AUTOGROUP on?")


def run_path(path, a, work, logs):
    """One DPDK measurement: `path` in direct/passthrough/shadow. Returns a dict of results."""
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    dev_sock, vmm_sock, ctl = str(work / "dev.sock"), str(work / "svqd.sock"), str(work / "ctl.sock")
    procs = {}
    try:
        q = a.queues
        # testpmd's default (0) takes ethdev's fallback of 512 descriptors per queue, whatever
        # the virtio-user ring size: the driver never has more than 512 buffers in flight.
        desc = [f"--txd={a.ring_desc}", f"--rxd={a.ring_desc}"] if a.ring_desc else []
        if a.layout == "contended":
            procs["device"] = Proc("device", testpmd_base("dev", "0@1,1@1", [
                f"net_vhost0,iface={dev_sock},queues={q}"]) + [
                "--", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=rxonly",
                "--stats-period=1", "--total-num-mbufs=16384"] + desc, logs)
        else:
            # One testpmd, one forwarding lcore on CPU 1 (its main lcore too): CPU 0 is svqd's.
            procs["testpmd"] = Proc("testpmd", testpmd_base("one", "0@1,1@1", [
                f"net_vhost0,iface={dev_sock},queues={q}"]) + [
                "--", "-i", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=io",
                f"--txpkts={a.pkt}", "--total-num-mbufs=16384"] + desc, logs)
        wait_path(dev_sock)
        target = dev_sock
        if path != "direct":
            procs["svqd"] = start_svqd(path, a, dev_sock, vmm_sock, ctl, logs,
                                       "0" if a.layout == "dedicated" else None)
            target = vmm_sock
        if a.layout == "contended":
            procs["driver"] = Proc("driver", testpmd_base("drv", "0@0,1@0", [
                virtio_user_vdev(target, q)]) + [
                "--", f"--rxq={q}", f"--txq={q}", "--nb-cores=1", "--forward-mode=txonly",
                f"--txpkts={a.pkt}", "--stats-period=1", "--total-num-mbufs=16384"] + desc, logs)
            rate_proc, port = procs["device"], 0
        else:
            # Attach the driver port now that its socket listens, then loop packets between the
            # two ports with io forwarding, seeded by one burst.
            tp = procs["testpmd"]
            cmd = f"port attach {virtio_user_vdev(target, q)}\nport start all\n"
            tp.p.stdin.write(cmd.encode())
            tp.p.stdin.flush()
            # Seed only once both ports run end to end: a burst sent while the driver's receive
            # ring is still being set up is dropped, and with io forwarding that direction then
            # stays empty for good. testpmd reads the commands only once its own start-up is
            # done, and through svqd the device is ready ~0.2 s after the port started (each
            # shadow ring's memory-table change costs DPDK ~50 ms), so wait for the device.
            wait_text(tp, "virtio is now ready for processing")
            time.sleep(0.5)
            # io forwarding with retry (on every path): a burst the other port's ring cannot
            # take at once waits for room instead of leaving the loop for good. Without it, a
            # loop through a receive ring that runs empty for a moment loses packets each time
            # and decays to a trickle (through svqd, the receive buffers the driver refills
            # reach the device one relay later). --no-tx-retry measures that variant.
            fwd = "" if a.no_tx_retry else "set fwd io retry\n"
            tp.p.stdin.write(f"{fwd}{SEED}".encode())
            tp.p.stdin.flush()
            rate_proc, port = tp, None
        time.sleep(1.5)
        reseeded = 0
        if port is None:
            c0 = io_packets(rate_proc)
            # The seed (32 bursts a port) fills both transmit rings at once; if either peer is
            # late returning them at that moment (64 retries of 1 µs), io forwarding drops every
            # packet there is and the loop is empty for good — a property of a closed loop, not
            # a rate: seed it again (the count is in the results) and measure the loop running.
            while True:
                time.sleep(0.2)
                c1 = io_packets(rate_proc)
                if c1 > c0 or reseeded == 3:
                    c0 = c1
                    break
                reseeded += 1
                rate_proc.p.stdin.write(f"stop\n{SEED}".encode())
                rate_proc.p.stdin.flush()
                time.sleep(0.5)
                c0 = io_packets(rate_proc)
        t0 = time.time()
        ticks0 = {k: cpu_ticks(p.p.pid) for k, p in procs.items()}
        w0 = cpu_ticks(procs["svqd"].p.pid, "svqd-shadow") if "svqd" in procs else 0
        n0 = svqd_counts(ctl) if "svqd" in procs else None
        time.sleep(a.seconds)
        wall = time.time() - t0
        share = {k: (cpu_ticks(p.p.pid) - ticks0[k]) / CLK / wall for k, p in procs.items()}
        res = {"path": path, "share": share}
        if reseeded:
            res["reseeded"] = reseeded
        if "svqd" in procs:
            w1 = cpu_ticks(procs["svqd"].p.pid, "svqd-shadow")
            n = counts_between(n0, svqd_counts(ctl))
            res["descriptors"] = n["descriptors"]
            res["ns_per_desc"] = (w1 - w0) / CLK * 1e9 / n["descriptors"] if n["descriptors"] > 0 else None
            res["wakes_per_s"] = n["wakes"] / wall
            res["chains_per_wake"] = n["chains"] / n["wakes"] if n["wakes"] else None
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


def find_qsd():
    """qemu-storage-daemon: $SVQ_QSD, else the fixtures' env file (scripts/peers/fixtures.sh), else PATH."""
    if os.environ.get("SVQ_QSD"):
        return os.environ["SVQ_QSD"]
    fx = Path(os.environ.get("SVQ_FIXTURES") or Path.home() / ".cache/svq-fixtures") / "env"
    if fx.exists():
        for line in fx.read_text().splitlines():
            k, _, v = line.partition("=")
            if k.strip() == "SVQ_QSD" and v.strip() and os.path.exists(v.strip()):
                return v.strip()
    return shutil.which("qemu-storage-daemon")


def run_blk_path(path, a, r, work, logs):
    """One block measurement: blk-load -> [svqd in `path` mode] -> qemu-storage-daemon."""
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    dev_sock, vmm_sock, ctl = str(work / "dev.sock"), str(work / "svqd.sock"), str(work / "ctl.sock")
    # A fresh, fully allocated image per path: the driver's model starts from an all-zero disk,
    # and no path pays for allocating blocks another path already touched.
    image = Path(a.image_dir) / f"svqb-{os.getpid()}-r{r}-{path}.raw"
    fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, a.disk_mib << 20)
    finally:
        os.close(fd)
    procs = {}
    try:
        procs["qsd"] = Proc("qsd", [a.qsd, "--blockdev",
                                    f"driver=file,node-name=file0,filename={image}",
                                    "--export", "type=vhost-user-blk,id=exp0,node-name=file0,"
                                    f"addr.type=unix,addr.path={dev_sock},writable=on,"
                                    f"num-queues={a.queues}"], logs)
        wait_path(dev_sock)
        target = dev_sock
        if path != "direct":
            procs["svqd"] = start_svqd(path, a, dev_sock, vmm_sock, ctl, logs)
            target = vmm_sock
        procs["blk-load"] = Proc("blk-load", [
            str(REPO / "target/release/blk-load"), "--socket", target, "--queues", str(a.queues),
            "--depth", str(a.depth), "--read-pct", str(a.read_pct),
            "--indirect-pct", str(a.indirect_pct), "--blocks", str((a.disk_mib << 20) // 4096),
            "--warmup", str(a.warmup), "--seconds", str(a.seconds), "--seed", str(r + 1),
            "--verify-image", str(image)], logs)
        # CPU and svqd's counters are sampled inside blk-load's measured window (the counters
        # reset when the VMM disconnects), with a margin on both sides.
        time.sleep(a.warmup + 0.2)
        load = procs["blk-load"]
        if not load.alive():
            die(f"blk-load exited early on the {path} path:\n{load.text()[-2000:]}")
        t0 = time.time()
        ticks0 = {k: cpu_ticks(p.p.pid) for k, p in procs.items()}
        svqd = procs.get("svqd")
        w0 = cpu_ticks(svqd.p.pid, "svqd-shadow") if svqd else 0
        n0 = svqd_counts(ctl) if svqd else None
        time.sleep(max(a.seconds - 0.4, 0.1))
        wall = time.time() - t0
        share = {k: (cpu_ticks(p.p.pid) - ticks0[k]) / CLK / wall for k, p in procs.items()}
        res = {"path": path, "share": share}
        if svqd:
            w1 = cpu_ticks(svqd.p.pid, "svqd-shadow")
            n = counts_between(n0, svqd_counts(ctl))
            cpu_ns = (w1 - w0) / CLK * 1e9
            res["descriptors"], res["chains"] = n["descriptors"], n["chains"]
            res["ns_per_desc"] = cpu_ns / res["descriptors"] if res["descriptors"] else None
            res["ns_per_req"] = cpu_ns / res["chains"] if res["chains"] else None
        try:
            load.p.wait(a.seconds + 60)
        except subprocess.TimeoutExpired:
            die(f"blk-load did not finish on the {path} path; see {logs}")
        lines = [l for l in load.text().splitlines() if l.startswith("{")]
        if not lines:
            die(f"blk-load printed no result on the {path} path:\n{load.text()[-2000:]}")
        out = json.loads(lines[-1])
        res.update({k: out[k] for k in ("iops", "p50_us", "p99_us", "mean_us", "max_us", "requests",
                                        "errors", "first_error", "reads_verified",
                                        "image_blocks_verified")})
        res["ok"] = load.p.returncode == 0 and out["errors"] == 0
        return res
    finally:
        # Front to back: svqd before its backend, so that it stops without waiting for a peer.
        for p in reversed(list(procs.values())):
            if not p.log.closed:
                p.stop()
        for f in (dev_sock, vmm_sock, ctl, image):
            try:
                os.unlink(f)
            except OSError:
                pass


def svg_plot(rounds, out, target=None):
    paths = ["passthrough", "shadow"]
    colors = {"passthrough": "#4c78a8", "shadow": "#f58518"}
    w, h, pad = 120 + 90 * len(rounds), 260, 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{pad}" y="16">svqd rate / direct rate, per round (1.0 = parity)</text>',
             f'<line x1="{pad}" y1="{h-pad}" x2="{w-10}" y2="{h-pad}" stroke="black"/>']
    scale = (h - 2 * pad) / 1.1
    for level in [1.0] + ([target] if target else []):
        y1 = h - pad - scale * level
        parts.append(f'<line x1="{pad}" y1="{y1:.1f}" x2="{w-10}" y2="{y1:.1f}" stroke="#999" stroke-dasharray="4"/>')
        parts.append(f'<text x="4" y="{y1+4:.1f}">{level:.2f}</text>')
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


def path_order(r, control=False):
    """The paths of round `r`: direct first in even rounds, last in odd ones (ABBA), so a drift of
    the machine's speed within rounds favours neither side of a ratio over the run. `control`
    adds a second direct measurement at the other end of the round (`direct2`)."""
    order = ("direct", "passthrough", "shadow") + (("direct2",) if control else ())
    return order if r % 2 == 0 else order[::-1]


def dpdk_round(a, r, tmp, out):
    res = {p: run_path("direct" if p == "direct2" else p, a, Path(tmp) / f"r{r}-{p}",
                       out / "logs" / f"r{r}-{p}")
           for p in path_order(r, a.control_direct)}
    if not res["direct"]["pps"]:
        die(f"no rate measured on the direct path; see {out / 'logs'}")
    direct = res["direct"]["pps"]
    ratios = {p: res[p]["pps"] / direct for p in res if p != "direct"}
    again = f", direct again x{ratios['direct2']:.3f}" if "direct2" in ratios else ""
    seeds = ", ".join(f"{p} seeded again {x['reseeded']}x" for p, x in res.items() if x.get("reseeded"))
    print(f"round {r+1}: direct {direct/1e6:.2f} Mpps, passthrough x{ratios['passthrough']:.3f}, "
          f"shadow x{ratios['shadow']:.3f}{again} "
          f"({res['shadow'].get('ns_per_desc') or 0:.0f} ns svqd CPU/descriptor)"
          + (f" ({seeds}: the start-up loop died)" if seeds else ""), flush=True)
    return {"results": res, "ratios": ratios}


def blk_round(a, r, tmp, out):
    res = {p: run_blk_path(p, a, r, Path(tmp) / f"r{r}-{p}", out / "logs" / f"r{r}-{p}")
           for p in path_order(r)}
    for p, x in res.items():
        if not x["ok"]:
            print(f"round {r+1}: {p} path FAILED: {x['errors']} error(s), first: {x['first_error']}",
                  file=sys.stderr, flush=True)
    direct = res["direct"]["iops"] if res["direct"]["ok"] else None
    ratios = {p: (res[p]["iops"] / direct if direct and res[p]["ok"] else None)
              for p in ("passthrough", "shadow")}
    fmt = lambda v: f"x{v:.3f}" if v is not None else "FAILED"
    lat = lambda p: f"{res[p]['p50_us'] or 0:.0f}/{res[p]['p99_us'] or 0:.0f}"
    print(f"round {r+1}: direct {res['direct']['iops']/1e3:.1f} kIOPS ({lat('direct')} us p50/p99), "
          f"passthrough {fmt(ratios['passthrough'])} ({lat('passthrough')}), "
          f"shadow {fmt(ratios['shadow'])} ({lat('shadow')}), "
          f"{res['shadow'].get('ns_per_req') or 0:.0f} ns svqd CPU/request", flush=True)
    return {"results": res, "ratios": ratios}


def share_text(x):
    return " ".join(f"{k} {v:.2f}" for k, v in x["share"].items())


def svqd_text(a):
    """How svqd ran, for a table's heading."""
    nice = f", svqd's group at nice {a.svqd_nice}" if a.svqd_nice else ""
    return f"svqd {' '.join(a.svqd_arg) or '(defaults)'}{nice}"


def wake_rate_text(x):
    if x.get("chains_per_wake") is None:
        return "–"
    return f"{x['wakes_per_s'] / 1e3:.1f} k, {x['chains_per_wake']:.0f}"


def dpdk_table(a, rounds, med):
    lines = [f"layout {a.layout}, {a.pkt} B, {a.queues} queue pair(s), {a.rounds} rounds of {a.seconds} s, "
             f"{a.ring_desc or 'default (512)'} descriptors per testpmd queue, "
             f"{svqd_text(a)}",
             "", "| round | direct Mpps | passthrough | shadow | svqd ns/desc (shadow) | svqd wakes/s, chains/wake "
             "| CPU share, direct | CPU share, shadow |" + (" direct again |" if a.control_direct else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if a.control_direct else "")]
    for i, r in enumerate(rounds):
        d, s = r["results"]["direct"], r["results"]["shadow"]
        again = f" {r['ratios']['direct2']:.3f} |" if a.control_direct else ""
        lines.append(f"| {i+1} | {d['pps']/1e6:.2f} | {r['ratios']['passthrough']:.3f} | {r['ratios']['shadow']:.3f} | "
                     f"{(s.get('ns_per_desc') or 0):.0f} | {wake_rate_text(s)} | {share_text(d)} | "
                     f"{share_text(s)} |{again}")
    again = f" **{med['direct2']:.3f}** |" if a.control_direct else ""
    lines.append(f"| **median ratio** | | **{med['passthrough']:.3f}** | **{med['shadow']:.3f}** | | | | |{again}")
    seeds = [f"round {i+1} {p} {x['reseeded']}x" for i, r in enumerate(rounds)
             for p, x in r["results"].items() if x.get("reseeded")]
    if seeds:
        lines += ["", "Seeded again because the start-up io loop died (see run_path): " + ", ".join(seeds)]
    return lines


def added_latency(direct, shadow):
    """Microseconds a request took longer through shadow mode than direct, on average."""
    if not (direct["ok"] and shadow["ok"]) or direct["mean_us"] is None or shadow["mean_us"] is None:
        return None
    return shadow["mean_us"] - direct["mean_us"]


def added_text(direct, shadow):
    v = added_latency(direct, shadow)
    return f"{v:+.0f}" if v is not None else "–"


def blk_table(a, rounds, med):
    lines = [f"block: qemu-storage-daemon on a {a.disk_mib} MiB raw image in {a.image_dir}, "
             f"{a.queues} queue(s), depth {a.depth}, 4 KiB, {a.read_pct}% reads, "
             f"{a.indirect_pct}% indirect, {a.rounds} rounds of {a.seconds} s after {a.warmup} s warm-up, "
             f"{svqd_text(a)}",
             "", "| round | direct kIOPS | passthrough | shadow | p50/p99 µs direct | p50/p99 µs passthrough "
             "| p50/p99 µs shadow | shadow − direct, mean µs | svqd ns/desc, ns/request (shadow) "
             "| CPU share, direct | CPU share, passthrough | CPU share, shadow |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.3f}" if v is not None else "FAILED"
    for i, r in enumerate(rounds):
        res = r["results"]
        d, s = res["direct"], res["shadow"]
        lat = lambda x: (f"{x['p50_us'] or 0:.0f} / {x['p99_us'] or 0:.0f}" if x["ok"]
                         else f"FAILED ({x['errors']} errors)")
        lines.append(f"| {i+1} | {d['iops']/1e3:.1f}{'' if d['ok'] else ' FAILED'} | "
                     f"{fmt(r['ratios']['passthrough'])} | {fmt(r['ratios']['shadow'])} | "
                     f"{lat(d)} | {lat(res['passthrough'])} | {lat(s)} | {added_text(d, s)} | "
                     f"{(s.get('ns_per_desc') or 0):.0f}, {(s.get('ns_per_req') or 0):.0f} | "
                     f"{share_text(d)} | {share_text(res['passthrough'])} | {share_text(s)} |")
    lines.append(f"| **median ratio** | | **{fmt(med['passthrough'])}** | **{fmt(med['shadow'])}** "
                 "| | | | | | | | |")
    if med["shadow"] is not None:
        met = "met" if med["shadow"] >= BLK_TARGET else "NOT met"
        lines += ["", f"Target (issue 11): block through svqd shadow >= {BLK_TARGET:.2f} x direct IOPS at "
                  f"queue depth 16. This run (depth {a.depth}): median x{med['shadow']:.3f}, {met}."]
    return lines


BLK_TARGET = 0.90


def wake_cost():
    """What a wake-up costs on this machine (benches/src/bin/wake-cost.rs), or None without the
    probe. Measured once per run, before the rounds: every shadow ratio of the run depends on it."""
    probe = REPO / "target/release/wake-cost"
    if not probe.exists():
        print("bench: no target/release/wake-cost (cargo build --release -p svq-benches --bins); "
              "the run's wake-up costs are not measured", file=sys.stderr)
        return None
    out = subprocess.run([str(probe), "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"bench: wake-cost failed: {out.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(out.stdout.splitlines()[-1])


def wake_text(w):
    """The wake-up costs, for a table's heading."""
    if not w:
        return "Wake-ups on this machine: not measured."
    across = (f"{w['hop_cross_cpu_us']:.1f} µs across CPUs" if w.get("hop_cross_cpu_us") is not None
              else "one CPU only")
    return (f"Wake-ups on this machine (`wake-cost`, before the rounds): an eventfd hop between two "
            f"processes costs {w['hop_same_cpu_us']:.1f} µs on one CPU, {across}; a {w['sleep_us']} µs "
            f"timer sleep ends after {w['timer_wake_idle_cpu_us']:.1f} µs on an idle CPU, "
            f"{w['timer_wake_busy_cpu_us']:.1f} µs on one a busy loop keeps busy, and costs the sleeping "
            f"thread {w['timer_sleep_thread_cpu_busy_us']:.1f} µs of CPU there (a shadow worker pays "
            f"that for every wake before it does any work).")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["dpdk", "blk"], default="dpdk")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--queues", type=int, default=1, help="queue pairs (dpdk) or queues (blk)")
    ap.add_argument("--out", default=str(REPO / "bench-results"))
    ap.add_argument("--svqd-arg", action="append", default=[],
                    help="extra svqd argument (repeatable), e.g. --svqd-arg=--poll-us=50")
    ap.add_argument("--svqd-nice", type=int, default=0,
                    help="nice value of svqd's scheduling group (its autogroup), e.g. -10: how "
                         "much CPU weight svqd has against the peers, as CPUWeight= of its "
                         "systemd unit would give it (0: the same as each peer)")
    g = ap.add_argument_group("dpdk workload")
    g.add_argument("--layout", choices=["contended", "dedicated"], default="contended")
    g.add_argument("--pkt", type=int, default=64, help="packet size in bytes (txonly / tx_first)")
    g.add_argument("--ring-desc", type=int, default=0,
                   help="descriptors per testpmd queue, both peers (--txd/--rxd; 0: testpmd's default, "
                        "which is ethdev's fallback of 512 although the rings have 1024 entries)")
    g.add_argument("--no-tx-retry", action="store_true",
                   help="dedicated layout: plain io forwarding, dropping what a full ring refuses")
    g.add_argument("--control-direct", action="store_true",
                   help="measure direct twice per round (at both ends): the 'direct again' ratio "
                        "shows how far two identical runs differ on this machine")
    g = ap.add_argument_group("blk workload")
    g.add_argument("--depth", type=int, default=16, help="requests in flight per queue")
    g.add_argument("--read-pct", type=int, default=50, help="percentage of reads (rest: writes)")
    g.add_argument("--indirect-pct", type=int, default=0,
                   help="percentage of requests posted as indirect tables")
    g.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    g.add_argument("--disk-mib", type=int, default=64, help="raw image size (requests spread over it)")
    g.add_argument("--image-dir", default="/dev/shm", help="where the raw image lives (tmpfs: no disk noise)")
    a = ap.parse_args()
    if a.rounds < 1 or a.seconds <= 0.5 or a.queues < 1:
        die("--rounds >= 1, --seconds > 0.5 and --queues >= 1 please")
    if a.workload == "dpdk":
        for tool in ("dpdk-testpmd", "taskset", "stdbuf"):
            if not shutil.which(tool):
                die(f"{tool} not found (dpdk-testpmd: Debian package dpdk-dev; scripts/peers/deps.sh)")
    else:
        a.qsd = find_qsd()
        if not a.qsd:
            die("qemu-storage-daemon not found: set SVQ_QSD or run scripts/peers/fixtures.sh")
        if not (REPO / "target/release/blk-load").exists():
            die("build first: cargo build --release -p svq-benches --bin blk-load")
    if not (REPO / "target/release/svqd").exists():
        die("build first: cargo build --release -p svqd")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) / stamp
    out.mkdir(parents=True)
    rounds = []
    one_round = dpdk_round if a.workload == "dpdk" else blk_round
    wake = wake_cost()
    if wake:
        print(wake_text(wake), flush=True)
    # Sockets live in a short temporary directory (sun_path is 108 bytes); logs are kept.
    with tempfile.TemporaryDirectory(prefix="svqb-") as tmp:
        if a.workload == "dpdk":
            # The first measurement of a run comes out off by up to 2x (caches, page faults,
            # the host's frequency): one direct run before the rounds, discarded.
            run_path("direct", a, Path(tmp) / "warmup", out / "logs" / "warmup")
        for r in range(a.rounds):
            rounds.append(one_round(a, r, tmp, out))
    med = {}
    for p in ("passthrough", "shadow") + (("direct2",) if a.workload == "dpdk" and a.control_direct else ()):
        vals = [r["ratios"][p] for r in rounds if r["ratios"][p] is not None]
        med[p] = statistics.median(vals) if vals else None
    summary = {"args": vars(a), "cpus": os.cpu_count(), "wake_cost": wake, "rounds": rounds,
               "median_ratio": med}
    if a.workload == "blk":
        summary["target"] = {"shadow_over_direct_iops": BLK_TARGET, "at_depth": 16}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    lines = (dpdk_table if a.workload == "dpdk" else blk_table)(a, rounds, med)
    lines[1:1] = ["", wake_text(wake)]
    added = [added_latency(r["results"]["direct"], r["results"]["shadow"]) for r in rounds] \
        if a.workload == "blk" else []
    added = [v for v in added if v is not None]
    if added and wake and wake.get("hop_cross_cpu_us"):
        # A shadowed request that finds svqd asleep waits for two more wake-ups than a direct one.
        m = statistics.median(added)
        lines += ["", f"Shadow mode added {m:.0f} µs to a request's mean latency (median of the "
                  f"rounds): {m / wake['hop_cross_cpu_us']:.1f} eventfd hops across CPUs, "
                  f"{m / wake['hop_same_cpu_us']:.0f} on one CPU, at this run's wake-up costs."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    svg_plot(rounds, out / "plot.svg", BLK_TARGET if a.workload == "blk" else None)
    print("\n".join(lines))
    print(f"\nresults in {out}")
    failed = [(i + 1, p) for i, r in enumerate(rounds) for p, x in r["results"].items()
              if not x.get("ok", True)]
    if failed:
        print(f"bench: data errors on {failed} (round, path): those paths are not rated; see "
              f"{out / 'logs'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
