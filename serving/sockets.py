"""Spread connections over BentoML's API workers (Linux): a listening socket of each worker's own.

BentoML 1.4's arbiter binds one listening socket and every API worker inherits it, so a new connection
goes to whichever worker accepts first, and a worker that wakes to a burst of connections accepts
them all: with the 32 keep-alive connections `wrk` opens at once, one worker of two served nothing in
most of the ceiling benchmark's rounds, and a load balancer that keeps few long-lived connections can
land them all on one worker. (BentoML's issue #5426, open.) With ``SO_REUSEPORT`` Linux hashes each new
connection onto one of several listening sockets bound to the same address, so here the arbiter's
socket gets the option before it is bound, and every worker serves it as before and, beside it, a
socket of its own with the option (``spread_connections``). The shared socket stays drained by every
live worker (a group member no process accepts from would leave its share of clients hanging: a
worker that died and is not respawned, a reload that renumbers the workers), and a worker's own
socket is only bound here: uvicorn's event loop listens on it once the app has started, so no
connection waits in it through a worker's start. With N workers a connection lands on the shared
socket with probability 1/(N+1), and on each worker's own otherwise. A worker that stops resets the
connections still queued on its own socket (Linux's ``net.ipv4.tcp_migrate_req=1`` moves them to the
others instead). Only processes of the same user can join such a group, but any of them can: a second
server of the same user started on the port shares its connections instead of failing with "address
in use". ``CAPT_SPREAD_CONNECTIONS=0`` keeps BentoML's one shared socket.

It patches two things, checked when it is applied (it fails closed, as the patches of
``serving/middleware.py`` do): ``circus.sockets.CircusSocket.__init__`` (the arbiter's socket; circus's
own ``so_reuseport`` option is not usable here, since circus then leaves the socket unbound and binds
per process only for commands that name the socket, which BentoML's do in their arguments instead)
and ``uvicorn.Server.run``, which BentoML's worker calls with the inherited socket.
"""
from __future__ import annotations

import inspect
import logging
import os
import socket
import sys

from .middleware import _ours, _refuse_patch, check_bentoml_version

logger = logging.getLogger("capt.serving")

SPREAD_ENV = "CAPT_SPREAD_CONNECTIONS"
API_SOCKET_NAME = "_bento_api_server"  # BentoML's name of the API workers' socket (_bentoml_impl.server.serving)
HERE = "serving/sockets.py"
UNBALANCED = "would leave BentoML's one shared socket, on which one worker can take every connection"


def spreading_requested() -> bool:
    """On Linux (where SO_REUSEPORT balances connections) unless ``CAPT_SPREAD_CONNECTIONS=0``."""
    if os.environ.get(SPREAD_ENV, "").strip().lower() in ("0", "false", "no"):
        return False
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def own_socket(shared: socket.socket) -> socket.socket:
    """A socket of this process's own bound at ``shared``'s address (which must have SO_REUSEPORT), not
    yet listening: the caller serves it beside ``shared``, and whoever serves it listens on it."""
    own = socket.socket(shared.family, shared.type, shared.proto)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(shared.getsockname())
        own.setblocking(False)
    except OSError:
        own.close()
        raise
    return own


def spread_connections() -> None:
    """Patch the arbiter's API socket to take SO_REUSEPORT, and every API worker to serve a socket of its
    own at its address beside it. Harmless to call again, and in every process (each patch acts
    in its own process only). Does nothing off Linux or with ``CAPT_SPREAD_CONNECTIONS=0``."""
    if not spreading_requested():
        return
    check_bentoml_version()
    try:
        from circus.sockets import CircusSocket
        import uvicorn
        from bentoml._internal.context import server_context
    except ImportError as err:
        raise _refuse_patch("circus, uvicorn or bentoml._internal.context", f"cannot be imported ({err})",
                            UNBALANCED, HERE) from None
    init = CircusSocket.__dict__.get("__init__")
    init = getattr(init, "_capt_original", init)  # applied already (serving.service, then the ceiling)
    if not inspect.isfunction(init) or "name" not in inspect.signature(init).parameters:
        raise _refuse_patch("circus.sockets.CircusSocket.__init__", "does not take a name as it did", UNBALANCED, HERE)
    run = uvicorn.Server.__dict__.get("run")
    run = getattr(run, "_capt_original", run)
    if not inspect.isfunction(run) or "sockets" not in inspect.signature(run).parameters:
        raise _refuse_patch("uvicorn.Server.run", "does not take sockets as it did", UNBALANCED, HERE)
    if not hasattr(server_context, "worker_index"):
        raise _refuse_patch("bentoml._internal.context.server_context", "has no worker_index", UNBALANCED, HERE)
    if not getattr(CircusSocket.__init__, "_capt_patch", False):
        @_ours(init)
        def init_reusing_port(self, *args, **kwargs):
            init(self, *args, **kwargs)
            if self.name == API_SOCKET_NAME and self.family in (socket.AF_INET, socket.AF_INET6):
                # Before the arbiter binds it; circus's own so_reuseport flag stays off (see above).
                self.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        CircusSocket.__init__ = init_reusing_port
    if not getattr(uvicorn.Server.run, "_capt_patch", False):
        @_ours(run)
        def run_on_own_socket_too(self, sockets=None):
            index = server_context.worker_index
            if sockets and len(sockets) == 1 and index is not None:
                shared = sockets[0]
                if shared.family in (socket.AF_INET, socket.AF_INET6) and \
                        shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                    sockets = [shared, own_socket(shared)]  # uvicorn listens on both after the app's start
                    logger.info("API worker %d serves the shared socket and one of its own at %s (SO_REUSEPORT)",
                                index, shared.getsockname())
            return run(self, sockets=sockets)
        uvicorn.Server.run = run_on_own_socket_too
