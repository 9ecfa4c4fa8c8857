#!/bin/bash
# Opt-in check of examples/slurm/train.sbatch under a real SLURM (not part of `make test`; `make check-slurm`).
#
#   sudo examples/slurm/check_under_slurm.sh      # as root, from the repository root, on Debian/Ubuntu
#
# It installs Debian's SLURM and munge when missing (apt-get), starts munged, slurmctld and slurmd for this one
# machine (its own slurm.conf under WORK_DIR), and submits the example's CPU variant: 1 node, 2 gloo processes,
# --time=00:02:00, --signal=B:USR1@60, so that every job is told to stop about a minute in, saves a checkpoint
# and is requeued. When the run is done it trains the same steps without interruption (plain torchrun) and
# compares the logged losses step by step. Exit 0 when they agree within TOLERANCE and the job was requeued at
# least MIN_REQUEUES times; 1 otherwise. About 10 minutes on 2 cores. The daemons it started are stopped at the
# end; the packages stay installed.
set -euo pipefail

EVO2_PYTHON=${EVO2_PYTHON:-.venv/bin/python}
WORK_DIR=${WORK_DIR:-/tmp/evo2-slurm-check}
EXTRA_STEPS=${EXTRA_STEPS:-20}
TOLERANCE=${TOLERANCE:-1e-6}
MIN_REQUEUES=${MIN_REQUEUES:-2}
DEADLINE_S=${DEADLINE_S:-900}

