#!/usr/bin/env bash
# The deployment configs in docs/deploy/ are real: HAProxy and nginx accept them, the
# Kubernetes manifests parse and say what docs/deploy.md says they say, the systemd drop-in
# verifies with the shipped units, and every config excerpt quoted in docs/deploy.md is in the
# file it names.
#   - haproxy -c -f docs/deploy/haproxy.cfg
#   - nginx -t -c <abs>/docs/deploy/nginx.conf
#   - docs/deploy/kubernetes.yaml: every document loads (python3-yaml); the Deployment's
#     container has a readinessProbe on /readyz and a livenessProbe on /livez, both on the
#     admin port that --admin-addr listens on, no preStop hook, and terminationGracePeriodSeconds
#     >= --drain-delay + --shutdown-timeout (+ 1 s); the Service selects the pods and targets a
#     declared port.
#   - docs/deploy/greenlight.service.d/*.conf: systemd-analyze verify with docs/systemd's units,
#     no warning, and TimeoutStopSec > GREENLIGHT_DRAIN_DELAY + GREENLIGHT_SHUTDOWN_TIMEOUT.
# Needs: Debian's haproxy, nginx-light, python3-yaml (installed here with apt-get if missing,
# which needs root), systemd (systemd-analyze), cargo. Writes nothing outside a temp dir. A few
# seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0; failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }

# 1. HAProxy
if haproxy -c -q -f docs/deploy/haproxy.cfg >"$work/haproxy.out" 2>&1; then
  ok "haproxy -c -f docs/deploy/haproxy.cfg ($(haproxy -v | head -1 | awk '{print $1, $3}'))"
else
  bad "haproxy -c -f docs/deploy/haproxy.cfg"; cat "$work/haproxy.out"
fi

# 2. nginx: a complete top-level config (events{}, http{}), checked in place.
if nginx -t -q -c "$root/docs/deploy/nginx.conf" >"$work/nginx.out" 2>&1; then
  ok "nginx -t -c docs/deploy/nginx.conf ($(nginx -v 2>&1 | awk '{print $3}'))"
else
  bad "nginx -t -c docs/deploy/nginx.conf"; cat "$work/nginx.out"
fi

# The durations greenlight accepts (250ms, 5s, 1m, 1h, 1m30s, 0), in seconds.
cat >"$work/duration.py" <<'PY'
import re

def seconds(text):
    text = text.strip()
    if text == "0":
        return 0.0
    parts = re.findall(r"(\d+)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * unit[u] for n, u in parts)
PY

# 3. Kubernetes
if PYTHONPATH="$work" python3 - docs/deploy/kubernetes.yaml >"$work/k8s.out" 2>&1 <<'PY'
import sys
import yaml
from duration import seconds

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
kinds = [d.get("kind") for d in docs]
problems = []
deployments = [d for d in docs if d["kind"] == "Deployment"]
services = [d for d in docs if d["kind"] == "Service"]
if len(deployments) != 1 or len(services) != 1:
    sys.exit(f"want one Deployment and one Service, got {kinds}")
dep, svc = deployments[0], services[0]
pod = dep["spec"]["template"]["spec"]
labels = dep["spec"]["template"]["metadata"]["labels"]
if dep["spec"]["selector"]["matchLabels"].items() - labels.items():
    problems.append("the Deployment's selector does not match its pod labels")
(container,) = [c for c in pod["containers"] if c["name"] == "greenlight"]

# Flags from args (--flag=value or --flag value) and GREENLIGHT_* env; args win, as in greenlight.
flags = {}
for env in container.get("env", []):
    if env["name"].startswith("GREENLIGHT_"):
        flags[env["name"][len("GREENLIGHT_"):].lower().replace("_", "-")] = env["value"]
args = container.get("args", []) + container.get("command", [])[1:]
i = 0
while i < len(args):
    if args[i].startswith("--"):
        if "=" in args[i]:
            name, value = args[i][2:].split("=", 1)
        else:
            name, value = args[i][2:], args[i + 1] if i + 1 < len(args) else ""
            i += 1
        flags[name] = value
    i += 1
drain = seconds(flags.get("drain-delay", "0s"))
timeout = seconds(flags.get("shutdown-timeout", "30s"))
grace = pod.get("terminationGracePeriodSeconds", 30)
if drain <= 0:
    problems.append("no --drain-delay: the pod would close its listener while endpoints still point at it")
if not grace >= drain + timeout + 1:
    problems.append(f"terminationGracePeriodSeconds {grace} < drain-delay {drain} + shutdown-timeout {timeout} + 1")
if "preStop" in container.get("lifecycle", {}):
    problems.append("a preStop hook: --drain-delay already does what a preStop sleep does")

ports = {p["name"]: p["containerPort"] for p in container["ports"]}
if "admin-addr" not in flags:
    problems.append("no --admin-addr: the probes have nothing to talk to")
else:
    admin_port = int(flags["admin-addr"].rsplit(":", 1)[1])
    host = flags["admin-addr"].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "[::1]", "localhost"):
        problems.append(f"--admin-addr {flags['admin-addr']} is loopback: the kubelet probes the pod's address")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        get = container.get(probe, {}).get("httpGet")
        if not get:
            problems.append(f"no {probe}.httpGet")
            continue
        port = ports.get(get["port"], get["port"])
        if get["path"] != path or port != admin_port:
            problems.append(f"{probe} is {get['path']} on port {get['port']} ({port}), want {path} on the admin port {admin_port}")
