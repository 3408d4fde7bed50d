#!/usr/bin/env python3
"""The load test's peer: the official Feishu SDK (lark-oapi) handling event callbacks.

A minimal HTTP server (the standard library's ThreadingHTTPServer, keep-alive on) whose POST
handler hands the raw request to lark-oapi's own webhook entry point,
``EventDispatcherHandler.do(RawRequest)``: it decrypts, checks the verification token and the
X-Lark-Signature, parses and dispatches to a registered ``approval_task`` handler. It keeps no
state (no deduplication, no storage), so it does strictly less than imbridge-host serve.

Usage: feishu_peer.py --port PORT --encrypt-key KEY --token TOKEN
"""

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lark_oapi as lark
from lark_oapi.core.model import RawRequest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--encrypt-key", required=True)
    ap.add_argument("--token", required=True)
    a = ap.parse_args()

    handled = [0]

    def on_event(_event):
        handled[0] += 1

    dispatcher = (
        lark.EventDispatcherHandler.builder(a.encrypt_key, a.token, lark.LogLevel.ERROR)
        .register_p1_customized_event("approval_task", on_event)
        .build()
    )

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status, content, headers=()):
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def do_GET(self):
            self._reply(200, b"ok")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            req = RawRequest()
            req.uri = self.path
            req.headers = {k: v for k, v in self.headers.items()}
            req.body = body
            resp = dispatcher.do(req)
            hdrs = [(k, v) for k, v in (resp.headers or {}).items() if k.lower() != "content-length"]
            self._reply(resp.status_code or 500, resp.content or b"", hdrs)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
