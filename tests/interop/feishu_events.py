#!/usr/bin/env python3
"""Feishu event-callback interop with the official SDK (lark-oapi).

Two jobs, one JSON object on stdout each:

  validate  Feed a request produced by OUR side (the simulator, or anything else) to lark-oapi's
            own webhook entry point, ``EventDispatcherHandler.do(RawRequest)``, configured with
            the app's Encrypt Key and Verification Token. lark-oapi decrypts the body, checks the
            verification token and the X-Lark-Signature header, then dispatches. We report
            whether it accepted the request.

  produce   Build what Feishu sends for a plaintext event (encrypted + signed when an Encrypt Key
            is given), so the plugin can be tested against bytes no one on this project wrote.
            lark-oapi only decrypts (its AESCipher has no encrypt method), so the ciphertext is
            made with pycryptodome mirroring ``AESCipher.decrypt`` exactly (key = sha256(encrypt
            key), random 16-byte IV prefixed, PKCS#7 to 16 bytes, base64). The signature mirrors
            ``EventDispatcherHandler._verify_sign``. The result is then run back through the SDK's
            dispatcher as a self-check (``sdk_self_check``).

Request files (validate input, produce output) look like
    {"headers": {"X-Lark-Signature": "...", ...}, "body": "<raw body as sent>"}

Usage:
    feishu_events.py validate --encrypt-key KEY --token TOKEN --request REQUEST.json [--request …]
    feishu_events.py produce  --encrypt-key KEY --token TOKEN --event EVENT.json [--out FILE]
Use ``--encrypt-key ""`` for apps without an Encrypt Key. ``-`` reads a file from stdin.
Exit status is 0 whenever a report was printed; ``accepted`` carries the verdict.
"""

import argparse
import base64
import hashlib
import json
import os
import secrets
import sys
import time

import lark_oapi as lark
from lark_oapi.core.const import (
    LARK_REQUEST_NONCE,
    LARK_REQUEST_SIGNATURE,
    LARK_REQUEST_TIMESTAMP,
)
from lark_oapi.core.model import RawRequest, RawResponse
from lark_oapi.core.utils import AESCipher

try:  # pycryptodome, a lark-oapi dependency
    from Crypto.Cipher import AES
except ImportError:  # pragma: no cover - only without lark-oapi's deps
    AES = None

# Event types registered with the dispatcher. lark-oapi answers 500 "processor not found" for
# anything else, which would hide the crypto verdict; pass --register for more types.
DEFAULT_P1 = ["approval_task", "approval_instance"]
DEFAULT_P2 = ["im.message.receive_v1", "approval_task", "approval_instance"]


def _read(path):
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _canonical_headers(headers):
    """HTTP header names are case-insensitive, but RawRequest.headers is a plain dict that the
    SDK reads with its canonical spellings; map ours onto them."""
    canonical = {
        h.lower(): h
        for h in (LARK_REQUEST_TIMESTAMP, LARK_REQUEST_NONCE, LARK_REQUEST_SIGNATURE)
    }
    return {canonical.get(k.lower(), k): v for k, v in headers.items()}


def run_sdk(encrypt_key, token, headers, body, extra_types=()):
    """Runs lark-oapi's webhook handler on a raw request; returns the report dict."""
    seen = []
    builder = lark.EventDispatcherHandler.builder(encrypt_key, token)
    for t in DEFAULT_P1:
        builder = builder.register_p1_customized_event(t, lambda e: seen.append(("p1", e)))
    for t in sorted(set(DEFAULT_P2) | set(extra_types)):
        builder = builder.register_p2_customized_event(t, lambda e: seen.append(("p2", e)))
    handler = builder.build()

    req = RawRequest()
    req.uri = "/callback"
    req.headers = _canonical_headers(headers)
    req.body = body if isinstance(body, bytes) else body.encode("utf-8")
    resp: RawResponse = handler.do(req)
    content = (resp.content or b"").decode("utf-8", "replace")

    report = {
        "accepted": resp.status_code == 200,
        "sdk_status": resp.status_code,
        "sdk_response": content,
        "dispatched": None,
        "plaintext": None,
    }
    if seen:
        schema, event = seen[0]
        if schema == "p1":
            kind = (event.event or {}).get("type")
        else:
            kind = getattr(event.header, "event_type", None)
        report["dispatched"] = {"schema": schema, "type": kind}
    # Show what the SDK decrypted (useful when diagnosing a rejection).
    try:
        envelope = json.loads(req.body)
        if isinstance(envelope, dict) and envelope.get("encrypt") and encrypt_key:
            report["plaintext"] = AESCipher(encrypt_key).decrypt_str(envelope["encrypt"])
        else:
            report["plaintext"] = req.body.decode("utf-8", "replace")
    except Exception as e:  # report, never crash: the verdict is already in "accepted"
        report["plaintext_error"] = str(e)
    return report


