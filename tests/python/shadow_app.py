"""A small WSGI app for the shadow-diff tests (tests/e2e/shadow_diff.rs): the same app serves as v1
and as v2 (SHADOW_VARIANT=v1|v2), and differs between the two only where a test wants a divergence.

Run under gunicorn like httpbin: `gunicorn --chdir tests/python shadow_app:app`.
"""

import json
import os
import time
import uuid

VARIANT = os.environ.get("SHADOW_VARIANT", "v1")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status = "200 OK"
    headers = [("Content-Type", "application/json")]
    body = {"path": path}
    if path == "/get":
        body = {"ok": True}
    elif path == "/flaky":
        # v2 fails on this one path only.
        if VARIANT == "v2":
            status = "500 Internal Server Error"
            body = {"error": "v2 broke /flaky"}
    elif path == "/hdr":
        if VARIANT == "v2":
            headers.append(("X-Added-By-V2", "yes"))
    elif path == "/json/ignored":
        # Differs only in $.served_by, which the route ignores.
        body = {"a": {"b": 1}, "served_by": VARIANT}
    elif path == "/json/noisy":
        # A fresh id per answer on both versions: noise, learned from two primaries.
        body = {"a": 1, "meta": {"request": str(uuid.uuid4())}}
    elif path == "/json/diff":
        body = {"a": {"b": 2 if VARIANT == "v2" else 1}, "list": [1, 2, 3], "served_by": VARIANT}
    elif path == "/slow":
        if VARIANT == "v2":
            time.sleep(3)
    elif path.startswith("/orders/"):
        body = {"order": path.rsplit("/", 1)[-1]}
    data = json.dumps(body).encode()
    headers.append(("Content-Length", str(len(data))))
    start_response(status, headers)
    return [data]
