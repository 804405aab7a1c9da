#!/usr/bin/env python3
"""Host side of the test guest's `netbench` mode (tests/guest/README.md), over an
AF_PACKET socket on the guest's TAP device.

Modes:
  count  count the guest's TX frames (0x88b5, payload not PING) until --frames arrived
         or nothing came for --idle seconds
  blast  send --frames 0x88b5 frames of --size bytes to --dst, then `END` (three times,
         as the TAP may drop frames when ember falls behind)
  echo   answer each `PING <i>` frame with `PONG <i>` until --count pings or --idle
  all    the guest's whole sequence: count from the start, blast after the guest's
         `net-bench: ready-rx` line, echo after `net-bench: ready-rtt`; the guest's
         serial lines are read from --serial (a file or FIFO, `-` for stdin)

Start the script first and the guest after it printed `netbench-host: ready` on
stderr (the guest sends its first frames within milliseconds of boot), e.g.:
  mkfifo s; tools/netbench-host.py all --tap T --netns NS --serial s 2>log &
  until grep -q ready log; do sleep 0.01; done
  ip netns exec NS ember --no-api --config-file vm.json | tee s

Every mode prints one JSON object on stdout (times in seconds):
  count: {"frames", "bytes", "seconds", "tap_frames"}  seen on the socket, first to
         last; tap_frames: what ember wrote to the TAP (the socket may miss some)
  blast: {"frames", "bytes", "seconds", "send_errors", "tap_dropped"}  paced by
         --window (frames sent and not yet read by ember, from /proc/net/dev)
  echo:  {"pongs", "ignored"}
  all:   {"tx": count, "rx": blast, "rtt": echo}
Progress and errors go to stderr. Exit status 0, 1 on a failed phase, 2 on usage errors.
Standard library only; needs CAP_NET_RAW (root) and, with --netns, CAP_SYS_ADMIN.
"""

import argparse
import ctypes
import json
import os
import select
import socket
import struct
import sys
import threading
import time

ETHERTYPE = 0x88B5
ETH_HDR = 14
MIN_FRAME = 60
HOST_MAC = bytes([0x02, 0, 0, 0, 0, 0x99])
BROADCAST = b"\xff" * 6
CLONE_NEWNET = 0x40000000


def log(msg):
    print(f"netbench-host: {msg}", file=sys.stderr, flush=True)


def join_netns(name):
    """Moves this process into network namespace `name` (as `ip netns exec` does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_socket(tap):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    s.bind((tap, ETHERTYPE))
    # Room for bursts: the guest sends as fast as ember forwards, and this script shares
    # two cores with the guest and ember. FORCE passes rmem_max/wmem_max (root).
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        for opt in (force, plain):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 32 * 1024 * 1024)
                break
            except OSError:
                pass
    return s


def tap_stats(tap):
    """The TAP's counters from /proc/net/dev (the calling process's namespace).
    rx_packets + rx_dropped: frames ember wrote (guest TX; the host stack drops some when
    its backlog overflows); tx_packets: frames ember read (guest RX); tx_dropped: frames
    the kernel dropped because ember's queue on the TAP was full."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == tap:
                v = [int(x) for x in rest.split()]
                return {"rx_packets": v[1], "rx_dropped": v[3], "tx_packets": v[9], "tx_dropped": v[11]}
    raise OSError(f"{tap} not in /proc/net/dev")


def parse_mac(text):
    parts = text.split(":")
    if len(parts) != 6:
        raise argparse.ArgumentTypeError(f"bad MAC address {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad MAC address {text!r}") from None


def frame(dst, payload):
    f = dst + HOST_MAC + struct.pack("!H", ETHERTYPE) + payload
    return f.ljust(MIN_FRAME, b"\0")


def recv_frame(sock, timeout):
    """One incoming 0x88b5 frame, or None after `timeout` seconds."""
    r, _, _ = select.select([sock], [], [], max(0.0, timeout))
    if not r:
        return None
    data, addr = sock.recvfrom(65536)
    # Frames this socket sent come back as PACKET_OUTGOING (4) on some kernels.
    if addr[2] == socket.PACKET_OUTGOING:
        return b""
    return data


