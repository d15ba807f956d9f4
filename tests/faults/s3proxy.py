"""A fault-injecting TCP proxy on 127.0.0.1 in front of the test S3 server (threads, standard library only).

    proxy = FaultProxy(s3_server_url)        # proxy.url: the endpoint to give the client
    proxy.fault("503", count=4)              # the next 4 connections get "503 Service Unavailable"
    proxy.fault("reset", seconds=30, when=r"PUT .*checkpoint-")   # a 30-s outage, starting at that request
    proxy.fault("hang", seconds=20)          # connections accepted, requests read, never answered
    proxy.close()

A fault window starts at once, or when a request line matching ``when`` passes through (that request is cut
off: the client sees a reset). While it lasts, every established connection is cut and every new one gets the
fault; it ends after ``count`` connections or ``seconds``. ``proxy.log`` lists what happened.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from urllib.parse import urlparse

MODES = ("reset", "503", "hang")
RESPONSE_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: 98\r\n"
                b"Connection: close\r\n\r\n<?xml version=\"1.0\"?><Error><Code>ServiceUnavailable</Code>"
                b"<Message>injected</Message></Error>\n")


def _rst(sock: socket.socket) -> None:
    """Close with a TCP reset (what a dying load balancer or a network partition gives)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.mode: str | None = None  # the active fault, or None (pass through)
        self.count: int | None = None
        self.until: float | None = None
        self.armed: tuple[re.Pattern, str, int | None, float | None] | None = None
        self.live: set[socket.socket] = set()
        self.held: list[socket.socket] = []
        self.log: list[str] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    # -- control
    def fault(self, mode: str, count: int | None = None, seconds: float | None = None, when: str | None = None):
        assert mode in MODES and (count or seconds)
        with self.lock:
            if when:
                self.armed = (re.compile(when.encode()), mode, count, seconds)
            else:
                self._start(mode, count, seconds)

    def _start(self, mode: str, count: int | None, seconds: float | None) -> None:  # under self.lock
        self.mode, self.count = mode, count
        self.until = time.monotonic() + seconds if seconds else None
        self.log.append(f"start {mode} count={count} seconds={seconds}")
        for s in list(self.live):  # established connections break too
            _rst(s)
        self.live.clear()

    def _active(self) -> str | None:  # under self.lock
        if self.mode is None:
            return None
        if (self.until is not None and time.monotonic() >= self.until) or self.count == 0:
            self.log.append(f"end {self.mode}")
            self.mode = None
            for s in self.held:
                _rst(s)
            self.held.clear()
            return None
        if self.count is not None:
            self.count -= 1
        return self.mode

    def close(self) -> None:
        self.closed.set()
        _rst(self.listener)
        with self.lock:
            for s in [*self.live, *self.held]:
                _rst(s)

    # -- serving
    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                mode = self._active()
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str | None) -> None:
        if mode == "reset":
            self.log.append("reset")
            _rst(client)
            return
        if mode in ("503", "hang"):
            head = b""
            client.settimeout(10)
            try:
                while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
                    head += chunk
            except OSError:
                pass
            self.log.append(f"{mode} {head.split(b' HTTP/')[0][:120].decode(errors='replace')}")
            if mode == "503":
                try:
                    client.sendall(RESPONSE_503)
                finally:
                    client.close()
            else:
                with self.lock:
                    self.held.append(client)  # answered never; reset when the window ends
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            _rst(client)
            return
        with self.lock:
            self.live.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if requests and self.armed is not None:
                    with self.lock:
                        armed = self.armed
                        if armed is not None and armed[0].search(chunk):
                            self.armed = None
                            self.log.append(f"trigger {armed[0].pattern.decode()}")
                            self._start(armed[1], armed[2], armed[3])
                            return
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with self.lock:
                self.live.discard(src)
                self.live.discard(dst)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
