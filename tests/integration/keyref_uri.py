"""keyref_uri.py IN URI OUT: the key reference IN (a P11AGENT KEY PEM file as
`p11agent export-key` writes it, with the public key) rewritten to name URI
instead, into OUT.  The DER is edited by hand (no asn1 module needed): the
version and everything after the URI are kept as they are.
"""
import base64, re, sys

def tlv(tag, body):
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(b)]) + b + body

def element(d, i):
    """The contents of the DER element at i, and the index after it."""
    n = d[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7f
        n = int.from_bytes(d[i:i + k], "big")
        i += k
    return d[i:i + n], i + n

src, uri, dst = sys.argv[1:4]
pem = open(src).read()
der = base64.b64decode(re.search(r"-----BEGIN P11AGENT KEY-----\n(.*?)-----END", pem, re.S).group(1))
body, _ = element(der, 0)
version, i = element(body, 0)
_, i = element(body, i)                 # the URI it had
out = tlv(0x30, tlv(0x02, version) + tlv(0x0c, uri.encode()) + body[i:])
with open(dst, "w") as f:
    f.write("-----BEGIN P11AGENT KEY-----\n" + base64.encodebytes(out).decode() +
            "-----END P11AGENT KEY-----\n")
