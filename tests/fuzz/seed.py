#!/usr/bin/env python3
"""Writes the hand-made seed inputs into tests/fuzz/corpus/<target>/seed-*.

Run from the repository root. The seeds are real inputs: the shipped config, the test fixtures
and tailscaled captures, and the requests and answers the endpoints see. Fuzzing adds to the
corpus; `cargo fuzz cmin` keeps it small.
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests/fuzz/corpus"
KEY_A = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
KEY_B = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def fixture(path):
    return (ROOT / path).read_bytes()


# --- config --------------------------------------------------------------------------------
write("config", "shipped", fixture("config/clawbernetes.toml"))
write("config", "users-block", b'[node]\nname = "gpu-01"\n' + fixture("tests/fixtures/config/users-block.toml"))
write("config", "wireguard-everything", f'''[node]
name = "gpu-01"
state_dir = "/var/lib/clawbernetes"
runtime_dir = "/run/clawbernetes"
[api]
socket = "/run/clawbernetes/clawnode.sock"
socket_group = "clawbernetes"
metrics_listen = "127.0.0.1:9400"
[network]
provider = "wireguard"
[network.wireguard]
interface = "claw0"
backend = "userspace"
userspace_implementation = "/usr/bin/wireguard-go"
listen_port = 51820
fwmark = 51
mesh_cidr = "10.100.0.0/16"
address = "10.100.0.5"
mtu = 1420
private_key_file = "/var/lib/clawbernetes/wireguard.key"
peers_dir = "/etc/clawbernetes/peers.d"
node_info_port = 51821
reconcile_interval = "1m30s"
keep_interface_on_stop = true
[[network.wireguard.peers]]
name = "gpu-02"
public_key = "{KEY_A}"
endpoint = "gpu-02.example.net:51820"
allowed_ips = ["10.100.0.6/32", "10.101.0.0/24"]
persistent_keepalive = 25
preshared_key_file = "/etc/clawbernetes/gpu-02.psk"
[[network.wireguard.peers]]
name = "gpu-03"
public_key = "{KEY_B}"
endpoint = "[2001:db8::3]:51820"
allowed_ips = ["10.100.0.7/32", "fd00::7/128"]
[services.gateway]
port = 443
mode = "tcp"
[services.dashboard]
port = 8080
mode = "http"
tls = false
[gpu]
enabled = true
required = false
nvml_library = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
poll_interval = "10s"
[log]
level = "debug"
''')
write("config", "tailscale-workload-identity", '''[node]
name = "gpu-01"
[network]
provider = "tailscale"
[network.tailscale]
socket = "/var/run/tailscale/tailscaled.sock"
hostname_prefix = "clawnode"
tailnet = "example.org"
tags = ["tag:clawbernetes"]
control_url = "https://headscale.example.net"
node_info_port = 51821
[network.tailscale.workload_identity]
client_id = "k123abcCNTRL?ephemeral=false&preauthorized=true"
id_token_file = "/run/secrets/tailscale-id-token"
[network.tailscale.services]
gateway = { port = 443, mode = "tcp" }
[services.molt-provider]
port = 8443
mode = "http"
tls = true
tls_cert = true
''')
write("config", "tailscale-inline-key", '''[node]
name = "gpu-01"
[network]
provider = "tailscale"
[network.tailscale]
auth_key = "tskey-client-abc?ephemeral=false&preauthorized=true&baseURL=https://api.tailscale.com"
tags = ["tag:a", "tag:b"]
[network.tailscale.workload_identity]
client_id = "k1"
audience = "api.tailscale.com/k1"
''')
write("config", "errors-many", '''[node]
name = "-Bad_Name-"
name = "dup"
[api]
metrics_listen = "not an address"
unknown = 1
[network]
provider = "carrier-pigeon"
[network.wireguard]
listen_port = 70000
mesh_cidr = "10.100.0.1/16"
address = "192.168.1.1/24"
mtu = 99999999999999999999
reconcile_interval = "forever"
[[network.wireguard.peers]]
name = ""
public_key = "not-a-key"
allowed_ips = []
[services."molt provider"]
port = 0
mode = "udp"
tls = "yes"
''')
write("config", "syntax-error", '[node\nname = "gpu-01\n[[x]]\n= 3\n\xc3\xa9\xe2\x82 = 1\n'.encode("latin-1"))
write("config", "bad-utf8", b'[node]\nname = "gpu-\xff01"\n')
write("config", "service-checks", '''[node]
name = "gpu-01"
[network.wireguard]
address = "10.100.0.5/16"
[gpu]
unhealthy_xids = [48, 63, 64, 74, 79, 94, 95, 119, 120]
xid_hold = "1h"
[services.molt-provider]
port = 8443
mode = "tcp"
requires_gpus = true
[services.molt-provider.check]
type = "tcp"
target = "127.0.0.1:8443"
interval = "5s"
timeout = "2s"
rise = 2
fall = 3
[services.web]
port = 8080
mode = "http"
check = { type = "http", path = "/healthz", expect = "200-299", scheme = "https", tls_skip_verify = true, server_name = "localhost" }
[services.quiet]
port = 9000
mode = "tcp"
check = { type = "none" }
[services.bad]
port = 9001
mode = "tcp"
check = { type = "udp", timeout = "9s", interval = "1s", rise = 0, path = "x", expect = "999" }
''')

# --- peers_file ----------------------------------------------------------------------------
write("peers_file", "two-peers", f'''[[peers]]
name = "gpu-02"
public_key = "{KEY_A}"
endpoint = "gpu-02.example.net:51820"
allowed_ips = ["10.100.0.6/32"]
persistent_keepalive = 25
preshared_key_file = "/etc/clawbernetes/gpu-02.psk"

[[peers]]
name = "gpu-03"
public_key = "{KEY_B}"
endpoint = "[2001:db8::3]:51820"
allowed_ips = ["10.100.0.7/32", "fd00::/64"]
''')
write("peers_file", "broken", '[[peers]]\nname = "broken"\npublic_key = "not-a-key"\nallowed_ips = ["198.51.100.9/32"]\n')
write("peers_file", "default-route", f'[[peers]]\nname = "hijack"\npublic_key = "{KEY_A}"\nallowed_ips = ["0.0.0.0/0", "::/0"]\nendpoint = "192.0.2.1:51820"\n')
write("peers_file", "duplicate", f'[[peers]]\nname = "a"\npublic_key = "{KEY_A}"\nallowed_ips = ["10.100.0.6/32"]\n[[peers]]\nname = "a"\npublic_key = "{KEY_A}"\nallowed_ips = ["10.100.0.6/32"]\nextra = true\n')

# --- localapi ------------------------------------------------------------------------------
for name in ["status-scrubbed-linux-1.102.2.json", "status-trimmed-1.76.6.json",
             "prefs-partial.json", "serve-config-node-tcpforward.json"]:
    write("localapi", name, fixture(f"tests/fixtures/tailscale/{name}"))
write("localapi", "combined.json", json.dumps({
    "Version": "1.102.2-t0a29cf18b-g3f044c9f6",
    "BackendState": "Running",
    "TailscaleIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
    "Self": {"HostName": "gpu-01", "DNSName": "gpu-01.tail1.ts.net.", "Online": True,
             "Tags": ["tag:clawbernetes"],
             "CapMap": {"service-host": [{"svc:molt-provider": ["100.100.1.1"]}],
                        "services/x": [{"Name": "svc:molt-provider", "Addrs": ["100.100.1.1"], "Ports": ["tcp:8443"]}]}},
    "CurrentTailnet": {"Name": "example.org", "MagicDNSSuffix": "tail1.ts.net"},
    "AdvertiseServices": ["svc:molt-provider", "svc:other"],
    "AdvertiseTags": ["tag:clawbernetes"],
    "ControlURL": "https://controlplane.tailscale.com",
    "WantRunning": True,
    "TCP": {"443": {"HTTPS": True}},
    "Services": {"svc:molt-provider": {"TCP": {"8443": {"TCPForward": "127.0.0.1:8443"}}},
                 "svc:other": {"TCP": {"80": {"HTTP": True}}}},
    "UserProfile": {"ID": 7, "LoginName": "clawnode-gpu-01.tail1.ts.net", "DisplayName": "clawnode-gpu-01"},
}, indent=1))
# One peer of each path from the mixed-paths fixture, in the fields the path rule reads.
mixed = json.loads(fixture("tests/fixtures/tailscale/status-mixed-paths.json"))
kinds, peers = set(), {}
for key, peer in mixed["Peer"].items():
    kind = (peer["Active"], bool(peer["CurAddr"]), bool(peer["PeerRelay"]), peer["Online"])
    if kind not in kinds:
        kinds.add(kind)
        peers[key[-12:]] = {f: peer[f] for f in ["HostName", "DNSName", "TailscaleIPs", "CurAddr",
                                                 "Relay", "PeerRelay", "Active", "Online"]}
write("localapi", "status-mixed-paths.json", json.dumps({
    "Version": mixed["Version"], "BackendState": "Running",
    "Self": {"HostName": "gpu-node-01", "Online": True}, "Peer": peers}, separators=(",", ":")))
write("localapi", "services-list.json", json.dumps({
    "svc:molt-provider": {"Name": "svc:molt-provider", "Addrs": ["100.100.1.1", "fd7a:115c:a1e0::100"], "Ports": ["tcp:8443"]},
    "svc:gateway": {"Name": "svc:gateway", "Addrs": None, "Ports": ["*"]},
}))
write("localapi", "whois.json", json.dumps({"Node": {"ID": 1}, "UserProfile": {"ID": 7, "LoginName": "a@example.org", "DisplayName": "a"}}))
write("localapi", "error-lower.json", '{"error":"decoding config: eof"}')
write("localapi", "error-upper.json", '{"Error":"bad hostname"}')
write("localapi", "error-text", "etag mismatch\n")
write("localapi", "version", "1.94.2-t0a29cf18b-g3f044c9f6")
write("localapi", "notify.json", '{"Version":"1.102.2","State":6,"SelfChange":{"ID":1},"ErrMessage":null,"BrowseToURL":"https://login.tailscale.com/a/x"}')

# --- ipn_bus: [chunk size][line limit / 8] then the stream ---------------------------------
stream = b'{"Version":"1.102.2","State":6}\n{"State":3}\nnot json\n{"SelfChange":{"ID":1}}\n{"BrowseToURL":"https://login.tailscale.com/a/x","State":2}\n{"Eng'
write("ipn_bus", "bus", bytes([7, 255]) + stream)
write("ipn_bus", "bus-one-byte", bytes([0, 255]) + stream)
write("ipn_bus", "bus-long-line", bytes([13, 3]) + b'{"State":6,"Pad":"' + b"p" * 40 + b'"}\n{"State":2}\n')

# --- node_info_http and api_http: raw requests ---------------------------------------------
requests = {
    "get-node": b"GET /v1/node HTTP/1.1\r\nHost: 10.100.0.9:51821\r\n\r\n",
    "get-node-close": b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "http10": b"GET /v1/node HTTP/1.0\r\n\r\n",
    "post-body": b"POST /v1/node HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"PUT /v1/node HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "pipelined": b"GET /v1/node HTTP/1.1\r\nHost: x\r\n\r\nGET /other HTTP/1.1\r\nHost: x\r\n\r\n",
    "expect": b"POST /v1/node HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    "absolute-uri": b"GET http://x/v1/node?x=1#f HTTP/1.1\r\nHost: x\r\n\r\n",
    "head": b"HEAD /v1/node HTTP/1.1\r\nHost: x\r\n\r\n",
    "upgrade": b"GET /v1/node HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "partial": b"GET /v1/no",
}
# Past the 16 KiB read buffer, so libFuzzer's length limit lets inputs reach it.
requests["huge-head"] = b"GET /v1/node HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 17000 + b"\r\n\r\n"
for name, req in requests.items():
    write("node_info_http", name, req)
write("api_http", "huge-head", b"\x01" + requests["huge-head"])
api_paths = ["/v1/status", "/v1/health/live", "/v1/health/ready", "/metrics", "/nope"]
for i, path in enumerate(api_paths):
    req = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    write("api_http", f"socket-{i}", b"\x00" + req)
    write("api_http", f"metrics-listen-{i}", b"\x01" + req)
write("api_http", "socket-post", b"\x00POST /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
write("api_http", "metrics-head", b"\x01HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

# --- discover_answer: raw responses --------------------------------------------------------
def response(body, head="HTTP/1.1 200 OK", extra=""):
    if isinstance(body, str):
        body = body.encode()
    return f"{head}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body

info = {"name": "gpu-02", "public_key": KEY_A, "address": "10.100.0.6",
        "services": [{"name": "molt-provider", "port": 8443, "protocol": "tcp"}],
        "gpus": [{"model": "NVIDIA H100 80GB HBM3", "count": 8, "memory_total_bytes": 85520809984,
                  "memory_free_bytes": 84000000000, "driver_version": "580.65.06",
                  "cuda_driver_version": "13.0", "mig": {"1g.10gb": 2}, "lost": 0}]}
write("discover_answer", "ok", response(json.dumps(info)))
body = json.dumps(info).encode()
write("discover_answer", "chunked", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
write("discover_answer", "until-eof", b"HTTP/1.1 200 OK\r\n\r\n" + body)
write("discover_answer", "not-found", response('{"error":"no such endpoint"}', "HTTP/1.1 404 Not Found"))
evil = dict(info, name="evil\u001b[2J\u001b]0;owned\u0007")
write("discover_answer", "escapes", response(json.dumps(evil, ensure_ascii=False)))
write("discover_answer", "bad-service", response(json.dumps(dict(info, services=[{"name": "molt\u009b31m", "port": 1, "protocol": "https\u202e"}]), ensure_ascii=False)))
write("discover_answer", "short-body", b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"name\":")
write("discover_answer", "not-json", response("<html>hello</html>"))
write("discover_answer", "garbage", b"SSH-2.0-OpenSSH_9.2\r\n")
