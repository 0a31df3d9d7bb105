#!/usr/bin/python3
"""notify_listener.py SOCKET LOG: receives sd_notify(3) messages as systemd does.

Binds an AF_UNIX datagram socket at SOCKET with SO_PASSCRED (the way
systemd's notification socket learns the sender's pid for NotifyAccess=),
writes "listening" to LOG once it can receive, then one line per datagram:
    pid=PID<TAB>FIELD | FIELD | ...
(the newline-separated fields of the message).  Runs until it is killed.
"""
import socket
import struct
import sys

def main():
    path, log = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    s.bind(path)
    ucred = struct.calcsize("iII")
    with open(log, "a", encoding="utf-8") as out:
        out.write("listening\n")
        out.flush()
        while True:
            data, anc, _flags, _addr = s.recvmsg(65536, socket.CMSG_SPACE(ucred))
            pid = "?"
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = str(struct.unpack("iII", blob[:ucred])[0])
            text = data.decode("utf-8", "replace").strip("\n").replace("\n", " | ")
            out.write("pid=%s\t%s\n" % (pid, text))
            out.flush()

if __name__ == "__main__":
    main()