def sdk_style_encrypt(encrypt_key, plaintext: bytes) -> str:
    """Inverse of lark_oapi.core.utils.AESCipher.decrypt."""
    key = hashlib.sha256(encrypt_key.encode("utf-8")).digest()
    iv = os.urandom(AES.block_size)
    pad = AES.block_size - len(plaintext) % AES.block_size
    cipher = AES.new(key, AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(plaintext + bytes([pad]) * pad)).decode()


def produce(encrypt_key, token, event_text, extra_types=()):
    event = json.loads(event_text)
    plaintext = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if encrypt_key:
        if AES is None:
            raise SystemExit("pycryptodome is required to encrypt")
        body = json.dumps({"encrypt": sdk_style_encrypt(encrypt_key, plaintext)}).encode()
        # Feishu leaves url_verification unsigned.
        if event.get("type") != "url_verification":
            timestamp = str(int(time.time()))
            nonce = secrets.token_hex(16)
            signature = hashlib.sha256(
                (timestamp + nonce + encrypt_key).encode("utf-8") + body
            ).hexdigest()
            headers[LARK_REQUEST_TIMESTAMP] = timestamp
            headers[LARK_REQUEST_NONCE] = nonce
            headers[LARK_REQUEST_SIGNATURE] = signature
    else:
        body = plaintext
    check = run_sdk(encrypt_key, token, headers, body, extra_types)
    return {
        "headers": headers,
        "body": body.decode("utf-8"),
        "plaintext": plaintext.decode("utf-8"),
        "cipher_source": (
            "pycryptodome, mirroring lark_oapi AESCipher.decrypt (the SDK has no encrypt)"
            if encrypt_key
            else "none (no Encrypt Key)"
        ),
        "sdk_self_check": {k: check[k] for k in ("accepted", "sdk_status", "sdk_response")},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("validate", "produce"):
        s = sub.add_parser(name)
        s.add_argument("--encrypt-key", required=True, help='Encrypt Key ("" for none)')
        s.add_argument("--token", required=True, help="Verification Token")
        s.add_argument("--register", action="append", default=[], help="extra v2 event type")
        if name == "validate":
            s.add_argument(
                "--request",
                required=True,
                action="append",
                help="request JSON file, or -; repeat to validate several in one run "
                "(importing lark-oapi takes seconds), which prints a JSON array",
            )
        else:
            s.add_argument("--event", required=True, help="plaintext event JSON file, or -")
            s.add_argument("--out", help="also write the request JSON here")
    args = p.parse_args(argv)

    # The SDK logs rejections with tracebacks on stderr; keep stdout for our JSON only.
    lark.logger.setLevel(50)
    version = getattr(lark, "__version__", None) or _dist_version()
    if args.cmd == "validate":
        outs = []
        for path in args.request:
            request = json.loads(_read(path))
            report = run_sdk(
                args.encrypt_key,
                args.token,
                request.get("headers", {}),
                request.get("body", ""),
                args.register,
            )
            report["request"] = path
            report["lark_oapi_version"] = version
            outs.append(report)
        json.dump(outs[0] if len(outs) == 1 else outs, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    else:
        out = produce(args.encrypt_key, args.token, _read(args.event), args.register)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"headers": out["headers"], "body": out["body"]}, f)
    out["lark_oapi_version"] = version
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _dist_version():
    try:
        from importlib.metadata import version

        return version("lark-oapi")
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
