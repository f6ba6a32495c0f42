#!/usr/bin/env bash
# End-to-end check of the monitoring path: `optiserve serve` -> a real Prometheus scraping /metrics -> PromQL.
#
#   deploy/check_prometheus.sh [--speculative] [-- EXTRA_SERVE_ARGS...]
#
# Installs Debian's `prometheus` package if it is missing (needs root), starts optiserve and a private
# Prometheus (own config, 1 s scrapes, temp storage; not the system service) on free loopback ports, sends
# chat completions, and checks through Prometheus's HTTP API that
#   1. sum(rate(optiserve:request_success_total[30s])) > 0, and
#   2. every query of deploy/grafana/optiserve.json evaluates, and returns series (except the speculative
#      decoding ones, which are empty while speculation is off).
# --speculative (off by default) serves with `--speculative auto` (the shipped draft head), then also requires
# the speculative-decoding queries to return series and checks the acceptance rate. Args after `--` go to
# `optiserve serve`.
# Prints PASS or FAIL; exits non-zero on failure. Env: OPTISERVE (the command, default `optiserve`),
# DASHBOARD (default: deploy/grafana/optiserve.json).
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DASHBOARD="${DASHBOARD:-$DEPLOY_DIR/grafana/optiserve.json}"
OPTISERVE="${OPTISERVE:-optiserve}"
SPECULATIVE=0
SERVE_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --speculative) SPECULATIVE=1; shift ;;
    --) shift; SERVE_ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
# Always the full chain: the adaptive policy decides on wall-clock timings, so on a busy machine it may draft
# nothing in six chats and the acceptance check would test the load, not the metrics.
[[ $SPECULATIVE == 1 ]] && SERVE_ARGS=(--speculative auto --no-speculative-adaptive "${SERVE_ARGS[@]}")

T0=$SECONDS
log() { echo "[check_prometheus +$((SECONDS - T0))s] $*"; }
fail() { echo "FAIL: $*"; exit 1; }

# --- Prometheus binary -----------------------------------------------------------------------------------
if ! command -v prometheus >/dev/null; then
  [[ $(id -u) == 0 ]] || fail "prometheus is not installed and installing it needs root"
  log "installing Debian's prometheus package"
  t=$SECONDS
  # The package's postinst would start the system service (listening on all interfaces); a temporary
  # policy-rc.d forbids that. --no-install-recommends skips node-exporter & co, which would do the same.
  policy_added=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_added=1
  fi
  set +e
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus) \
    > /tmp/check_prometheus-apt.log 2>&1
  rc=$?
  set -e
  [[ $policy_added == 1 ]] && rm -f /usr/sbin/policy-rc.d
  [[ $rc == 0 ]] || { tail -20 /tmp/check_prometheus-apt.log; fail "apt-get install prometheus failed (rc $rc)"; }
  log "installed $(prometheus --version 2>&1 | head -1) in $((SECONDS - t))s"
fi
command -v curl >/dev/null || fail "curl is required"

# --- Processes, cleaned up on any exit -------------------------------------------------------------------
WORK="$(mktemp -d -t check_prometheus.XXXXXX)"
SERVER_PID="" PROM_PID=""
cleanup() {
  local rc=$?
  for pid in $SERVER_PID $PROM_PID; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $SERVER_PID $PROM_PID; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc != 0 ]]; then
    for f in "$WORK"/server.log "$WORK"/prometheus.log; do
      [[ -s $f ]] && { echo "--- last lines of $(basename "$f")"; tail -15 "$f"; }
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SERVER_PORT=$(free_port)
PROM_PORT=$(free_port)
SERVER="http://127.0.0.1:$SERVER_PORT"
PROM="http://127.0.0.1:$PROM_PORT"
AUTH=()
[[ -n ${OPTISERVE_API_KEY:-} ]] && AUTH=(-H "Authorization: Bearer $OPTISERVE_API_KEY")  # the server reads it too

wait_for() {  # wait_for URL SECONDS PID NAME
  local deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$1"; do
    kill -0 "$3" 2>/dev/null || fail "$4 exited during start-up"
    ((SECONDS < deadline)) || fail "$4 not up after $2 s"
    sleep 0.5
  done
}

log "starting optiserve on $SERVER ${SERVE_ARGS[*]}"
"$OPTISERVE" serve --model default --host 127.0.0.1 --port "$SERVER_PORT" --log-level warning \
  "${SERVE_ARGS[@]}" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_for "$SERVER/health" 300 "$SERVER_PID" "optiserve"  # a first start converts the model (~35 s)
log "optiserve is healthy"

cat > "$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: optiserve
    static_configs:
      - targets: ["127.0.0.1:$SERVER_PORT"]
EOF
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn > "$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
wait_for "$PROM/-/ready" 60 "$PROM_PID" "prometheus"
log "prometheus is ready on $PROM"

# query EXPR -> prints "<number of series> <value of the first one>", or "error <message>"
query() {
  curl -s -G "$PROM/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
if r["status"] != "success":
    print("error", r.get("error")); sys.exit()
res = r["data"]["result"]
print(len(res), res[0]["value"][1] if res and r["data"]["resultType"] == "vector" else "none")'
}

