"""httpbin "v2" for the shadow-diff demo: httpbin itself, except that GET /json is broken.

A new version that regressed on one endpoint, the kind of change mirroring is meant to catch before
any user sees it: every other path answers exactly as httpbin (v1) does, /json answers 500 with an
error document. Run under gunicorn like v1:

    gunicorn -b 0.0.0.0:80 --pythonpath deploy/local/shadow-diff httpbin_v2_diff:app
"""

import json

from httpbin import app as httpbin

BROKEN_PATH = "/json"


def app(environ, start_response):
    """The WSGI app: httpbin, with BROKEN_PATH answered 500."""
    if environ.get("PATH_INFO") == BROKEN_PATH:
        body = json.dumps({"error": "v2 cannot render the slideshow"}).encode() + b"\n"
        start_response(
            "500 INTERNAL SERVER ERROR",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
    return httpbin(environ, start_response)
