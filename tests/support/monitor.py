"""Valkey's MONITOR, read in a thread: the commands the server ran, in the order it ran them."""

from __future__ import annotations

import contextlib
import socket
import threading


class Monitor:
    """Every command Valkey runs from now on, one line each (``MONITOR``'s own format)."""

    def __init__(self, port: int) -> None:
        self.lines: list[str] = []
        self._socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._socket.settimeout(None)
        self._socket.sendall(b"MONITOR\r\n")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError), self._socket.makefile("rb") as lines:
            for line in lines:
                self.lines.append(line.decode(errors="replace").rstrip("\r\n"))

    def commands(self, *names: str, mentioning: str) -> list[int]:
        """The positions of the commands called ``names`` (any case) naming ``mentioning``."""
        wanted = {f'"{name.upper()}"' for name in names}
        return [
            index
            for index, line in enumerate(list(self.lines))
            if mentioning in line and any(f"] {name}" in line for name in wanted)
        ]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(timeout=10)