api_port = int(flags.get("port", "4000"))
if api_port not in ports.values():
    problems.append(f"--port {api_port} is not a declared containerPort")

if svc["spec"]["selector"].items() - labels.items():
    problems.append("the Service's selector does not match the pod labels")
for p in svc["spec"]["ports"]:
    target = ports.get(p["targetPort"], p["targetPort"])
    if target != api_port:
        problems.append(f"the Service's port {p['port']} targets {p['targetPort']} ({target}), not the API port {api_port}")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{', '.join(kinds)}; readiness /readyz and liveness /livez on :{admin_port}; "
      f"terminationGracePeriodSeconds {grace} >= drain-delay {drain:g}s + shutdown-timeout {timeout:g}s + 1s")
PY
then
  ok "docs/deploy/kubernetes.yaml: $(cat "$work/k8s.out")"
else
  bad "docs/deploy/kubernetes.yaml:"; sed 's/^/     /' "$work/k8s.out"
fi

# 4. The systemd drop-in, with the shipped units (ExecStart pointed at a file that exists).
if [ -x /lib/systemd/systemd ] || command -v systemd-analyze >/dev/null; then
  verify="$work/units"; mkdir -p "$verify"
  cp docs/systemd/*.socket "$verify/"
  sed "s|^ExecStart=/usr/local/bin/greenlight|ExecStart=/bin/true|" docs/systemd/greenlight.service >"$verify/greenlight.service"
  for dropin in docs/deploy/*.service.d; do
    cp -r "$dropin" "$verify/"
  done
  sockets=$(cd "$verify" && ls ./*.socket)
  # shellcheck disable=SC2086
  if (cd "$verify" && systemd-analyze verify --man=no $sockets ./greenlight.service) >"$work/verify.out" 2>&1 \
     && ! grep -q . "$work/verify.out"; then
    ok "docs/deploy/greenlight.service.d/ verifies with docs/systemd's units (systemd-analyze verify, no warnings)"
  else
    bad "systemd-analyze verify with docs/deploy/greenlight.service.d/"; cat "$work/verify.out"
  fi
  if PYTHONPATH="$work" python3 - docs/systemd/greenlight.service docs/deploy/greenlight.service.d/*.conf >"$work/stop.out" 2>&1 <<'PY'
import re, sys
from duration import seconds
settings, env = {}, {}
for path in sys.argv[1:]:   # the unit, then its drop-ins in order: later ones win
    for line in open(path):
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if not m:
            continue
        key, value = m.groups()
        if key == "Environment":
            for item in value.split():
                name, _, v = item.strip('"').partition("=")
                env[name] = v
        else:
            settings[key] = value
def systemd_seconds(v):
    return float(v) if re.fullmatch(r"\d+(\.\d+)?", v) else seconds(v.replace("min", "m").replace(" ", ""))
drain = seconds(env.get("GREENLIGHT_DRAIN_DELAY", "0s"))
timeout = seconds(env.get("GREENLIGHT_SHUTDOWN_TIMEOUT", "30s"))
stop = systemd_seconds(settings["TimeoutStopSec"])
print(f"TimeoutStopSec {stop:g}s {'>' if stop > drain + timeout else '<='} drain-delay {drain:g}s + shutdown-timeout {timeout:g}s")
sys.exit(0 if stop > drain + timeout else 1)
PY
  then
    ok "the drop-in: $(cat "$work/stop.out")"
  else
    bad "the drop-in's TimeoutStopSec does not outlast drain-delay + shutdown-timeout:"; cat "$work/stop.out"
  fi
fi

# 5. Every config excerpt in docs/deploy.md (a fenced block whose first line is a comment naming
#    a file under docs/deploy/) is made of lines of that file.
if python3 - docs/deploy.md >"$work/excerpts.out" 2>&1 <<'PY'
import re, sys
text = open(sys.argv[1]).read()
blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)
checked, problems = 0, []
for block in blocks:
    lines = block.splitlines()
    m = re.match(r"^\s*(?:#|//)\s*(docs/deploy/\S+)", lines[0]) if lines else None
    if not m:
        continue
    name = m.group(1)
    try:
        source = {l.strip() for l in open(name)}
    except OSError:
        problems.append(f"an excerpt names {name}, which does not exist")
        continue
    checked += 1
    for line in lines[1:]:
        if line.strip() and line.strip() not in ("...", "# ...", "// ...") and line.strip() not in source:
            problems.append(f"excerpt of {name}: {line.strip()!r} is not in the file")
if problems:
    print("\n".join(problems)); sys.exit(1)
if checked == 0:
    print("no excerpt found"); sys.exit(1)
print(f"{checked} excerpts")
PY
then
  ok "docs/deploy.md: $(cat "$work/excerpts.out"), each made of lines of the file it names"
else
  bad "docs/deploy.md quotes config its files do not have:"; cat "$work/excerpts.out"
fi

echo "deploy_configs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
