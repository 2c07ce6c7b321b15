#!/usr/bin/env bash
# REDbot (the HTTP linter) against a release build: every response it checks, on the API and on
# every admin endpoint, must carry no note of level WARN or BAD (caching, security headers,
# framing, Date, Content-Length ...).
# Needs: python3 with venv and PyPI (REDbot is installed into a virtual environment of its own
# under target/, reused by later runs); no root. Talks only to 127.0.0.1. Takes under a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/redbot-venv
if [ ! -x "$venv/bin/redbot" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check redbot
fi
cargo build --release --locked --quiet

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -KILL "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
admin=$(free_port)
./target/release/greenlight --host 127.0.0.1 --port "$port" --admin-addr "127.0.0.1:$admin" \
  --log-format json 2>"$work/server.log" &
server_pid=$!
timeout 10 bash -c "until grep -q 'starting server' '$work/server.log'; do sleep 0.05; done"

urls=(
  "http://127.0.0.1:$port/v1/healthcheck"
  "http://127.0.0.1:$port/v1/no-such-thing"
  "http://127.0.0.1:$admin/readyz"
  "http://127.0.0.1:$admin/livez"
  "http://127.0.0.1:$admin/metrics"
  "http://127.0.0.1:$admin/debug/vars"
  "http://127.0.0.1:$admin/no-such-thing"
)
failed=0
for url in "${urls[@]}"; do
  timeout 120 "$venv/bin/redbot" -o har "$url" >"$work/out.har"
  python3 - "$url" "$work/out.har" <<'PY' || failed=1
import json, sys
url, path = sys.argv[1], sys.argv[2]
entries = json.load(open(path))["log"]["entries"]
if not entries:
    print(f"{url}: REDbot made no request"); sys.exit(1)
notes = [n for e in entries for n in e.get("_red_messages", [])]
bad = [n for n in notes if n["level"] in ("warning", "bad", "WARN", "BAD")]
levels = sorted({n["level"] for n in notes})
status = entries[0]["response"]["status"]
print(f"{url}: {status}, {len(notes)} notes (levels {', '.join(levels)}), {len(bad)} WARN/BAD")
for n in bad:
    print(f"  {n['level']}: {n['note_id']}: {n['summary']}")
sys.exit(1 if bad else 0)
PY
done
[ "$failed" -eq 0 ] || { echo "redbot: WARN or BAD notes found" >&2; exit 1; }
echo "redbot: passed"
