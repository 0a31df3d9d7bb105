#!/usr/bin/env python3
"""A listener at an agent's socket path, run as another uid: it records
every byte any client sends and answers nothing.

    owner_listener.py SOCKET LOG UID

Binds SOCKET as the calling user (root in the tests), makes it
connectable by anyone, then drops to UID before listen(): SO_PEERCRED of
a connected client reports the credentials the listener had at listen(),
so clients see UID as the socket's owner, as they would for a socket that
another user created.  LOG gets one line per connection when it ends:
"conn N bytes M".  Runs until killed.
"""
import os
import socket
import sys
import threading


def serve(conn, n, log, lock):
    conn.settimeout(3.0)
    total = 0
    try:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            total += len(b)
    except (socket.timeout, OSError):
        pass
    conn.close()
    with lock:
        log.write("conn %d bytes %d\n" % (n, total))
        log.flush()


def main():
    path, logpath, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = open(logpath, "a", encoding="ascii")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o666)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    s.listen(64)
    lock = threading.Lock()
    n = 0
    while True:
        conn, _ = s.accept()
        n += 1
        threading.Thread(target=serve, args=(conn, n, log, lock), daemon=True).start()


if __name__ == "__main__":
    main()
