"""The API's listening socket, taken first: before the experts load and before Ray starts."""

from __future__ import annotations

import socket

from askexpert.errors import AskExpertError


def listen_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound and listening before anything slow starts (loading the experts,
    starting Ray): a port in use fails at once, naming the address, and the processes a local Ray instance
    starts (which bind ports of their own) cannot take it in the seconds before the API would have bound it (a
    test's Ray server once lost its port so). An edge that connects while the server starts waits in the backlog
    (its own timeout bounds the wait; `/readyz` says when the server is ready) instead of being refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart may reuse the port
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog; requests wait there until the API serves
    except OSError as exc:
        sock.close()
        raise AskExpertError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (choose another --port or --host)"
        ) from None
    return sock  # not inheritable (PEP 446): Ray's child processes never hold the port
