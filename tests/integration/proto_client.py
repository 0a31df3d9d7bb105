"""proto_client.py VERB ARGS...: small socket clients for the test scripts.

  stale-socket PATH         bind a Unix socket at PATH and close it without
                            listening: the file a crashed agent leaves
  connect-fails SOCK ERRNO  connect() to SOCK must fail with ERRNO (a name,
                            e.g. EACCES); prints the errno's name or
                            "connected"; exit 0 when it failed that way
  refused SOCK              connect, print "connected", send HELLO: exit 0
                            when the agent closes without a reply byte
                            (prints "reply bytes: N")
  hold SOCK READY [SECONDS] a main connection with HELLO answered, then
                            READY is created and the connection is held
                            open SECONDS (default 60) or until killed

The wire protocol itself is p11a_proto.
"""
import errno
import socket
import sys
import time

import p11a_proto as P


def stale_socket(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return 0


def connect_fails(path, name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as e:
        print(errno.errorcode.get(e.errno, e.errno))
        return 0 if errno.errorcode.get(e.errno) == name else 1
    print("connected")
    return 1


def refused(path):
    s = P.raw_connect(path, 10)
    print("connected", flush=True)
    try:
        s.sendall(P.frame(P.hello("proto_client.py refused")))
        data = s.recv(4096)
    except (ConnectionResetError, BrokenPipeError):
        data = b""
    print("reply bytes:", len(data))
    return 0 if data == b"" else 1


def hold(path, ready, seconds=60):
    c = P.client(path, "proto_client.py hold")
    open(ready, "w").close()
    time.sleep(float(seconds))      # holding the connection is the point
    c.close()
    return 0


VERBS = {"stale-socket": stale_socket, "connect-fails": connect_fails, "refused": refused,
         "hold": hold}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VERBS:
        sys.exit(__doc__)
    sys.exit(VERBS[sys.argv[1]](*sys.argv[2:]))
