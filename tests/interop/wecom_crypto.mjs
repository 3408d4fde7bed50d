#!/usr/bin/env node
// WeCom callback crypto interop with the official @wecom/crypto package (npm). One JSON object
// on stdout.
//   produce <token> <aesKey> <corpId> <plaintextFile>  → {"query", "body"} as WeCom POSTs it
//   decrypt <aesKey> <ciphertext>                        → {"message", "id"} (id = receive id)
import { readFileSync } from "node:fs";
import { encrypt, decrypt, getSignature } from "@wecom/crypto";

const [cmd, ...args] = process.argv.slice(2);
if (cmd === "produce") {
  const [token, key, corp, file] = args;
  const enc = encrypt(key, readFileSync(file, "utf8"), corp);
  const timestamp = String(Math.floor(Date.now() / 1000));
  const nonce = "wecomcrypto1";
  const sig = getSignature(token, timestamp, nonce, enc);
  const body = `<xml><ToUserName><![CDATA[${corp}]]></ToUserName><Encrypt><![CDATA[${enc}]]></Encrypt><AgentID><![CDATA[1]]></AgentID></xml>`;
  console.log(JSON.stringify({ query: `msg_signature=${sig}&timestamp=${timestamp}&nonce=${nonce}`, body }));
} else if (cmd === "decrypt") {
  const [key, enc] = args;
  const { message, id } = decrypt(key, enc);
  console.log(JSON.stringify({ message, id }));
} else {
  console.error("usage: wecom_crypto.mjs produce|decrypt …");
  process.exit(2);
}
