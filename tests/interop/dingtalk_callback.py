#!/usr/bin/env python3
"""DingTalk callback crypto interop with an implementation no one on this project wrote.

DingTalk event callbacks use the WXBizMsgCrypt frame (AES-256-CBC, IV = key[:16], 32-byte
PKCS#7, random16 | u32 BE length | message | owner key) with the AppKey as the owner key, and a
hex SHA-1 over the sorted token, timestamp, nonce and ciphertext. wechatpy's ``PrpCrypto`` and
``_get_signature`` implement exactly that for WeCom, so with the AppKey as the receive id they
produce and check what DingTalk sends and expects.

    dingtalk_callback.py produce --token T --aes-key K --app-key A --event EVENT_JSON
        -> {"query": "signature=..&timestamp=..&nonce=..", "body": "{\"encrypt\": ..}"}
    dingtalk_callback.py open-reply --token T --aes-key K --app-key A --reply REPLY_JSON
        -> {"signature_ok": bool, "plaintext": str | null, "error": str | null}

Timestamps are milliseconds, as DingTalk sends them.
"""

import argparse
import base64
import json
import sys
import time

import wechatpy
from wechatpy.crypto import PrpCrypto, _get_signature
from wechatpy.utils import random_string


def prp(aes_key):
    return PrpCrypto(base64.b64decode(aes_key + "="))


def produce(args):
    enc = prp(args.aes_key).encrypt(args.event, args.app_key)
    enc = enc.decode() if isinstance(enc, bytes) else enc
    ts = str(int(time.time() * 1000))
    nonce = random_string(8)
    sig = _get_signature(args.token, ts, nonce, enc)
    return {
        "query": f"signature={sig}&timestamp={ts}&nonce={nonce}",
        "body": json.dumps({"encrypt": enc}),
        "wechatpy_version": wechatpy.__version__,
    }


def open_reply(args):
    reply = json.loads(args.reply)
    sig = _get_signature(args.token, reply["timeStamp"], reply["nonce"], reply["encrypt"])
    out = {"signature_ok": sig == reply["msg_signature"], "plaintext": None, "error": None}
    try:
        out["plaintext"] = prp(args.aes_key).decrypt(reply["encrypt"], args.app_key)
    except Exception as e:  # wrong owner key raises InvalidAppIdException
        out["error"] = type(e).__name__
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["produce", "open-reply"])
    p.add_argument("--token", required=True)
    p.add_argument("--aes-key", required=True)
    p.add_argument("--app-key", required=True)
    p.add_argument("--event")
    p.add_argument("--reply")
    args = p.parse_args()
    out = produce(args) if args.command == "produce" else open_reply(args)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
