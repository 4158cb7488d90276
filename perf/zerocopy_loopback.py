#!/usr/bin/env python3
"""Does MSG_ZEROCOPY save CPU on loopback TCP? (issue: large messages; io_uring's SendZc
rests on the same kernel path.) Sends N buffers of SIZE bytes over a loopback TCP connection,
plain and with MSG_ZEROCOPY, and reports the process's CPU time per GB and how many
zero-copy completions the kernel flagged as copied (SO_EE_CODE_ZEROCOPY_COPIED).

    python3 perf/zerocopy_loopback.py [size=65536] [count=20000]
"""
import os
import socket
import struct
import sys
import threading

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1


def sink(listener, total):
    conn, _ = listener.accept()
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = conn.recv_into(buf)
        if n == 0:
            break
        got += n
    conn.close()


def drain(sock, stats):
    """Reads zero-copy completions off the error queue: (completed sends, copied ones)."""
    while True:
        try:
            _, anc, _, _ = sock.recvmsg(0, 1024, MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        for level, typ, data in anc:
            # struct sock_extended_err: u32 errno; u8 origin, type, code, pad; u32 info; u32 data
            _errno, origin, _t, code, _pad, info, hi = struct.unpack("=IBBBBII", data[:16])
            if origin == SO_EE_ORIGIN_ZEROCOPY:
                stats[0] += hi - info + 1
                if code & SO_EE_CODE_ZEROCOPY_COPIED:
                    stats[1] += hi - info + 1


def run(size, count, zerocopy):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    t = threading.Thread(target=sink, args=(listener, size * count))
    t.start()
    s = socket.create_connection(listener.getsockname())
    if zerocopy:
        s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    payload = os.urandom(size)
    stats = [0, 0]
    before = os.times()
    for i in range(count):
        view = memoryview(payload)
        while view:
            try:
                n = s.send(view, MSG_ZEROCOPY if zerocopy else 0)
            except OSError:  # ENOBUFS: too many completions outstanding
                drain(s, stats)
                continue
            view = view[n:]
        if zerocopy and i % 16 == 0:
            drain(s, stats)
    s.shutdown(socket.SHUT_WR)
    t.join()
    after = os.times()
    if zerocopy:
        drain(s, stats)
    s.close()
    listener.close()
    cpu = (after.user - before.user) + (after.system - before.system)
    gb = size * count / 1e9
    return cpu / gb, stats


def main():
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    for zc in (False, True, False, True):
        cpu, (done, copied) = run(size, count, zc)
        label = "MSG_ZEROCOPY" if zc else "plain send  "
        extra = f", completions {done}, flagged copied {copied}" if zc else ""
        print(f"{label} {size} B x {count}: {cpu:.3f} CPU s per GB (sender and receiver){extra}")


if __name__ == "__main__":
    main()