def is_ping(f):
    return f[ETH_HDR : ETH_HDR + 5] == b"PING "


class Counter:
    """Counts the guest's TX frames; PINGs and frames from this host are not counted."""

    def __init__(self):
        self.frames = 0
        self.bytes = 0
        self.first = None
        self.last = None

    def add(self, f):
        now = time.monotonic()
        if self.first is None:
            self.first = now
        self.last = now
        self.frames += 1
        self.bytes += len(f)

    def result(self):
        secs = (self.last - self.first) if self.frames > 1 else 0.0
        return {"frames": self.frames, "bytes": self.bytes, "seconds": round(secs, 6)}


def count(sock, tap, frames, idle, stop=None, on_ping=None):
    """Frames seen on the socket (it may miss some when this script gets too little
    CPU) and, authoritative, the frames ember wrote to the TAP meanwhile."""
    st = tap_stats(tap)
    before = st["rx_packets"] + st["rx_dropped"]
    c = Counter()
    deadline = time.monotonic() + idle
    while (frames <= 0 or c.frames < frames) and not (stop and stop.is_set()):
        f = recv_frame(sock, min(0.1, deadline - time.monotonic()))
        if f is None:
            if time.monotonic() >= deadline:
                break
            continue
        if not f or f[6:12] == HOST_MAC:
            continue
        if is_ping(f):
            if on_ping:
                on_ping(f)
            continue
        c.add(f)
        deadline = time.monotonic() + idle
    out = c.result()
    st = tap_stats(tap)
    out["tap_frames"] = st["rx_packets"] + st["rx_dropped"] - before
    return out


def blast(sock, tap, dst, frames, size, window):
    """Sends `frames` frames, keeping at most `window` of them between this socket and
    ember (the TAP drops frames beyond its queue rather than slowing the sender), then
    END. window 0: no pacing."""
    size = max(MIN_FRAME, min(size, 1514))
    f = frame(dst, b"\x5a" * (size - ETH_HDR))
    before = tap_stats(tap)
    taken = before["tx_packets"] + before["tx_dropped"]
    errors = 0
    sent = 0
    stalled_since = None
    start = time.monotonic()
    while sent < frames:
        if window and sent % 32 == 0:
            st = tap_stats(tap)
            in_flight = sent - (st["tx_packets"] + st["tx_dropped"] - taken)
            if in_flight >= window:
                now = time.monotonic()
                stalled_since = stalled_since or now
                if now - stalled_since > 5:
                    log(f"blast: ember took no frame for 5 s ({sent} sent)")
                    break
                time.sleep(0.00005)
                continue
            stalled_since = None
        try:
            sock.send(f)
            sent += 1
        except OSError as e:
            # ENOBUFS: the qdisc is full; give ember a moment to drain the TAP.
            errors += 1
            if errors > 1000000:
                raise OSError(f"send keeps failing: {e}") from e
            time.sleep(0.0001)
    secs = time.monotonic() - start
    end = frame(dst, b"END")
    for _ in range(3):
        time.sleep(0.05)
        try:
            sock.send(end)
        except OSError:
            errors += 1
    after = tap_stats(tap)
    return {
        "frames": sent,
        "bytes": sent * size,
        "seconds": round(secs, 6),
        "send_errors": errors,
        "tap_dropped": after["tx_dropped"] - before["tx_dropped"],
    }


def pong_for(f):
    """The reply to a PING frame: same number, back to its sender."""
    digits = f[ETH_HDR + 5 :].split(b"\0", 1)[0]
    return frame(f[6:12], b"PONG " + digits)


