#!/usr/bin/env python3
"""A minimal cannelloni UDP peer (format version 2), for interoperability tests.

It shares no code with the Rust codec: datagrams are packed and unpacked here with `struct`
from the published format (header: version, op code, sequence number, u16 frame count; each
frame: u32 can_id, u8 len with 0x80 marking CAN FD, an FD flags byte for FD frames only, then
the data, which remote frames omit; everything big-endian).

Usage:
  cannelloni_peer.py --bind IP:PORT --to IP:PORT [--send JSON] [--per-datagram K]
                     [--interval S] [--expect N] [--linger S] [--timeout S]

Prints READY once bound, SENT after sending the frames of --send (a JSON list of
{"id": int, "data": hex, "fd": bool, "flags": int, "dlc": int}; all in one datagram, or K per
datagram with S seconds between datagrams), then one JSON object per frame received, and exits
after N frames (and --linger seconds more, so that extra frames would show) or the timeout.
"""

import argparse
import json
import socket
import struct
import sys
import time

VERSION = 2
OP_DATA = 0
RTR = 0x40000000
FD_BIT = 0x80


def pack(frames, seq):
    body = b""
    for frame in frames:
        can_id = frame["id"]
        data = bytes.fromhex(frame.get("data", ""))
        if frame.get("fd"):
            body += struct.pack("!IBB", can_id, FD_BIT | len(data), frame.get("flags", 0)) + data
        elif can_id & RTR:
            body += struct.pack("!IB", can_id, frame.get("dlc", 0))
        else:
            body += struct.pack("!IB", can_id, len(data)) + data
    return struct.pack("!BBBH", VERSION, OP_DATA, seq & 0xFF, len(frames)) + body


def unpack(datagram):
    version, op_code, seq, count = struct.unpack_from("!BBBH", datagram, 0)
    if version != VERSION or op_code != OP_DATA:
        raise ValueError("not a version-2 data datagram")
    offset = 5
    frames = []
    for _ in range(count):
        can_id, length = struct.unpack_from("!IB", datagram, offset)
        offset += 5
        frame = {"id": can_id, "seq": seq}
        if length & FD_BIT:
            frame["fd"] = True
            frame["flags"] = datagram[offset]
            offset += 1
        size = length & 0x7F
        if can_id & RTR:
            frame["dlc"] = size
            size = 0
        frame["data"] = datagram[offset:offset + size].hex()
        if len(frame["data"]) != 2 * size:
            raise ValueError("truncated frame")
        offset += size
        frames.append(frame)
    if offset != len(datagram):
        raise ValueError("trailing bytes")
    return frames


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True, type=address)
    parser.add_argument("--to", required=True, type=address)
    parser.add_argument("--send", default="[]")
    parser.add_argument("--per-datagram", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.0)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--linger", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(args.bind)
    print("READY", flush=True)

    frames = json.loads(args.send)
    step = args.per_datagram or max(len(frames), 1)
    for seq, start in enumerate(range(0, len(frames), step)):
        if seq and args.interval:
            time.sleep(args.interval)
        sock.sendto(pack(frames[start:start + step], seq + 1), args.to)
    print("SENT", flush=True)

    received = 0
    deadline = time.monotonic() + args.timeout
    lingering = False
    while True:
        if received >= args.expect and not lingering:
            lingering = True
            deadline = min(deadline, time.monotonic() + args.linger)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            datagram, _source = sock.recvfrom(65536)
        except socket.timeout:
            break
        for frame in unpack(datagram):
            print(json.dumps(frame), flush=True)
            received += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
