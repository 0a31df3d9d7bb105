#!/usr/bin/python3
"""A small stand-in for systemd-logind on a private system bus (t_logind.sh).

Owns org.freedesktop.login1 and exports what p11agentd listens to, with
logind's own names, signatures and object paths:

  /org/freedesktop/login1             org.freedesktop.login1.Manager
      Suspend(b)        emits PrepareForSleep(true), then PrepareForSleep(false)
                        (as logind does before and after a sleep)
      LockSession(s)    emits Lock on that session's object
  /org/freedesktop/login1/session/_31 org.freedesktop.login1.Session, id "1",
                                       User = (OUR_UID, /org/freedesktop/login1/user/_OUR_UID)
  /org/freedesktop/login1/session/_32 the same, id "2", of OTHER_UID
      Lock()            emits Lock (as logind's Session.Lock does)
      SetLockedHint(b)  sets LockedHint and emits PropertiesChanged
  org.freedesktop.DBus.Properties.Get/GetAll on the sessions.

The test drives it with dbus-send, as loginctl drives logind.

usage: fake_logind.py OUR_UID OTHER_UID READY_FILE
(the bus comes from DBUS_SYSTEM_BUS_ADDRESS).
"""
import sys

import dbus
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

NAME = "org.freedesktop.login1"
MANAGER = "org.freedesktop.login1.Manager"
SESSION = "org.freedesktop.login1.Session"
PROPS = "org.freedesktop.DBus.Properties"


def escape(label):
    """logind's object path label escaping (bus_label_escape)."""
    out = ""
    for i, ch in enumerate(label):
        if ch.isalpha() and ch.isascii() or (ch.isdigit() and i > 0):
            out += ch
        else:
            out += "_%02x" % ord(ch)
    return out


class Session(dbus.service.Object):
    def __init__(self, bus, sid, uid):
        self.path = "/org/freedesktop/login1/session/" + escape(sid)
        super().__init__(bus, self.path)
        self.sid = sid
        self.uid = uid
        self.locked_hint = False

    def props(self):
        return {
            "Id": dbus.String(self.sid),
            "User": dbus.Struct((dbus.UInt32(self.uid),
                                 dbus.ObjectPath("/org/freedesktop/login1/user/_%d" % self.uid)),
                                signature="uo"),
            "LockedHint": dbus.Boolean(self.locked_hint),
        }

    @dbus.service.method(PROPS, in_signature="ss", out_signature="v")
    def Get(self, iface, prop):
        if iface != SESSION or prop not in self.props():
            raise dbus.exceptions.DBusException(
                "Unknown property", name="org.freedesktop.DBus.Error.UnknownProperty")
        return self.props()[prop]

    @dbus.service.method(PROPS, in_signature="s", out_signature="a{sv}")
    def GetAll(self, iface):
        return self.props() if iface == SESSION else {}

    @dbus.service.signal(PROPS, signature="sa{sv}as")
    def PropertiesChanged(self, iface, changed, invalidated):
        pass

    @dbus.service.signal(SESSION, signature="")
    def Lock(self):
        pass

    # logind's Session.Lock() method emits the Lock signal; dbus-python
    # cannot export a method and a signal of one name, so the test uses
    # the Manager's LockSession(s), which does the same.

    @dbus.service.method(SESSION, in_signature="b", out_signature="")
    def SetLockedHint(self, b):
        self.locked_hint = bool(b)
        self.PropertiesChanged(SESSION, {"LockedHint": dbus.Boolean(self.locked_hint)},
                               dbus.Array([], signature="s"))


class Manager(dbus.service.Object):
    def __init__(self, bus, sessions):
        super().__init__(bus, "/org/freedesktop/login1")
        self.sessions = sessions

    @dbus.service.signal(MANAGER, signature="b")
    def PrepareForSleep(self, start):
        pass

    @dbus.service.method(MANAGER, in_signature="b", out_signature="")
    def Suspend(self, interactive):
        self.PrepareForSleep(True)
        self.PrepareForSleep(False)

    @dbus.service.method(MANAGER, in_signature="s", out_signature="")
    def LockSession(self, sid):
        if sid not in self.sessions:
            raise dbus.exceptions.DBusException(
                "No session '%s' known" % sid, name="org.freedesktop.login1.NoSuchSession")
        self.sessions[sid].Lock()


def main():
    our_uid, other_uid, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SystemBus()
    sessions = {"1": Session(bus, "1", our_uid), "2": Session(bus, "2", other_uid)}
    manager = Manager(bus, sessions)
    name = dbus.service.BusName(NAME, bus, do_not_queue=True)
    loop = GLib.MainLoop()
    bus.call_on_disconnection(lambda conn: loop.quit())
    with open(ready, "w") as f:
        f.write("ready\n")
    loop.run()
    del name, manager


if __name__ == "__main__":
    main()
