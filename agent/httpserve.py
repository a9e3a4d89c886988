"""The threaded HTTP server under the Prometheus exporter and the web page.

Daemon threads, so a stuck client never holds up shutdown; address reuse, so a
restarted agent can bind again at once; IPv6 when the bind address is one.
"""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    @property
    def bound(self) -> tuple[str, int]:
        """(host, port) it listens on: the real port when asked for port 0."""
        host, port = self.server_address[:2]
        return str(host), int(port)


def serve_in_thread(server: LocalHTTPServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def shutdown(server: LocalHTTPServer, thread: threading.Thread | None, timeout_s: float = 5.0) -> None:
    """Stop accepting, close the socket, wait (bounded) for the serving thread."""
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout=timeout_s)
