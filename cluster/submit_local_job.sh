#!/usr/bin/env bash
# Submit memtrain's four kinds of work with `ray job submit` to a local `ray start --head` cluster: the same
# commands as on a real cluster, with the cluster on this machine. Starts a head of its own, submits a tiny
# pretraining run, sweep, continual-learning run and PPO training (one after another), waits for each, checks its
# outputs, prints a summary, and stops that head (and nothing else).
#
#   bash cluster/submit_local_job.sh                    # all four: pretrain sweep continual rl
#   bash cluster/submit_local_job.sh pretrain rl        # some of them
#
# Outputs, job logs and the cluster's temp dir go to $WORK (default: a new /tmp/memtrain-jobs-XXXX).
# The head is stopped by signalling its `ray start --block` process, never with `ray stop`, which would stop every
# Ray cluster on the machine (other people's too).
set -euo pipefail
cd "$(dirname "$0")/.."

KINDS=("$@")
[ ${#KINDS[@]} -gt 0 ] || KINDS=(pretrain sweep continual rl)
for kind in "${KINDS[@]}"; do
  case $kind in pretrain|sweep|continual|rl) ;; *) echo "unknown job kind '$kind': use pretrain, sweep, continual or rl" >&2; exit 2;; esac
done
WORK=${WORK:-$(mktemp -d /tmp/memtrain-jobs-XXXX)}
mkdir -p "$WORK"

# Free ports for this head, so that it never collides with another Ray cluster on the machine.
read -r GCS_PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT < <(python - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)

# Ray >= 2.59 turns token authentication on for clusters started with `ray start`; the job client must use it too
# (it reads ~/.ray/auth_token; on a remote cluster get the token with `ray get-auth-token` on the head).
export RAY_AUTH_MODE=token
# The job client's address. The head's processes inherit it too: Ray Train's placement-group cleaner then queries
# this head's State API even when other Ray clusters run on the machine ("Found multiple active Ray instances").
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASHBOARD_PORT"
# --block keeps `ray start` in the foreground as the owner of this head's processes; its own --temp-dir keeps the
# head out of /tmp/ray, so `ray.init(address="auto")` elsewhere on the machine does not find it.
ray start --head --block --port "$GCS_PORT" --temp-dir "$WORK/ray" --num-cpus 4 \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --ray-client-server-port "$CLIENT_PORT" \
  --dashboard-agent-listen-port "$AGENT_PORT" --disable-usage-stats >"$WORK/head.log" 2>&1 &
HEAD_PID=$!
stop_head() {  # SIGTERM to `ray start --block` stops exactly this head's processes
  kill -TERM "$HEAD_PID" 2>/dev/null && wait "$HEAD_PID" 2>/dev/null || true
}
trap stop_head EXIT

for attempt in $(seq 1 60); do  # the job server needs a few seconds after the head starts
  ray job list >/dev/null 2>&1 && break
  kill -0 "$HEAD_PID" 2>/dev/null || { echo "the Ray head did not start; see $WORK/head.log" >&2; exit 1; }
  [ "$attempt" = 60 ] && { echo "the job server at $RAY_API_SERVER_ADDRESS did not answer; see $WORK/head.log" >&2; exit 1; }
  sleep 2
done
echo "head up: dashboard and job server at $RAY_API_SERVER_ADDRESS, outputs in $WORK"

