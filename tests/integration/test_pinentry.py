#!/usr/bin/python3
"""A pinentry for tests: speaks Assuan on stdin/stdout as pinentry does.

What it answers comes from $TEST_PINENTRY_DIR/behaviour, read at each
GETPIN or CONFIRM (lines "key=value"):
  action=pin|cancel|yes|no   GETPIN: pin gives the PIN, cancel cancels;
                             CONFIRM: yes (or pin) = OK, no = "Not confirmed",
                             cancel = "Operation cancelled"
  pin=PIN                    the PIN to give
  hold=1                     wait for $TEST_PINENTRY_DIR/release before
                             answering (the test checks things meanwhile)
Each dialog appends one line to $TEST_PINENTRY_DIR/log:
  GETPIN|CONFIRM|MESSAGE <tab> desc=... <tab> error=... <tab> ttyname=... <tab> pid=...
and "open" lines to $TEST_PINENTRY_DIR/open while it waits.
"""
import os
import sys
import time
import urllib.parse

DIR = os.environ.get("TEST_PINENTRY_DIR", "")
# Real pinentry error codes: GPG_ERR_SOURCE_PINENTRY (5) << 24 | code.
ERR_CANCELED = "ERR 83886179 Operation cancelled <Pinentry>"
ERR_NOT_CONFIRMED = "ERR 83886194 Not confirmed <Pinentry>"


def send(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def behaviour():
    b = {"action": "pin", "pin": "", "hold": "0"}
    try:
        with open(os.path.join(DIR, "behaviour")) as f:
            for line in f:
                line = line.rstrip("\n")
                if "=" in line:
                    k, v = line.split("=", 1)
                    b[k] = v
    except OSError:
        pass
    return b


def escape(s):
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def log(kind, state):
    fields = [kind] + ["%s=%s" % (k, escape(state.get(k, ""))) for k in
                       ("desc", "error", "prompt", "title", "ttyname", "display")]
    fields.append("pid=%d" % os.getpid())
    with open(os.path.join(DIR, "log"), "a") as f:
        f.write("\t".join(fields) + "\n")


def hold(b):
    if b.get("hold") != "1":
        return
    with open(os.path.join(DIR, "open"), "a") as f:
        f.write("%d\n" % os.getpid())
    release = os.path.join(DIR, "release")
    deadline = time.time() + 120
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.05)


def main():
    state = {}
    send("OK Pleased to meet you")
    for raw in sys.stdin:
        line = raw.rstrip("\r\n")
        cmd, _, arg = line.partition(" ")
        cmd = cmd.upper()
        arg = urllib.parse.unquote(arg)
        if cmd == "OPTION":
            name, _, value = arg.partition("=")
            state[name.strip()] = value
            send("OK")
        elif cmd.startswith("SET"):
            state[cmd[3:].lower()] = arg
            send("OK")
        elif cmd == "GETPIN":
            b = behaviour()
            log("GETPIN", state)
            hold(b)
            if b["action"] == "cancel":
                send(ERR_CANCELED)
            else:
                if b["pin"]:
                    send("D " + escape(b["pin"]))
                send("OK")
        elif cmd == "CONFIRM":
            b = behaviour()
            log("CONFIRM", state)
            hold(b)
            if b["action"] == "no":
                send(ERR_NOT_CONFIRMED)
            elif b["action"] == "cancel":
                send(ERR_CANCELED)
            else:
                send("OK")
        elif cmd == "GETINFO":
            if arg == "pid":
                send("D %d" % os.getpid())
            send("OK")
        elif cmd == "BYE":
            send("OK closing connection")
            return
        elif cmd == "MESSAGE":
            b = behaviour()
            log("MESSAGE", state)
            hold(b)
            send("OK")
        elif cmd in ("RESET", "NOP"):
            send("OK")
        else:
            send("ERR 536871187 Unknown IPC command <User defined source 1>")


if __name__ == "__main__":
    main()
