"""serving/sockets.py: each API worker serves a listening socket of its own beside the shared one (SO_REUSEPORT),
and the patches that do it refuse to apply to code that no longer looks as they expect."""
import socket
import sys

import pytest

from serving.sockets import SPREAD_ENV, own_socket, spread_connections, spreading_requested

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux only")


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(SPREAD_ENV, "0")
    assert not spreading_requested()
    spread_connections()  # nothing to patch, nothing checked


@linux_only
def test_a_worker_s_own_socket_listens_at_the_shared_address():
    shared = socket.socket()
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    shared.bind(("127.0.0.1", 0))
    shared.listen(64)  # room for every client in either queue: a full queue makes connect() wait
    own = own_socket(shared)
    try:
        assert own.getsockname() == shared.getsockname() and own.fileno() != shared.fileno()
        assert own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        # Bound, not listening: no connection can wait in it before its server listens (after the app's start).
        with pytest.raises(OSError):
            own.accept()
        own.listen(64)
        clients = [socket.create_connection(shared.getsockname()) for _ in range(32)]
        accepted = []
        for listener in (shared, own):  # the kernel put each connection in one of the two queues
            listener.setblocking(False)
            accepted.append(0)
            while True:
                try:
                    listener.accept()[0].close()
                    accepted[-1] += 1
                except BlockingIOError:
                    break
        assert sum(accepted) == 32 and min(accepted) >= 1, accepted  # all 32 in one queue: p = 2**-31
        for client in clients:
            client.close()
    finally:
        own.close()
        shared.close()


@linux_only
def test_a_shared_socket_without_the_option_is_refused():
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen(1)
    try:
        with pytest.raises(OSError):  # the kernel joins only sockets that all set SO_REUSEPORT
            own_socket(plain).close()
    finally:
        plain.close()


@linux_only
def test_the_patches_fail_closed(monkeypatch):
    import uvicorn
    monkeypatch.delenv(SPREAD_ENV, raising=False)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # no longer given the sockets
    with pytest.raises(RuntimeError, match="uvicorn.Server.run does not take sockets"):
        spread_connections()


@linux_only
def test_applying_it_twice_wraps_once(monkeypatch):
    """serving.service applies it, and the ceiling service (which imports serving.service) again."""
    import uvicorn
    from circus.sockets import CircusSocket
    monkeypatch.delenv(SPREAD_ENV, raising=False)
    spread_connections()
    spread_connections()
    assert CircusSocket.__init__._capt_patch and CircusSocket.__init__._capt_original.__module__ == "circus.sockets"
    assert uvicorn.Server.run._capt_patch and uvicorn.Server.run._capt_original.__module__ == "uvicorn.server"