deadline=$((SECONDS + 30))
until [[ $(query 'up{job="optiserve"}') == "1 1" ]]; do
  ((SECONDS < deadline)) || fail "prometheus does not scrape optiserve: $(query 'up{job="optiserve"}')"
  sleep 0.5
done
log "optiserve target is up"

# --- Traffic ---------------------------------------------------------------------------------------------
# Spread over several scrapes: a labelled counter's series appears with the value it has at its first
# scrape, and rate() only counts increases after that, so a single burst between two scrapes reads as 0.
# Greedy, on prompts the answer repeats: sampled at temperature 1 ("Name a fruit"), the shipped draft head's
# drafts were all rejected in one CI run (acceptance 0/N; greedy, 0 every run), so the acceptance check below was
# a coin toss; greedy, this traffic gets drafts accepted every run (the rate over the window varies with timing).
chat() {
  curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$SERVER/v1/chat/completions" \
    -H 'content-type: application/json' \
    -d "{\"model\": \"SmolLM2-135M-Instruct\", \"max_tokens\": 16, \"temperature\": 0, \"messages\": [{\"role\": \"user\", \"content\": \"$1\"}]}"
}
ok=0
for i in 1 2 3 4 5 6; do
  code=$(chat "Repeat these words: red green blue, red green blue ($i).") && [[ $code == 200 ]] && ok=$((ok + 1))
  sleep 1
done
((ok > 0)) || fail "no chat completion succeeded"
# Two bad requests, a scrape apart, so that the errors panel has a series with an increase.
for i in 1 2; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$SERVER/v1/chat/completions" \
    -H 'content-type: application/json' -d '{"model": "SmolLM2-135M-Instruct", "messages": [], "max_tokens": -1}')
  [[ $code == 4* ]] || fail "an invalid request was answered $code, expected 4xx"
  sleep 1.5
done
log "sent 6 chat completions ($ok answered 200) and 2 invalid requests"

# --- Checks ----------------------------------------------------------------------------------------------
RATE_EXPR='sum(rate(optiserve:request_success_total[30s]))'
deadline=$((SECONDS + 20))
while true; do
  read -r n rate <<< "$(query "$RATE_EXPR")"
  [[ $n == 1 ]] && python3 -c "import sys; sys.exit(not float('$rate') > 0)" && break
  ((SECONDS < deadline)) || fail "$RATE_EXPR = '$n $rate', expected a value > 0"
  sleep 1
done
log "$RATE_EXPR = $rate"

# Every dashboard query, with Grafana's variables replaced by what the dashboard would send.
python3 - "$DASHBOARD" "$PROM" "$SPECULATIVE" <<'EOF' || fail "dashboard queries (see above)"
import json, sys, urllib.parse, urllib.request

dashboard, prom, spec_on = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
exprs = []
for panel in json.load(open(dashboard))["panels"]:
    exprs += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
bad = 0
for title, expr in exprs:
    q = expr.replace("$__rate_interval", "30s").replace("$model_name", ".*").replace("$instance", ".*")
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        r = json.load(urllib.request.urlopen(url, timeout=10))
    except Exception as e:  # a PromQL syntax error answers 400 with a JSON body
        r = json.load(e) if hasattr(e, "read") else {"status": "error", "error": str(e)}
    speculative = "spec_decode" in expr
    if r["status"] != "success":
        print(f"  dashboard query fails: {title}: {q}: {r.get('error')}"); bad += 1
    elif not r["data"]["result"] and (spec_on or not speculative):
        print(f"  dashboard query returns no series: {title}: {q}"); bad += 1
print(f"  {len(exprs) - bad}/{len(exprs)} dashboard queries evaluate"
      "" if spec_on else " (speculative-decoding ones may be empty)")
sys.exit(bad > 0)
EOF
log "dashboard queries evaluate"

# --- promtool lints the exposition; only its complaint about ':' in names is expected (vLLM's names have it) ---
lint=$(curl -sf "$SERVER/metrics" | promtool check metrics 2>&1 | grep -v "should not contain ':'" || true)
[[ -z $lint ]] || fail "promtool check metrics: $lint"
log "promtool check metrics: clean apart from ':' in names"

# --- Optional: speculative decoding (only with --speculative) --------------------------------------------
if [[ $SPECULATIVE == 1 ]]; then
  SPEC_EXPR='sum(rate(optiserve:spec_decode_num_accepted_tokens_total[30s]))
    / sum(rate(optiserve:spec_decode_num_draft_tokens_total[30s]))'
  read -r n value <<< "$(query "$SPEC_EXPR")"
  # NaN (0/0: no drafts proposed) fails the range check too.
  [[ $n == 1 ]] && python3 -c "import sys; v = float('$value'); sys.exit(not 0 < v <= 1)" \
    || fail "speculative acceptance rate = '$n $value', expected a value in (0, 1] (were drafts proposed?)"
  log "speculative acceptance rate = $value"
fi

echo "PASS: Prometheus scraped optiserve; $RATE_EXPR = $rate ($((SECONDS - T0)) s in all)"
