#!/usr/bin/env bash
# `make run`: the mock model server, the gateway on an embedded Redis with the example
# policy, and a ready-to-paste curl line. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

$BIN/gateway mock-upstream --host 127.0.0.1 --port 8000 &
pids+=($!)
$BIN/gateway serve --config config/dev.yaml --bootstrap-policy config/policy.example.yaml &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fsS http://127.0.0.1:9901/readyz >/dev/null 2>&1; then break; fi
  sleep 0.1
done
if ! curl -fsS http://127.0.0.1:9901/readyz >/dev/null; then
  echo "the gateway did not become ready; see the log above" >&2
  exit 1
fi
TOKEN=$($BIN/gateway dev-token --subject dev-user --org dev-org --country US --tier partner)
CN_TOKEN=$($BIN/gateway dev-token --subject dev-user-cn --org dev-org --country CN --tier partner)
cat <<MSG

The gateway is ready: public http://127.0.0.1:8080, admin http://127.0.0.1:9901 (token: \$GATEWAY_ADMIN_TOKEN=$GATEWAY_ADMIN_TOKEN)
Try it:

curl -sS http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"model": "gpt-mock", "messages": [{"role": "user", "content": "Hello"}]}'

A caller in CN asking for the export-controlled model (451 export_restricted):

curl -sS -i http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $CN_TOKEN" -H 'Content-Type: application/json' -d '{"model": "frontier-x", "messages": [{"role": "user", "content": "Hello"}]}'

More tokens: GATEWAY_DEV_HS256_SECRET=$GATEWAY_DEV_HS256_SECRET $BIN/gateway dev-token --country IR --tier public

Ctrl-C stops the gateway, the mock model server and the embedded Redis.
MSG
wait "${pids[1]}"
