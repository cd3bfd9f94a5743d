#!/usr/bin/env bash
# Submit memtrain work with `ray job submit` to a local `ray start --head` cluster: the same commands as on a real
# cluster, with the cluster on this machine. Starts the head, submits a short pretraining job, waits for it,
# checks its summary.json, and stops the cluster.
#
#   bash cluster/submit_local_job.sh [extra pretrain args...]
#
# Note: `ray stop` at the end stops every Ray process on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
OUTPUT=${OUTPUT:-$(mktemp -d /tmp/memtrain-job-XXXX)/run}
# Ray >= 2.59 turns token authentication on for clusters started with `ray start`; the job client must use it too.
# The token is created in ~/.ray/auth_token; on a remote cluster, get it with `ray get-auth-token` on the head.
export RAY_AUTH_MODE=token

ray start --head --num-cpus 4 --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --disable-usage-stats >/dev/null
trap 'ray stop >/dev/null 2>&1 || true' EXIT

export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
JOB_ID="memtrain-pretrain-$(date +%s)"
# the head's job agent needs a few seconds after `ray start` before it accepts jobs
for attempt in $(seq 1 20); do
  if ray job submit --no-wait --submission-id "$JOB_ID" --working-dir . -- \
      python -m orchestration.cli pretrain --model tgsmn-dense-tiny --data builtin --workers 2 --max-steps 20 \
      --output "$OUTPUT" eval_every=10 checkpoint_every=10 model_overrides.n_layers=2 "$@" >/dev/null 2>&1; then
    break
  fi
  [ "$attempt" = 20 ] && { echo "the job server did not accept the job" >&2; exit 1; }
  sleep 3
done
echo "submitted $JOB_ID"
ray job logs --follow "$JOB_ID"
status=$(ray job status "$JOB_ID" 2>&1)
[[ "${status,,}" == *succeeded* ]] || { echo "job $JOB_ID did not succeed: $status" >&2; exit 1; }

python - "$OUTPUT/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
assert summary["step"] == 20 and summary["final_eval_loss"] < summary["first_eval_loss"], summary
print(f"job ok: step {summary['step']}, eval loss {summary['first_eval_loss']:.3f} -> {summary['final_eval_loss']:.3f}, "
      f"checkpoint {summary['checkpoint']}")
PY