say() { echo "$(date -u +%FT%TZ) check: $*"; }
fail() {
    say "FAILED: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs and starts SLURM)"
[ -f examples/slurm/train.sbatch ] || fail "run from the repository root"
[ -x "$EVO2_PYTHON" ] || fail "$EVO2_PYTHON: no Python with evo2-cli (make install, or set EVO2_PYTHON)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    say "installing SLURM and munge"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge
fi

rm -rf "$WORK_DIR"
mkdir -p "$WORK_DIR"/{state,spool}
WORK_DIR=$(cd "$WORK_DIR" && pwd)
host=$(hostname -s)
export SLURM_CONF=$WORK_DIR/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=evo2check
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK_DIR/state
SlurmdSpoolDir=$WORK_DIR/spool
SlurmctldPidFile=$WORK_DIR/slurmctld.pid
SlurmdPidFile=$WORK_DIR/slurmd.pid
SlurmctldLogFile=$WORK_DIR/slurmctld.log
SlurmdLogFile=$WORK_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job waits cred_expire seconds (120 by default) before it may start; schedule every 5 s, not 60.
AuthInfo=cred_expire=30
SchedulerParameters=sched_interval=5
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

stop_daemons() {
    if [ -n "${job_id:-}" ] && squeue -h -t PD,R,CG,RQ,S -j "$job_id" 2>/dev/null | grep -q .; then
        scancel "$job_id" # a failed check: end the job before the daemons that watch it
        for _ in $(seq 30); do
            squeue -h -t PD,R,CG,RQ,S -j "$job_id" 2>/dev/null | grep -q . || break
            sleep 1
        done
    fi
    local pids=()
    for pid_file in "$WORK_DIR/slurmd.pid" "$WORK_DIR/slurmctld.pid" "${munged_pid_file:-}"; do
        [ -f "$pid_file" ] && pids+=("$(cat "$pid_file")")
    done
    [ ${#pids[@]} = 0 ] && return
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 30); do # gone before a next check binds their ports
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" = 0 ] && break
        sleep 0.5
    done
    return 0
}
trap stop_daemons EXIT

if ! munge -n >/dev/null 2>&1; then
    say "starting munged"
    mkdir -p /run/munge && chown munge:munge /run/munge
    munged_pid_file=/run/munge/munged.pid
    runuser -u munge -- munged
    munge -n >/dev/null || fail "munged does not answer"
fi
say "starting slurmctld and slurmd (config $SLURM_CONF, logs in $WORK_DIR)"
slurmctld
slurmd
for _ in $(seq 60); do
    sinfo -h -o %T 2>/dev/null | grep -q idle && break
    sleep 1
done
sinfo -h -o %T | grep -q idle || fail "the node did not come up; see $WORK_DIR/slurm*.log"

say "dataset: evo2 preprocess of the shipped samples"
"$EVO2_PYTHON" -m evo2_cli preprocess -c configs/preprocess/samples.yaml \
    --set preprocess.output_dir="$WORK_DIR/dataset" --overwrite >"$WORK_DIR/preprocess.log" 2>&1 \
    || fail "preprocess failed; see $WORK_DIR/preprocess.log"

# A small model on short windows. The lr is constant after warmup (min_lr = lr), so that train.max_steps,
# which may change on resume, changes nothing else: the run starts with an unreachable max_steps, and once the
# job has been stopped and requeued MIN_REQUEUES times this script sets it to the last stop's step plus
# EXTRA_STEPS in the config file the requeued job reads. So the cycles do not depend on the machine's speed.
config=$WORK_DIR/check.yaml
write_config() { # max_steps run_dir
    cat >"$config" <<EOF
model: {preset: small}
data:
  datasets: [{path: $WORK_DIR/dataset}]
  seq_len: 256
  val_windows: 16
optim: {lr: 3.0e-3, min_lr: 3.0e-3, warmup_steps: 10, global_batch: 4}
train: {run_dir: $2, max_steps: $1, micro_batch: 2, log_interval: 1, eval_interval: 0, save_interval: 0}
EOF
}
write_config 1000000 "$WORK_DIR/slurm-run"

job_log=$WORK_DIR/job.out
say "submitting the CPU variant of examples/slurm/train.sbatch"
job_id=$(sbatch --parsable --nodes=1 --gpus-per-node=0 --cpus-per-task="$(nproc)" \
    --time=00:02:00 --signal=B:USR1@60 --output="$job_log" \
    --export=ALL,GPUS_PER_NODE=2,EVO2_PYTHON="$EVO2_PYTHON",OMP_NUM_THREADS=1 \
    examples/slurm/train.sbatch -c "$config" --device cpu)
say "job $job_id; its log: $job_log"

started=$(date +%s)
stops_seen=0
while true; do
    stops=$(grep -o "stopping at step [0-9]*" "$job_log" 2>/dev/null || true)
    if [ -n "$stops" ] && [ "$(wc -l <<<"$stops")" -gt "$stops_seen" ]; then
        stops_seen=$(wc -l <<<"$stops")
        last_stop=$(tail -n 1 <<<"$stops" | grep -o "[0-9]*$")
        say "planned stop $stops_seen at step $last_stop"
        if ((stops_seen >= MIN_REQUEUES)); then
            max_steps=$((last_stop + EXTRA_STEPS))
            write_config "$max_steps" "$WORK_DIR/slurm-run"
        fi
    fi
    state=$(scontrol show job "$job_id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
    case "$state" in
        COMPLETED) break ;;
        FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED | "")
            cat "$job_log" 2>/dev/null || true
            fail "job $job_id ended ${state:-out of sight}"
            ;;
    esac
    if (($(date +%s) - started > DEADLINE_S)); then
        scancel "$job_id" || true
        fail "job $job_id still $state after ${DEADLINE_S}s"
    fi
    sleep 1
done
requeues=$(grep -c "planned stop" "$job_log" || true)
((requeues >= MIN_REQUEUES)) || fail "only $requeues requeue(s), fewer than $MIN_REQUEUES"
say "job $job_id completed at step $max_steps after $requeues planned stop(s) and requeue(s)"

say "the same $max_steps steps without interruption (torchrun, 2 processes)"
write_config "$max_steps" "$WORK_DIR/plain-run"
OMP_NUM_THREADS=1 "$EVO2_PYTHON" -m torch.distributed.run --nproc-per-node=2 -m evo2_cli train \
    -c "$config" --device cpu >"$WORK_DIR/plain.log" 2>&1 \
    || fail "the uninterrupted run failed; see $WORK_DIR/plain.log"

"$EVO2_PYTHON" - "$WORK_DIR/slurm-run/metrics.jsonl" "$WORK_DIR/plain-run/metrics.jsonl" "$TOLERANCE" <<'EOF'
import json
import sys


def losses(path):
    # A step logged twice (a job killed after logging it, before its checkpoint) counts once: the last.
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if r.get("kind") == "train"}


requeued, plain, tolerance = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
if requeued.keys() != plain.keys():
    sys.exit(f"check: FAILED: logged steps differ: {sorted(requeued)} against {sorted(plain)}")
worst = max(abs(requeued[step] - plain[step]) for step in plain)
print(f"check: {len(plain)} logged steps, largest loss difference {worst:.2e} (tolerance {tolerance:g})")
if not worst <= tolerance:
    sys.exit("check: FAILED: the requeued run's losses differ from the uninterrupted run's")
EOF
say "OK: $requeues USR1 -> checkpoint -> requeue -> resume cycles; losses equal the uninterrupted run's"
exit 0
