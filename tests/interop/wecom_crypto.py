#!/usr/bin/env python3
"""WeCom callback crypto interop with wechatpy (PyPI), a WXBizMsgCrypt implementation no one on
this project wrote. One JSON object on stdout.

  produce  --token T --key AESKEY --corp CORPID --plaintext-file F [--timestamp S]
           Encrypt + sign F's contents with wechatpy's WeChatCrypto.encrypt_message and print
           {"query": "msg_signature=..&timestamp=..&nonce=..", "body": "<xml>…<Encrypt>…"} —
           what WeCom POSTs to a callback URL.
  decrypt  --token T --key AESKEY --corp CORPID --encrypt B64 [--timestamp S --nonce N
           --signature SIG]
           Decrypt a ciphertext made by the plugin with wechatpy (check_signature when a
           signature is given, which also checks it) and print {"plaintext": …}.
"""
import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET

from wechatpy.enterprise.crypto import WeChatCrypto
from wechatpy.crypto import _get_signature


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["produce", "decrypt"])
    p.add_argument("--token", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--corp", required=True)
    p.add_argument("--plaintext-file")
    p.add_argument("--encrypt")
    p.add_argument("--timestamp", default=str(int(time.time())))
    p.add_argument("--nonce", default="wechatpy1")
    p.add_argument("--signature")
    a = p.parse_args()
    crypto = WeChatCrypto(a.token, a.key, a.corp)
    if a.cmd == "produce":
        with open(a.plaintext_file, encoding="utf-8") as f:
            plaintext = f.read()
        reply = ET.fromstring(crypto.encrypt_message(plaintext, a.nonce, a.timestamp))
        enc = reply.findtext("Encrypt")
        query = "msg_signature=%s&timestamp=%s&nonce=%s" % (
            reply.findtext("MsgSignature"), reply.findtext("TimeStamp"), reply.findtext("Nonce"))
        body = ("<xml><ToUserName><![CDATA[%s]]></ToUserName><Encrypt><![CDATA[%s]]></Encrypt>"
                "<AgentID><![CDATA[1]]></AgentID></xml>") % (a.corp, enc)
        out = {"query": query, "body": body, "encrypt": enc}
    else:
        signature = a.signature or _get_signature(a.token, a.timestamp, a.nonce, a.encrypt)
        # check_signature verifies msg_signature, decrypts and checks the receive id (CorpID).
        plain = crypto.check_signature(signature, a.timestamp, a.nonce, a.encrypt)
        out = {"plaintext": plain if isinstance(plain, str) else plain.decode("utf-8")}
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
