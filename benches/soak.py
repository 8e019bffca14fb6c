#!/usr/bin/env python3
"""Soak: two tokengate replicas sharing Redis under steady load while the IdP, Redis, the
upstream and a replica fail on a schedule. Run by benches/soak.sh, which builds tokengate and
installs redis-server.

The IdP revokes every earlier token when it issues one (as django-oauth-toolkit does) and the
upstream accepts only the latest, so a replica that keeps sending an old token is seen at once.
Clients send GETs and small chunked POSTs (which must be replayed after a 401 like any small
body). Prints, per phase, what the clients got; it never fails on a number.
"""

import http.client
import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

BIN, WORK, DURATION_SCALE = sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
LIFETIME = 20
lock = threading.Lock()
state = {"latest": 0, "idp": "up", "upstream": "up"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, delayed ACKs add 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class Idp(Handler):
    def do_POST(self):
        self.read_body()
        mode = state["idp"]
        if mode == "hang":
            time.sleep(30)
        if mode != "up":
            return self.reply(503, {"error": "temporarily_unavailable"})
        with lock:
            state["latest"] += 1
            n = state["latest"]
        self.reply(200, {"access_token": f"tok-{n}", "token_type": "Bearer", "expires_in": LIFETIME})


class Upstream(Handler):
    def handle_any(self):
        self.read_body()
        if state["upstream"] != "up":
            self.close_connection = True
            return
        with lock:
            ok = self.headers.get("Authorization") == f"Bearer tok-{state['latest']}"
        self.reply(200 if ok else 401, {"ok": ok})

    do_GET = do_POST = handle_any


def serve(handler):
    port = free_port()
    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


procs = []


def start(args, log):
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))
    procs.append(p)
    return p


def wait_port(port, limit=10):
    end = time.time() + limit
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def main():
    _, idp_port = serve(Idp)
    upstream, up_port = serve(Upstream)
    redis_port = free_port()
    redis_args = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = start(redis_args, f"{WORK}/redis.log")
    wait_port(redis_port)
    replicas = []
    for name in "ab":
        proxy, admin = free_port(), free_port()
        path = f"{WORK}/{name}.yaml"
        with open(path, "w") as f:
            f.write(f"""listen: 127.0.0.1:{proxy}
admin:
  listen: 127.0.0.1:{admin}
access_log: off
shared_cache:
  redis: redis://127.0.0.1:{redis_port}
  key: AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=
providers:
  idp:
    type: oauth2
    token_url: http://127.0.0.1:{idp_port}/token
    client_id: soak
    client_secret: soak
routes:
  - prefix: /
    upstream: http://127.0.0.1:{up_port}
    provider: idp
""")
        os.chmod(path, 0o600)
        args = [BIN, "run", "-c", path, "--workers", "1"]
        replicas.append({"name": name, "args": args, "proxy": proxy, "admin": admin,
                         "p": start(args, f"{WORK}/{name}.log")})
        wait_port(proxy)
        time.sleep(1)

    results = []  # (time, phase, status or error, seconds)
    phase = ["steady"]
    stop = threading.Event()
    t0 = time.time()

    def client(i):
        replica = replicas[i % 2]
        conn = None
        n = 0
        while not stop.is_set():
            n += 1
            started = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", replica["proxy"], timeout=10)
                if n % 4 == 0:
                    conn.putrequest("POST", f"/orders/{i}")
                    conn.putheader("Transfer-Encoding", "chunked")
                    conn.endheaders()
                    conn.send(b"9\r\n{\"qty\":3}\r\n0\r\n\r\n")
                else:
                    conn.request("GET", f"/items/{i}?n={n}")
                resp = conn.getresponse()
                resp.read()
                outcome = resp.status
            except Exception as e:
                outcome = type(e).__name__
                conn = None
            results.append((started - t0, phase[0], outcome, time.time() - started))
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()

    def at(seconds):
        time.sleep(max(0.0, t0 + seconds * DURATION_SCALE - time.time()))

    def restart(r):
        r["p"] = start(r["args"], f"{WORK}/{r['name']}.log")

    schedule = [
        (15, "idp_down", lambda: state.update(idp="down")),
        (35, "idp_back", lambda: state.update(idp="up")),
        (45, "redis_down", lambda: (redis.kill(), redis.wait())),
        (60, "redis_back", lambda: start(redis_args, f"{WORK}/redis.log")),
        (70, "upstream_down", lambda: state.update(upstream="down")),
        (76, "upstream_back", lambda: state.update(upstream="up")),
        (85, "replica_a_killed", lambda: (replicas[0]["p"].kill(), replicas[0]["p"].wait())),
        (88, "replica_a_back", lambda: restart(replicas[0])),
        (100, "idp_hangs", lambda: state.update(idp="hang")),
        (112, "idp_back_2", lambda: state.update(idp="up")),
        (130, "end", lambda: None),
    ]
    for seconds, name, action in schedule:
        at(seconds)
        action()
        phase[0] = name
    stop.set()
    for t in threads:
        t.join(15)

    print(f"{'phase':<18}{'requests':>9}{'200':>7}{'401':>6}{'502':>6}{'503':>6}{'other':>7}{'p50 ms':>8}{'p99 ms':>8}")
    for _, name, _ in [(0, "steady", None)] + schedule[:-1]:
        rows = [r for r in results if r[1] == name]
        if not rows:
            continue
        count = lambda s: sum(1 for r in rows if r[2] == s)
        lat = sorted(r[3] for r in rows)
        other = len(rows) - sum(count(s) for s in (200, 401, 502, 503))
        print(f"{name:<18}{len(rows):>9}{count(200):>7}{count(401):>6}{count(502):>6}{count(503):>6}{other:>7}"
              f"{lat[len(lat) // 2] * 1000:>8.1f}{lat[int(len(lat) * 0.99)] * 1000:>8.1f}")
    total = len(results)
    print(f"\n{total} requests; client 401s: {sum(1 for r in results if r[2] == 401)}; "
          f"IdP tokens issued: {state['latest']}")
    others = {}
    for r in results:
        if r[2] not in (200, 401, 502, 503):
            key = (r[1], r[2])
            others[key] = others.get(key, 0) + 1
    for (name, outcome), n in sorted(others.items(), key=lambda kv: str(kv[0])):
        print(f"  other in {name}: {outcome} x{n}")
    # How long after each recovery until the clients of the surviving replicas all got 200 again.
    for _, name, _ in schedule:
        if name.endswith("back") or name.endswith("back_2"):
            start_t = next(s for s, n, _ in schedule if n == name) * DURATION_SCALE
            bad = [r[0] for r in results if r[1] == name and r[2] != 200]
            print(f"  {name}: last failure {max(bad) - start_t:.1f} s after the recovery" if bad else f"  {name}: no failure after the recovery")


try:
    main()
finally:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
