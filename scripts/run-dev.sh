#!/usr/bin/env bash
# `make run`: the mock model server, the gateway on an embedded Redis with the example
# policy, and a ready-to-paste curl line. Ctrl-C stops everything.
#
# Ports come from the same variables the gateway reads, so one override moves both the
# gateway and everything this script prints and polls:
#   GATEWAY_LISTEN__PORT   public listener (default 8080)
#   GATEWAY_ADMIN__PORT    admin listener  (default 9901)
#   MOCK_PORT              the mock model server (default 8000, or the port of GATEWAY_UPSTREAM__URL);
#                          the gateway is pointed at it unless GATEWAY_UPSTREAM__URL names another server
# A port already in use is an error naming the port and the variable to change: the script never
# reports "ready" because some other process answers there.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CONFIG=config/dev.yaml
LISTEN_HOST=${GATEWAY_LISTEN__HOST:-127.0.0.1}
LISTEN_PORT=${GATEWAY_LISTEN__PORT:-8080}
ADMIN_HOST=${GATEWAY_ADMIN__HOST:-127.0.0.1}
ADMIN_PORT=${GATEWAY_ADMIN__PORT:-9901}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}
# `make run` exports these; the same defaults when the script is run on its own.
export GATEWAY_ADMIN_TOKEN=${GATEWAY_ADMIN_TOKEN:-dev-admin-token}
export GATEWAY_DEV_HS256_SECRET=${GATEWAY_DEV_HS256_SECRET:-dev-only-hs256-secret-not-for-production-use}

# The mock runs where the gateway's upstream points, when that is this machine.
start_mock=1
if [[ -n "${GATEWAY_UPSTREAM__URL:-}" ]]; then
  if [[ "$GATEWAY_UPSTREAM__URL" =~ ^http://(127\.0\.0\.1|localhost):([0-9]+)/?$ ]]; then
    MOCK_PORT=${MOCK_PORT:-${BASH_REMATCH[2]}}
  else
    start_mock=0  # a model server of the caller's own
  fi
else
  MOCK_PORT=${MOCK_PORT:-8000}
  export GATEWAY_UPSTREAM__URL="http://127.0.0.1:$MOCK_PORT"
fi
export GATEWAY_LISTEN__PORT=$LISTEN_PORT GATEWAY_ADMIN__PORT=$ADMIN_PORT

# A host to connect to for a listener bound to a wildcard address.
reach() { case "$1" in 0.0.0.0 | "::" | "") echo 127.0.0.1 ;; *) echo "$1" ;; esac; }
PUBLIC_URL="http://$(reach "$LISTEN_HOST"):$LISTEN_PORT"
ADMIN_URL="http://$(reach "$ADMIN_HOST"):$ADMIN_PORT"

fail() { echo "make run: $*" >&2; exit 1; }

# Bind each port as the gateway would (SO_REUSEADDR, so a closed connection's TIME_WAIT does not
# count): a listening process refuses the bind, whatever it is.
port_free() {
  $BIN/python - "$1" "$2" <<'PY'
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sys.exit(1)
PY
}
check_port() {  # host port what variable
  port_free "$1" "$2" || fail "port $2 ($3) is already in use by another process; stop it, or choose a free port with $4=<port> (e.g. $4=$(( $2 + 10 )) make run)"
}
check_port "$LISTEN_HOST" "$LISTEN_PORT" "the gateway's public listener" GATEWAY_LISTEN__PORT
check_port "$ADMIN_HOST" "$ADMIN_PORT" "the gateway's admin listener" GATEWAY_ADMIN__PORT
[[ "$LISTEN_PORT" != "$ADMIN_PORT" ]] || fail "GATEWAY_LISTEN__PORT and GATEWAY_ADMIN__PORT are both $LISTEN_PORT"
if (( start_mock )); then
  check_port 127.0.0.1 "$MOCK_PORT" "the mock model server" MOCK_PORT
  [[ "$MOCK_PORT" != "$LISTEN_PORT" && "$MOCK_PORT" != "$ADMIN_PORT" ]] \
    || fail "MOCK_PORT $MOCK_PORT is also a gateway port"
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if (( start_mock )); then
  $BIN/gateway mock-upstream --host 127.0.0.1 --port "$MOCK_PORT" &
  pids+=($!)
fi
# The example policy names EAR Country Groups (@E:1, @A:5); config/country-groups.yaml defines them.
mkdir -p var
$BIN/python - <<'PY'
import yaml

with open("config/policy.example.yaml", encoding="utf-8") as f:
    policy = yaml.safe_load(f)
with open("config/country-groups.yaml", encoding="utf-8") as f:
    policy["lists"]["country-groups"] = yaml.safe_load(f)
with open("var/dev-policy.yaml", "w", encoding="utf-8") as f:
    yaml.safe_dump(policy, f, sort_keys=False, allow_unicode=True)
PY
$BIN/gateway serve --config "$CONFIG" --bootstrap-policy var/dev-policy.yaml &
gateway_pid=$!
pids+=("$gateway_pid")

# Ready means: this gateway process answers /healthz with its own pid, and /readyz says its policy is
# loaded. Another server answering on the port (a race lost after the check above) is not ready.
ready=0
deadline=$(( SECONDS + READY_TIMEOUT_S ))
while (( SECONDS < deadline )); do
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    wait "$gateway_pid" && status=0 || status=$?
    fail "the gateway exited with status $status before it was ready; see its log above"
  fi
  if curl -fsS "$ADMIN_URL/healthz" 2>/dev/null | grep -q "\"pid\": *$gateway_pid[,}]" \
      && curl -fsS "$ADMIN_URL/readyz" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.1
done
(( ready )) || fail "the gateway did not become ready at $ADMIN_URL/readyz within ${READY_TIMEOUT_S}s; see the log above"
if (( start_mock )); then
  curl -fsS "http://127.0.0.1:$MOCK_PORT/v1/models" >/dev/null 2>&1 \
    || fail "the mock model server does not answer on port $MOCK_PORT (MOCK_PORT); see the log above"
fi

TOKEN=$($BIN/gateway dev-token --subject dev-user --org dev-org --country US --tier partner)
CN_TOKEN=$($BIN/gateway dev-token --subject dev-user-cn --org dev-org --country CN --tier partner)
cat <<MSG

The gateway is ready: public $PUBLIC_URL, admin $ADMIN_URL (token: \$GATEWAY_ADMIN_TOKEN=$GATEWAY_ADMIN_TOKEN)
upstream: $GATEWAY_UPSTREAM__URL
Try it:

curl -sS $PUBLIC_URL/v1/chat/completions -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"model": "gpt-mock", "messages": [{"role": "user", "content": "Hello"}]}'

A caller in CN asking for the export-controlled model (451 export_restricted):

curl -sS -i $PUBLIC_URL/v1/chat/completions -H "Authorization: Bearer $CN_TOKEN" -H 'Content-Type: application/json' -d '{"model": "frontier-x", "messages": [{"role": "user", "content": "Hello"}]}'

The gateway command is $BIN/gateway (or: . $BIN/activate, then gateway ...). Operator commands:

export GATEWAY_ADMIN_URL=$ADMIN_URL GATEWAY_ADMIN_TOKEN=$GATEWAY_ADMIN_TOKEN
$BIN/gateway audit tail --follow

More tokens: GATEWAY_DEV_HS256_SECRET=$GATEWAY_DEV_HS256_SECRET $BIN/gateway dev-token --country IR --tier public

Ctrl-C stops the gateway, the mock model server and the embedded Redis.
MSG
wait "$gateway_pid"
