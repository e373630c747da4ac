"""``/ui``: a page to try the service in a browser, served by the service's own process.

Plain HTML, JavaScript and CSS from ``serving/static/`` (shipped as package data and in the Bento),
no build step and nothing fetched from anywhere else: the page calls this server's own ``/info``,
``/classify`` and ``/probe``, and its Content-Security-Policy lets it load nothing but this origin
(plus the ``data:``/``blob:`` images it makes itself). Only the three files below are served: there
is no directory listing and no other path under ``/ui``. Mounted at the end of ``serving/service.py``
with ``Classifier.mount_asgi_app(ui_app, path="/ui")``; ``/ui`` redirects to ``/ui/``.
"""
from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).resolve().parent / "static"

# What the page may load: its own files, its own API, and images it builds from the API's base64 PNGs
# (data:) and from the user's chosen file (blob:). No inline script, no frames, no form posts.
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}

# URL path under the mount -> (file, media type): the whole of what is served.
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}


def _serve(name: str, media_type: str):
    async def endpoint(request: Request) -> Response:
        return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)
    return endpoint


ui_app = Starlette(routes=[Route(path, _serve(name, media_type), methods=["GET", "HEAD"])
                           for path, (name, media_type) in FILES.items()])