def echo(sock, count_max, idle, first=None):
    pongs = 0
    ignored = 0
    pending = list(first or [])
    deadline = time.monotonic() + idle
    while pongs < count_max:
        if pending:
            f = pending.pop(0)
        else:
            f = recv_frame(sock, min(0.1, deadline - time.monotonic()))
            if f is None:
                if time.monotonic() >= deadline:
                    break
                continue
        if not f or f[6:12] == HOST_MAC:
            continue
        if not is_ping(f):
            ignored += 1
            continue
        sock.send(pong_for(f))
        pongs += 1
        deadline = time.monotonic() + idle
    return {"pongs": pongs, "ignored": ignored}


def serial_lines(path):
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    for raw in stream:
        yield raw.decode("utf-8", "replace").rstrip("\r\n")


def run_all(sock, args):
    """Counts TX from the start; the guest's serial lines start the RX and RTT phases."""
    lines = serial_lines(args.serial)
    dst = args.dst
    stop = threading.Event()
    early_pings = []
    tx = {}

    def counting():
        tx.update(count(sock, args.tap, args.frames, args.idle, stop, early_pings.append))

    t = threading.Thread(target=counting, daemon=True)
    t.start()
    result = {}
    failed = False
    for line in lines:
        if "net-bench: mac=" in line and dst is None:
            mac = line.split("mac=", 1)[1].split()[0]
            dst = parse_mac(mac)
        elif "net-bench: error:" in line:
            log(f"guest: {line}")
        elif line.endswith("net-bench: ready-rx"):
            # The guest finished TX before it said so: stop counting.
            stop.set()
            t.join()
            result["tx"] = tx
            log(f"tx: {tx}")
            result["rx"] = blast(sock, args.tap, dst or BROADCAST, args.rx_frames, args.size, args.window)
            log(f"rx: sent {result['rx']}")
        elif line.endswith("net-bench: ready-rtt"):
            result["rtt"] = echo(sock, args.count, args.idle, early_pings)
            log(f"rtt: {result['rtt']}")
        elif "net-bench: rtt " in line or "ember-test-guest: done" in line:
            if "rtt" in result:
                break
    stop.set()
    for phase in ("tx", "rx", "rtt"):
        if phase not in result:
            log(f"phase {phase} did not run (guest output ended)")
            failed = True
    return result, failed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["count", "blast", "echo", "all"])
    p.add_argument("--tap", required=True, help="the guest's TAP device")
    p.add_argument("--netns", help="network namespace the TAP is in (/var/run/netns/NAME)")
    p.add_argument("--frames", type=int, default=20000, help="count/blast: frames (count: 0 = until idle)")
    p.add_argument("--rx-frames", type=int, default=20000, help="all: frames to blast in the RX phase")
    p.add_argument("--size", type=int, default=1514, help="blast: frame size, 60..1514 (default 1514)")
    p.add_argument("--dst", type=parse_mac, help="blast: destination MAC (all: from the guest's mac= line)")
    p.add_argument(
        "--window", type=int, default=512, help="blast: frames in flight to ember at most (0: unpaced, lossy)"
    )
    p.add_argument("--count", type=int, default=100, help="echo: pings to answer (default 100)")
    p.add_argument("--idle", type=float, default=10.0, help="seconds without traffic that end a phase")
    p.add_argument("--serial", default="-", help="all: the guest's serial output (file, FIFO or -)")
    args = p.parse_args()

    try:
        if args.netns:
            join_netns(args.netns)
        sock = open_socket(args.tap)
    except OSError as e:
        log(f"cannot open a packet socket on {args.tap}: {e}")
        return 2
    # Whoever starts the guest waits for this line: the test guest starts sending
    # within milliseconds of ember's start, faster than this script starts.
    log("ready")

    failed = False
    if args.mode == "count":
        out = count(sock, args.tap, args.frames, args.idle)
        failed = out["frames"] == 0
    elif args.mode == "blast":
        out = blast(sock, args.tap, args.dst or BROADCAST, args.frames, args.size, args.window)
    elif args.mode == "echo":
        out = echo(sock, args.count, args.idle)
        failed = out["pongs"] == 0
    else:
        out, failed = run_all(sock, args)
    print(json.dumps(out), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
