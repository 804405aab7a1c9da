#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/seeds/TARGET/: a few well-formed inputs per target, so
the fuzzers start from requests, configs, descriptor chains and register sequences a real
client, file or driver produces. Run from anywhere; the output is committed."""
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(here, "seeds", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- http: raw bytes of one connection ---------------------------------------------------
def req(method, path, body=None, extra=""):
    if body is None:
        return f"{method} {path} HTTP/1.1\r\n{extra}\r\n"
    return (f"{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n{body}")

http = {
    "get-root": req("GET", "/"),
    "get-version": req("GET", "/version", extra="Connection: close\r\n"),
    "boot-source": req("PUT", "/boot-source",
                       '{"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0"}'),
    "machine-config": req("PUT", "/machine-config", '{"vcpu_count": 2, "mem_size_mib": 256}'),
    "patch-machine": req("PATCH", "/machine-config", '{"mem_size_mib": 512}'),
    "drive": req("PUT", "/drives/rootfs",
                 '{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, '
                 '"is_read_only": false, "cache_type": "Writeback"}'),
    "patch-drive": req("PATCH", "/drives/rootfs", '{"drive_id": "rootfs", "path_on_host": "/n"}'),
    "net": req("PUT", "/network-interfaces/eth0",
               '{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}'),
    "logger": req("PUT", "/logger", '{"log_path": "/l", "level": "Debug", "show_level": true}'),
    "metrics": req("PUT", "/metrics", '{"metrics_path": "/m"}'),
    "start": req("PUT", "/actions", '{"action_type": "InstanceStart"}'),
    "pause": req("PATCH", "/vm", '{"state": "Paused"}'),
    "vm-config": req("GET", "/vm/config"),
    "balloon": req("PUT", "/balloon", '{"amount_mib": 1}'),
    "cpu-config": req("PUT", "/cpu-config",
                      '{"kvm_capabilities": ["!171"], "cpuid_modifiers": [{"leaf": "0x7", '
                      '"subleaf": "0x0", "flags": 1, "modifiers": [{"register": "ebx", '
                      '"bitmap": "0bxxxx_0x1"}]}], "msr_modifiers": [{"addr": "0x277", '
                      '"bitmap": "0b101"}]}'),
    "cpu-template": req("PATCH", "/machine-config", '{"cpu_template": "T2A"}'),
    "pipelined": req("GET", "/") + req("PUT", "/actions", '{"action_type": "FlushMetrics"}')
    + req("GET", "/machine-config"),
    "expect": req("PUT", "/metrics", '{"metrics_path": "/m"}', extra="Expect: 100-continue\r\n"),
    "chunked": "PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "http10": "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "absolute": "GET http://localhost/version HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "too-large": "PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n",
}
for name, data in http.items():
    write("http", name, data)

# --- config: config files ----------------------------------------------------------------
write("config", "minimal", '{"boot-source": {"kernel_image_path": "/vmlinux"}}')
write("config", "readme", """{
  "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
  "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}]
}""")
write("config", "full", """{
  "boot-source": {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1",
                  "initrd_path": null},
  "drives": [
    {"drive_id": "rootfs", "partuuid": null, "is_root_device": true, "cache_type": "Unsafe",
     "is_read_only": false, "path_on_host": "/rootfs.ext4", "io_engine": "Sync",
     "rate_limiter": null, "socket": null},
    {"drive_id": "data", "path_on_host": "/data.img", "is_root_device": false,
     "is_read_only": true, "cache_type": "Writeback", "partuuid": "0eaa91a0-01"}
  ],
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false,
                     "track_dirty_pages": false, "huge_pages": "None"},
  "cpu-config": null, "balloon": null,
  "network-interfaces": [
    {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"},
    {"iface_id": "net2", "host_dev_name": "tap1"}
  ],
  "vsock": null,
  "logger": {"log_path": "/tmp/fc.log", "level": "debug", "show_level": true, "show_log_origin": false},
  "metrics": {"metrics_path": "/tmp/metrics.fifo"},
  "mmds-config": null, "entropy": null, "pmem": [], "memory-hotplug": null, "serial": {}
}""")


write("config", "cpu-template", """{
  "boot-source": {"kernel_image_path": "/vmlinux"},
  "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2S"},
  "cpu-config": {"cpuid_modifiers": [{"leaf": "0x80000001", "subleaf": "0x0", "flags": 0,
                  "modifiers": [{"register": "ecx", "bitmap": "0b0xx_xxx1_xx"}]}],
                 "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1_xxxx"}]}
}""")


# --- virtio_blk / virtio_net: queue spec, guest memory image ------------------------------
NEXT, WRITE = 1, 2


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def spec(size_log2, flags=0, next_avail=0, next_used=0):
    return struct.pack("<BBHH", size_log2, flags, next_avail, next_used)


def image(size, descs, heads, extra=()):
    """Descriptor table at 0, avail ring after it (as QueueSpec lays them out), then
    (address, bytes) pieces."""
    mem = bytearray(0x400)
    table = b"".join(descs)
    mem[: len(table)] = table
    avail = 16 * size
    struct.pack_into("<HH", mem, avail, 0, len(heads))
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, avail + 4 + 2 * i, h)
    for addr, data in extra:
        if len(mem) < addr + len(data):
            mem.extend(bytes(addr + len(data) - len(mem)))
        mem[addr: addr + len(data)] = data
    return bytes(mem)


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)

# Header at 0x400 (+0x10 per chain), status bytes at 0x500+, data at 0x600+.
def blk_chain(i, kind, sector, data_len, data_write, first):
    h, s, d = 0x400 + 0x10 * i, 0x500 + i, 0x600 + 0x200 * i
    if data_len:
        descs = [desc(h, 16, NEXT, first + 1),
                 desc(d, data_len, NEXT | (WRITE if data_write else 0), first + 2),
                 desc(s, 1, WRITE)]
    else:
        descs = [desc(h, 16, NEXT, first + 1), desc(s, 1, WRITE)]
    return descs, (h, blk_header(kind, sector))

requests = {"read": (0, 3, 512, True), "write": (1, 15, 512, False),
            "flush": (4, 0, 0, False), "get-id": (8, 0, 20, True)}
for n, (name, r) in enumerate(requests.items()):
    descs, hdr = blk_chain(0, *r, 0)
    write("virtio_blk", name, spec(3, 4 if name == "flush" else 0) + image(8, descs, [0], [hdr]))
all_descs, hdrs, heads = [], [], []
for i, r in enumerate(requests.values()):
    heads.append(len(all_descs))
    descs, hdr = blk_chain(i, *r, len(all_descs))
    all_descs += descs
    hdrs.append(hdr)
write("virtio_blk", "four", spec(4) + image(16, all_descs, heads, hdrs))
# The same four on the Async engine (flag 8), on a writeback drive (4): io_uring.
write("virtio_blk", "four-async", spec(4, 8 | 4) + image(16, all_descs, heads, hdrs))
write("virtio_blk", "read-only-write", spec(3, 2) + image(8, blk_chain(0, 1, 1, 512, False, 0)[0],
                                                         [0], [blk_chain(0, 1, 1, 512, False, 0)[1]]))


def net(tx, img, frames=()):
    out = spec(3, 2 if tx else 0) + struct.pack("<H", len(img)) + img
    for f in frames:
        out += struct.pack("<H", len(f)) + f
    return out

frame = bytes(12) + bytes.fromhex("ffffffffffff0600ac100002" "0806") + bytes(46)
write("virtio_net", "rx", net(False, image(8, [desc(0x400, 1526, WRITE)], [0]), [frame]))
write("virtio_net", "rx-two-buffers",
      net(False, image(8, [desc(0x400, 12, WRITE | NEXT, 1), desc(0x500, 1514, WRITE)], [0]),
          [frame, frame]))
write("virtio_net", "tx", net(True, image(8, [desc(0x400, 12, NEXT, 1), desc(0x500, 60)], [0],
                                       [(0x500, frame[12:])])))


# --- virtio_mmio: device kind, then (op, offset, value) ----------------------------------
def w(off, val):
    return struct.pack("<BHI", 0x80, off, val)


def r(off, width=0):
    return struct.pack("<BHI", width, off, 0)


def driver_init(queues):
    ops = [w(0x70, 0), r(0x00), r(0x04), r(0x08), w(0x70, 1), w(0x70, 3),
           w(0x14, 0), r(0x10), w(0x14, 1), r(0x10),
           w(0x24, 0), w(0x20, 0), w(0x24, 1), w(0x20, 1), w(0x70, 0xb), r(0x70)]
    for q in range(queues):
        base = 0x1000 * q
        ops += [w(0x30, q), r(0x44), r(0x34), w(0x38, 8),
                w(0x80, base), w(0x84, 0), w(0x90, base + 0x80), w(0x94, 0),
                w(0xa0, base + 0x100), w(0xa4, 0), w(0x44, 1)]
    ops += [w(0x70, 0xf), r(0x70), w(0x50, 0), r(0x60), w(0x64, 1), r(0xfc)]
    return ops

config_reads = [r(0x100), r(0x104), r(0x100, 5), r(0x10c), r(0x114), r(0x101, 3), r(0x106, 4)]
write("virtio_mmio", "blk-init", bytes([0]) + b"".join(driver_init(1) + config_reads + [w(0x70, 0)]))
write("virtio_mmio", "blk-ro-writeback", bytes([6]) + b"".join(driver_init(1) + [w(0x70, 0x8f)]))
write("virtio_mmio", "net-init", bytes([1]) + b"".join(driver_init(2) + config_reads + [w(0x70, 0)]))


# --- virtio_vsock: flags, host line, RX and TX specs, image, steps ----------------------
def vsock_hdr(op, src_port, dst_port, length=0, flags=0):
    # src_cid, dst_cid, src_port, dst_port, len, type (stream), op, flags, buf_alloc, fwd_cnt
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags,
                       65536, 0)


def vsock(packets, steps, host_line=b""):
    """RX queue at 0 with 8 buffers of 2 KiB in the high region; the TX queue's table and
    rings at 0x2800 (TX_BASE), one chain per packet, headers and data from 0x800."""
    rx = image(8, [desc(0x10000 + 0x800 * i, 0x800, WRITE) for i in range(8)], list(range(8)))
    tx_descs, extra = [], []
    for i, (hdr, data) in enumerate(packets):
        at = 0x800 + 0x400 * i
        if data:
            tx_descs += [desc(at, 44, NEXT, len(tx_descs) + 1), desc(at + 0x100, len(data))]
            extra += [(at, hdr), (at + 0x100, data)]
        else:
            tx_descs.append(desc(at, 44))
            extra.append((at, hdr))
    heads, n = [], 0
    for hdr, data in packets:
        heads.append(n)
        n += 2 if data else 1
    tx = image(16, tx_descs, heads)
    img = bytearray(rx + bytes(0x2800 - len(rx)) + tx)
    for addr, data in extra:
        img[addr: addr + len(data)] = data
    flags = 1 if host_line else 0
    return (bytes([flags, len(host_line)]) + host_line + spec(3) + spec(4)
            + struct.pack("<H", len(img)) + bytes(img) + bytes(steps))

# Steps: 0 kick TX, 5 kick RX, 8 event loop pass, 11 host peers write, 12 read, 13 close,
# 14 reset.
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE = 1, 2, 3, 4, 5, 6
write("virtio_vsock", "guest-connect-send",
      vsock([(vsock_hdr(OP_REQUEST, 1000, 1024), b""),
             (vsock_hdr(OP_RW, 1000, 1024, 5), b"hello"),
             (vsock_hdr(OP_CREDIT_UPDATE, 1000, 1024), b""),
             (vsock_hdr(OP_SHUTDOWN, 1000, 1024, 0, 3), b"")],
            [0, 11, 8, 5, 12, 8, 5, 13, 8, 5]))
write("virtio_vsock", "host-connect",
      vsock([(vsock_hdr(OP_RESPONSE, 52, 1 << 30), b""),
             (vsock_hdr(OP_RW, 52, 1 << 30, 3), b"abc")],
            [8, 8, 5, 0, 11, 8, 5, 14, 8], b"CONNECT 52\n"))
write("virtio_vsock", "nobody-and-rst",
      vsock([(vsock_hdr(OP_RW, 9, 9), b""), (vsock_hdr(OP_RST, 9, 10), b""),
             (vsock_hdr(OP_REQUEST, 7, 4242), b"")], [0, 5, 8]))


# --- mmds: settings byte, then records (0 raw frame, 1 ARP, 2 TCP segment, 3 drain) -----
def arp(ours=True):
    return bytes([1, 1 if ours else 0]) + bytes([2, 0, 0, 0, 0, 1])


def seg(port, flags, data=b"", off=0):
    return (bytes([2, port]) + struct.pack("<hBH", off, flags, len(data)) + data)


def drain(n=32):
    return bytes([3, n])


SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
get_v1 = b"GET /latest/meta-data/ HTTP/1.1\r\nAccept: application/json\r\n\r\n"
token = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n"
write("mmds", "arp-then-get-v1",
      bytes([0]) + arp() + drain() + seg(0, SYN) + drain() + seg(0, ACK | PSH, get_v1)
      + drain() + seg(0, ACK | FIN) + drain())
write("mmds", "v2-token",
      bytes([1]) + seg(1, SYN) + drain() + seg(1, ACK | PSH, token) + drain()
      + seg(1, ACK | PSH, b"GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: x\r\n\r\n")
      + drain())
write("mmds", "other-arp-and-out-of-window",
      bytes([2]) + arp(False) + seg(2, SYN) + seg(2, ACK, b"x" * 10, off=-500) + drain())


# --- snapshot_state: real state files, written by ember snapshotting the test guest -----
# Input: a mode byte (bit 0: fix the body length and checksum, bit 1: write this ember's
# version; see the target), then the state file. Needs a built ember and test guest:
# $EMBER (default target/debug/ember) and $EMBER_TEST_GUEST (default: the newest in
# target/debug/build); without them the committed seeds stay as they are.
def snapshot_seeds():
    import glob
    import http.client
    import json
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    repo = os.path.dirname(here)
    ember = os.environ.get("EMBER", os.path.join(repo, "target", "debug", "ember"))
    guests = sorted(glob.glob(os.path.join(repo, "target", "debug", "build", "ember-*", "out",
                                           "ember-test-guest")), key=os.path.getmtime)
    guest = os.environ.get("EMBER_TEST_GUEST", guests[-1] if guests else "")
    if not (os.path.exists(ember) and os.path.exists(guest)):
        print("snapshot_state: no ember or test guest built; seeds left as they are")
        return

    class Conn(http.client.HTTPConnection):
        def __init__(self, path):
            super().__init__("localhost", timeout=60)
            self.path = path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(self.path)

    def call(sock, method, path, body):
        c = Conn(sock)
        c.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        answer = r.read()
        if r.status != 204:
            raise RuntimeError(f"{method} {path}: {r.status} {answer!r}")

    tmp = tempfile.mkdtemp(prefix="ember-seeds-")
    try:
        disk = os.path.join(tmp, "disk")
        with open(disk, "wb") as f:
            f.write(bytes(1 << 20))
        limiter = {"ops": {"size": 10, "refill_time": 100},
                   "bandwidth": {"size": 65536, "one_time_burst": 4096, "refill_time": 100}}
        cases = {
            "snap-devices": ("ember_test=snap", 1, {
                "drives": [{"drive_id": "d0", "path_on_host": disk, "is_root_device": False,
                            "rate_limiter": limiter}],
                "entropy": {"rate_limiter": limiter},
                "balloon": {"amount_mib": 1, "deflate_on_oom": True,
                            "stats_polling_interval_s": 1},
                "vsock": {"guest_cid": 3, "uds_path": os.path.join(tmp, "v.sock")}}, 2.0),
            "snap-2vcpus": ("ember_test=snap", 2, {}, 1.0),
            "vsock-active": ("ember_test=vsock", 1, {
                "vsock": {"guest_cid": 3, "uds_path": os.path.join(tmp, "w.sock")}}, 1.5),
            "balloon-active": ("ember_test=balloon", 1, {
                "balloon": {"amount_mib": 2, "deflate_on_oom": False,
                            "stats_polling_interval_s": 1}}, 4.0),
        }
        for name, (mode, vcpus, extra, settle) in cases.items():
            config = {"boot-source": {"kernel_image_path": guest,
                                      "boot_args": f"console=ttyS0 {mode}"},
                      "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 32 if
                                         mode == "ember_test=snap" else 64}}
            config.update(extra)
            cfg = os.path.join(tmp, name + ".json")
            with open(cfg, "w") as f:
                json.dump(config, f)
            sock = os.path.join(tmp, name + ".sock")
            p = subprocess.Popen([ember, "--api-sock", sock, "--config-file", cfg],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                time.sleep(settle)
                state = os.path.join(tmp, name + ".state")
                call(sock, "PATCH", "/vm", {"state": "Paused"})
                call(sock, "PUT", "/snapshot/create",
                     {"snapshot_path": state, "mem_file_path": os.path.join(tmp, "mem")})
            finally:
                p.kill()
                p.wait()
            with open(state, "rb") as f:
                data = f.read()
            write("snapshot_state", name, bytes([3]) + data)
            if name == "snap-devices":
                write("snapshot_state", name + "-raw", bytes([0]) + data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


snapshot_seeds()
