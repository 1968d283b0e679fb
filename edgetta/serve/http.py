"""Local HTTP for serve: bounded servers and the MJPEG preview.

Every connection gets a socket timeout (a client that sends nothing is dropped) and at most
``max_connections`` are served at once per port; more are answered 503 and closed at once, so
slow or idle clients cannot exhaust threads or file handles. Preview viewers are capped too,
and each frame is drawn and encoded once, whatever the number of viewers.
"""
from __future__ import annotations

import io
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np

from .config import Refused

log = logging.getLogger("edgetta.serve")
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nbusy\n")


class BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.settimeout(0.05)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_http(host: str, port: int, handle: Callable[[BaseHTTPRequestHandler], None], what: str,
               max_connections: int, timeout: float) -> BoundedHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def setup(self) -> None:
            self.timeout = timeout  # socket timeout for every read and write of this client
            super().setup()

        def do_GET(self) -> None:  # noqa: N802
            try:
                handle(self)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    try:
        srv = BoundedHTTPServer((host, port), Handler, max_connections)
    except OSError as e:
        raise Refused(f"cannot listen on {host}:{port} for {what}: {e.strerror or e}") from None
    threading.Thread(target=srv.serve_forever, name=f"edgetta-{what}", daemon=True).start()
    return srv


def reply(h: BaseHTTPRequestHandler, code: int, ctype: str, body: bytes) -> None:
    h.send_response(code)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Cache-Control", "no-store")
    h.end_headers()
    h.wfile.write(body)


class Preview:
    """Latest frame and its prediction as an MJPEG stream (Pillow draws and encodes it, once
    per frame, only while someone watches)."""
    BOUNDARY = "edgettaframe"

    def __init__(self, max_clients: int):
        from PIL import Image, ImageDraw
        self._image, self._draw = Image, ImageDraw
        self.cond = threading.Condition()
        self.latest: tuple[int, np.ndarray, str] | None = None
        self.encoded: tuple[int, bytes] | None = None
        self.closed = False
        self.clients = threading.BoundedSemaphore(max_clients)
        self.refused = 0

    def update(self, index: int, frame: np.ndarray, caption: str) -> None:
        with self.cond:
            self.latest = (index, frame, caption)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def render(self, frame: np.ndarray, caption: str) -> bytes:
        img = self._image.fromarray(frame)
        scale = max(1, -(-256 // max(1, min(img.size))))
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), self._image.NEAREST)
        d = self._draw.Draw(img)
        d.rectangle((0, 0, img.width, 20), fill=(0, 0, 0))
        d.text((6, 4), caption, fill=(255, 255, 255))
        out = io.BytesIO()
        img.save(out, "JPEG", quality=80)
        return out.getvalue()

    def _jpeg(self, index: int, frame: np.ndarray, caption: str) -> bytes:
        with self.cond:
            if self.encoded is not None and self.encoded[0] == index:
                return self.encoded[1]
        jpg = self.render(frame, caption)
        with self.cond:
            self.encoded = (index, jpg)
        return jpg

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.split("?")[0] not in ("/", "/stream.mjpg"):
            reply(h, 404, "text/plain", b"not found; the preview is at /\n")
            return
        if not self.clients.acquire(blocking=False):
            self.refused += 1
            reply(h, 503, "text/plain", b"too many preview clients\n")
            return
        try:
            h.send_response(200)
            h.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={self.BOUNDARY}")
            h.send_header("Cache-Control", "no-store")
            h.end_headers()
            seen = -1
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.closed or (self.latest and self.latest[0] != seen),
                                       timeout=1.0)
                    if self.closed:
                        return
                    if not self.latest or self.latest[0] == seen:
                        continue
                    seen, frame, caption = self.latest
                jpg = self._jpeg(seen, frame, caption)
                h.wfile.write(f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                              f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                h.wfile.flush()
        finally:
            self.clients.release()
