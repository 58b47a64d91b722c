"""The length-prefixed JSON frames the host and the sandboxed side exchange (one module, both sides).

A frame is a 4-byte big-endian length and that many bytes of JSON; file descriptors can travel with
a frame over a Unix socket (SCM_RIGHTS). Standard library only (see worker.py).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

if __package__:
    from . import limits
else:  # imported by worker.py run as a script, which put this directory on sys.path
    import limits


def encode_frame(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack("!I", len(body)) + body


def send_frame(fd: int, obj: object, sock: socket.socket | None = None, fds: list[int] | None = None) -> None:
    """Write one frame to `fd`; with `sock` and `fds`, pass the fds along (SCM_RIGHTS)."""
    data = encode_frame(obj)
    if sock is not None and fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(fd: int, sock: socket.socket | None = None) -> tuple[object, list[int]] | None:
    """Read one frame (and any fds sent with it); None at EOF."""
    fds: list[int] = []
    if sock is not None:
        head, fds, _flags, _addr = socket.recv_fds(sock, 4, 16)
        if len(head) < 4:
            rest = _read_exactly(fd, 4 - len(head)) if head else None
            if rest is None:
                return None
            head += rest
    else:
        head = _read_exactly(fd, 4)
        if head is None:
            return None
    (size,) = struct.unpack("!I", head)
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return json.loads(body), fds



def recv_frame_until(sock: socket.socket, deadline: float) -> tuple[object, list[int]]:
    """One frame (and fds sent with it) from a blocking socket, giving up at `deadline`."""
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for the sandbox")
        return left

    sock.settimeout(remaining())
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, 4)
    while 0 < len(head) < 4:
        sock.settimeout(remaining())
        head += sock.recv(4 - len(head))
    if len(head) < 4:
        raise ConnectionError("the sandbox closed the connection")
    (size,) = struct.unpack("!I", head)
    body = b""
    while len(body) < size:
        sock.settimeout(remaining())
        chunk = sock.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the sandbox closed the connection")
        body += chunk
    return json.loads(body), fds




class ProtocolError(Exception):
    """The worker sent something that is not a valid frame (the code in it can write to its socket)."""


class FrameBuffer:
    """Collects frames from a non-blocking stream written by the worker, which is not trusted: a
    frame may not exceed `max_size` and must decode to a JSON object."""

    def __init__(self, max_size: int = limits.MAX_FRAME_BYTES) -> None:
        self.data = b""
        self.max_size = max_size

    def feed(self, chunk: bytes) -> list[dict]:
        self.data += chunk
        frames = []
        while len(self.data) >= 4:
            (size,) = struct.unpack("!I", self.data[:4])
            if size > self.max_size:
                raise ProtocolError(f"frame of {size} bytes")
            if len(self.data) < 4 + size:
                break
            try:
                frame = json.loads(self.data[4:4 + size])
            except (ValueError, RecursionError) as e:
                raise ProtocolError(str(e)) from None
            if not isinstance(frame, dict):
                raise ProtocolError("frame is not an object")
            frames.append(frame)
            self.data = self.data[4 + size:]
        return frames