set_command() {  # CMD = the entrypoint of one kind of job, with tiny settings; outputs are absolute paths in $WORK
  case $1 in
    pretrain) CMD=(python -m orchestration.cli pretrain --model tgsmn-dense-tiny --data builtin --workers 2
      --max-steps 20 --output "$WORK/pretrain" eval_every=10 checkpoint_every=10 model_overrides.n_layers=2) ;;
    sweep) CMD=(python -m orchestration.cli sweep configs/sweeps/pretrain-lr.yaml output="$WORK/sweep"
      'search.lr={grid: [1.0e-3, 1.0e-2]}' scheduler.grace_period=10 pretrain.max_steps=20 pretrain.eval_every=10
      pretrain.checkpoint_every=10 pretrain.cpus_per_worker=0.5 pretrain.model_overrides.n_layers=2) ;;
    continual) CMD=(python -m orchestration.cli continual --model tgsmn-sparse-tiny --benchmark permuted
      --data builtin --controller fixed --tasks 2 --max-steps-per-task 10 --output "$WORK/continual"
      data.max_documents=300 data.seq_len=32 batch_size=8 eval_windows=8) ;;
    rl) CMD=(python -m orchestration.cli rl train thermo --config configs/rl/thermo.yaml --iterations 2
      --output "$WORK/rl" ppo.train_batch_size=16 ppo.minibatch_size=8 ppo.max_seq_len=4 ppo.num_epochs=1
      env_config.continual.stream.n_tasks=2 env_config.continual.max_steps_per_task=6
      env_config.continual.control_interval=3 env_config.continual.batch_size=4
      env_config.continual.data.seq_len=16 env_config.continual.data.max_documents=200) ;;
  esac
}

check_outputs() {  # one line on what the job produced; fails when its outputs are missing or wrong
  python - "$1" "$WORK" <<'PY'
import csv, json, sys
from pathlib import Path
kind, work = sys.argv[1], Path(sys.argv[2])
if kind == "pretrain":
    s = json.loads((work / "pretrain" / "summary.json").read_text())
    assert s["step"] == 20 and s["final_eval_loss"] < s["first_eval_loss"], s
    print(f"step {s['step']}, eval loss {s['first_eval_loss']:.3f} -> {s['final_eval_loss']:.3f}")
elif kind == "sweep":
    rows = list(csv.DictReader((work / "sweep" / "results.csv").open()))
    assert len(rows) == 2 and (work / "sweep" / "best_config.yaml").is_file(), rows
    print(f"{len(rows)} trials ranked, best lr {rows[0]['lr']} with eval loss {float(rows[0]['eval_loss']):.3f}")
elif kind == "continual":
    s = json.loads((work / "continual" / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps"] == 20, s
    print(f"avg final loss {s['avg_final_loss']:.3f}, forgetting {s['forgetting']:.3f} over 2 tasks")
else:
    s = json.loads((work / "rl" / "summary.json").read_text())
    assert s["iterations"] == 2 and Path(s["policy"]).is_dir(), s
    print(f"{s['iterations']} PPO iterations, final return {s['final_return']:.3f}, policy {s['policy']}")
PY
}

declare -a SUMMARY
failed=0
for kind in "${KINDS[@]}"; do
  id="memtrain-$kind-$(date +%s)"
  set_command "$kind"
  echo "submitting $id: ray job submit --submission-id $id --working-dir . -- $(python -c \
    'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${CMD[@]}")"
  started=$SECONDS result=""
  # blocking submit: follows the job's logs (saved here) and exits non-zero if the job fails
  if ray job submit --submission-id "$id" --working-dir . -- "${CMD[@]}" >"$WORK/$kind.log" 2>&1 \
      && status=$(ray job status "$id" 2>&1) && [[ "${status,,}" == *succeeded* ]] \
      && result=$(check_outputs "$kind" 2>&1); then
    SUMMARY+=("$(printf '%-10s %-9s %5ss  %s' "$kind" succeeded $((SECONDS - started)) "$result")")
  else
    failed=1
    SUMMARY+=("$(printf '%-10s %-9s %5ss  see %s' "$kind" FAILED $((SECONDS - started)) "$WORK/$kind.log")")
    tail -n 20 "$WORK/$kind.log" >&2
    [ -z "$result" ] || echo "$result" >&2  # what the output check found
  fi
  echo "${SUMMARY[-1]}"
done

echo
echo "job        status     time  result"
printf '%s\n' "${SUMMARY[@]}"
exit $failed
