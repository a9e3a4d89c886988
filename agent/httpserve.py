"""The threaded HTTP server under the Prometheus exporter and the web page.

Daemon threads, so a stuck client never holds up shutdown; address reuse, so a
restarted agent can bind again at once; IPv6 when the bind address is one.
"""
from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LocalHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
