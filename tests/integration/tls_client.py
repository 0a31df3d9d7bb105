#!/usr/bin/python3
"""TLS client for the p11agent provider tests: python's ssl (OpenSSL), with
the client key given as a file (a p11agent key reference or a software key).

  tls_client.py get URL CA CERT KEY [--tls 1.2|1.3]
      one GET through urllib; prints the server's answer.
  tls_client.py threads N CA CERT KEY URL [URL...]
      one SSLContext (one loaded key), N threads that start their handshakes
      together, thread I against URL number I modulo the count (give N
      servers for N handshakes at once: s_server serves one at a time);
      prints "thread I ok" per success and the answers.
  tls_client.py fork URL CA CERT KEY
      GET in the parent (the provider connects to the agent), fork(), GET
      in the child, then GET in the parent again; prints "parent 1 ok",
      "child ok", "parent 2 ok".
  tls_client.py twice URL CA CERT KEY FLAGFILE
      GET, print "first ok", wait until FLAGFILE exists (the test restarts
      the agent meanwhile), GET again, print "second ok".

Every answer is printed after a line "--- answer"; the exit status is 0 only
when every request succeeded.
"""
import os
import ssl
import sys
import threading
import time
import urllib.request


def context(ca, cert, key, tls=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    if tls is not None:
        v = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[tls]
        ctx.minimum_version = v
        ctx.maximum_version = v
    return ctx


def get(ctx, url):
    with urllib.request.urlopen(url, context=ctx, timeout=30) as r:
        return r.read().decode("latin-1")


def answer(tag, body):
    sys.stdout.write("--- answer %s\n%s\n" % (tag, body))
    sys.stdout.flush()


def cmd_get(args):
    url, ca, cert, key = args[:4]
    tls = None
    if len(args) > 5 and args[4] == "--tls":
        tls = args[5]
    answer("get", get(context(ca, cert, key, tls), url))
    return 0


def cmd_threads(args):
    n = int(args[0])
    ca, cert, key = args[1:4]
    urls = args[4:]
    ctx = context(ca, cert, key)
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        try:
            barrier.wait(timeout=30)
            results[i] = get(ctx, urls[i % len(urls)])
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad = 0
    for i, r in enumerate(results):
        if isinstance(r, str):
            print("thread %d ok" % i)
            answer("thread %d" % i, r)
        else:
            bad += 1
            print("thread %d failed: %r" % (i, r))
    return 1 if bad else 0


def cmd_fork(args):
    url, ca, cert, key = args[:4]
    ctx = context(ca, cert, key)
    answer("parent 1", get(ctx, url))
    print("parent 1 ok")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            answer("child", get(ctx, url))
            print("child ok")
            status = 0
        except Exception as e:
            print("child failed: %r" % (e,))
        sys.stdout.flush()
        os._exit(status)
    _, st = os.waitpid(pid, 0)
    child_ok = os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0
    answer("parent 2", get(ctx, url))
    print("parent 2 ok")
    return 0 if child_ok else 1


def cmd_twice(args):
    url, ca, cert, key, flag = args[:5]
    ctx = context(ca, cert, key)
    answer("first", get(ctx, url))
    print("first ok")
    sys.stdout.flush()
    deadline = time.monotonic() + 60
    while not os.path.exists(flag):
        if time.monotonic() > deadline:
            print("no go-ahead within 60 s")
            return 1
        time.sleep(0.05)
    answer("second", get(ctx, url))
    print("second ok")
    return 0


def main():
    cmds = {"get": cmd_get, "threads": cmd_threads, "fork": cmd_fork, "twice": cmd_twice}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.stderr.write(__doc__)
        return 2
    try:
        return cmds[sys.argv[1]](sys.argv[2:])
    except Exception as e:
        print("failed: %r" % (e,))
        return 1


if __name__ == "__main__":
    sys.exit(main())
