#!/usr/bin/env bash
# slurm/launch.sh - the one body of every slurm/*.sbatch template. Not submitted itself:
# a template sets its defaults (RECIPE, GLOBAL_BATCH, SCALE_TEMPLATE) and execs this
# file with the trailing arguments. See docs/slurm.md.
#
# What it does, in order (nothing below needs editing; every knob is an env variable):
#   1. checks, on the batch node, before any GPU time is spent: the time limit leaves
#      MIN_TRAIN_TIME before the warning signal, python imports scale, RECIPE exists,
#      the config (recipe + overrides) is valid, the batch splits over the tasks, the
#      data is readable (local path / brace pattern: its first shard), OUTPUT_DIR is
#      writable;
#   2. moves this job's log to $OUTPUT_DIR/slurm/<job-name>-<job-id>.{out,err}
#      (appended to across requeues; the sbatch --output file keeps the checks only);
#   3. MASTER_ADDR = first node of the allocation, MASTER_PORT = derived from the job id;
#   4. `srun python -m scale.train --config RECIPE --resume auto ...`: one task per GPU;
#   5. on the warning signal (--signal=B:USR1@T reaches this shell only) forwards USR1
#      to the tasks through srun; the trainer finishes its step, checkpoints and exits 3;
#      this script then runs `scontrol requeue $SLURM_JOB_ID`. The restarted job resumes
#      from the newest checkpoint. A hang (the watchdog's exit 4) requeues the same way.
#      A finished run (exit 0) is never requeued, nor a diverged one (exit 5), nor a job
#      cancelled with scancel (SIGTERM).
#
# World size: the allocation's (nodes x --ntasks-per-node, else --ntasks), read at each
# start, so a template submitted with a node range (sbatch --nodes=MIN-MAX) runs on what it
# got, and a requeue or a resubmission on another count resumes with the same global batch.
#
# Environment (set before sbatch; sbatch passes the submitting environment to the job):
#   RECIPE        YAML recipe (required). Relative paths: to the submit dir, then to the repo.
#   DATA          data.root: shard URL pattern (/data/in1k/train-{000000..001023}.tar), or a
#                 folder for image_folder. Empty: the recipe's data.root.
#   OUTPUT_DIR    train.output_dir (checkpoints, metrics.jsonl, logs). Empty: the recipe's.
#   ENGINE        engine.name (auto | ddp | fsdp | deepspeed | single). Default: auto.
#   GLOBAL_BATCH  train.global_batch: the images of one optimizer step over all tasks (what
#                 the optimiser sees; OCL's negatives), GLOBAL_BATCH / number of tasks each,
#                 in train.micro_batch passes. Empty: the recipe's batch. (Template default:
#                 the paper's.)
#   PYTHON        interpreter with scale's dependencies (default: python3 on PATH).
#   MASTER_PORT   rendezvous port (default: 20000 + job id % 20000, the engine's own rule).
#   TASK_EXIT_GRACE  seconds srun waits after the first task exits before killing the
#                 others (a crashed rank must not leave the rest hanging); default 120.
#   MAX_STALLED_REQUEUES  stop requeueing after this many consecutive restarts that made
#                 no checkpoint progress (e.g. a time limit shorter than the signal margin);
#                 default 3.
#   MIN_TRAIN_TIME  seconds of training each start must get before the warning signal:
#                 a time limit under the --signal margin + MIN_TRAIN_TIME is refused before
#                 launch (checked in SLURM jobs only); default 300.
#   SIGNAL_MARGIN seconds of the warning (the T of --signal=B:USR1@T). Default: read from
#                 SBATCH_SIGNAL, else the job script's #SBATCH --signal line; set it when
#                 you pass --signal on the sbatch command line (the job record lacks it).
#   DRY_RUN=1     run the checks and print the srun command, launch nothing (works
#                 outside SLURM too: `DRY_RUN=1 RECIPE=... bash slurm/vitb_ocl.sbatch`).
# Trailing arguments: key=value config overrides, applied last (they beat all the above).
#
# Exit status: 0 finished (or requeued); 1 a check failed (message in the sbatch --output
# file); 3 preempted or hung but `scontrol requeue` failed (resubmit: it resumes); 5 diverged
# (not requeued); else the tasks' status.

set -uo pipefail

# The trainer's exit statuses that decide a requeue (defined in scale/errors.py):
EXIT_PREEMPTED=3   # stopped after a signal, before its last step, checkpointed: requeue
EXIT_HANG=4        # a rank's watchdog saw no step finish in train.hang_timeout_s: requeue
EXIT_DIVERGED=5    # a non-finite loss or gradient norm: never requeued (it would diverge again)

log() { printf 'scale-slurm [%(%F %T)T] %s\n' -1 "$*"; }
die() {
    printf 'scale-slurm: ERROR: %s\n' "$*" >&2
    [ -z "${SLURM_JOB_ID:-}" ] || printf 'scale-slurm: job %s stops before launching anything.\n' "$SLURM_JOB_ID" >&2
    exit 1
}

SCALE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEMPLATE=${SCALE_TEMPLATE:-launch}
PYTHON=${PYTHON:-python3}
ENGINE=${ENGINE:-auto}
DRY_RUN=${DRY_RUN:-0}
TASK_EXIT_GRACE=${TASK_EXIT_GRACE:-120}
MAX_STALLED_REQUEUES=${MAX_STALLED_REQUEUES:-3}
MIN_TRAIN_TIME=${MIN_TRAIN_TIME:-300}
JOB_ID=${SLURM_JOB_ID:-}
RESTART=${SLURM_RESTART_COUNT:-0}

if [ -z "$JOB_ID" ] && [ "$DRY_RUN" != 1 ]; then
    die "not inside a SLURM job: submit with 'sbatch slurm/$TEMPLATE.sbatch', or set DRY_RUN=1 to only run the checks"
fi

# ---- signals -----------------------------------------------------------------------
# Installed first: a warning that arrives during the checks must not kill this shell.
GOT_USR1=0      # the preemption / time-limit warning (#SBATCH --signal=B:USR1@T)
GOT_TERM=0      # scancel, the hard time limit, or slurmctld's own preemption: never requeue
SRUN_PID=
on_usr1() {
    GOT_USR1=1
    log "got SIGUSR1 (preemption/time-limit warning)${SRUN_PID:+: forwarding it to the tasks (srun pid $SRUN_PID)}"
    if [ -n "$SRUN_PID" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
on_term() {
    GOT_TERM=1
    log "got SIGTERM: the job is being cancelled or killed by SLURM; it will not requeue itself"
}
trap on_usr1 USR1
trap on_term TERM

log "$TEMPLATE: job ${JOB_ID:-(dry run)} restart $RESTART on ${SLURM_JOB_NODELIST:-$(hostname)} (repo $SCALE_ROOT)"

# ---- 1. checks (batch node only, before srun) ----------------------------------------
# The time limit must leave MIN_TRAIN_TIME seconds of training before the warning signal:
# otherwise every start is warned at once, checkpoints nothing new and requeues itself.
slurm_seconds() {  # SLURM duration ([D-]HH:MM:SS, [D-]HH[:MM], MM:SS, M) -> seconds; fails on UNLIMITED etc.
    local d=0 h=0 m=0 s=0
    if [[ $1 =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?(:([0-9]+))?$ ]]; then
        d=${BASH_REMATCH[1]} h=${BASH_REMATCH[2]} m=${BASH_REMATCH[4]:-0} s=${BASH_REMATCH[6]:-0}
    elif [[ $1 =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        h=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
    elif [[ $1 =~ ^([0-9]+)(:([0-9]+))?$ ]]; then
        m=${BASH_REMATCH[1]} s=${BASH_REMATCH[3]:-0}
    else
        return 1
    fi
    echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}
signal_spec() {  # this job's --signal: SBATCH_SIGNAL (beats #SBATCH lines), else the submitted script's
    if [ -n "${SBATCH_SIGNAL:-}" ]; then echo "$SBATCH_SIGNAL"; return 0; fi
    # sbatch reads #SBATCH lines up to the first command; the last --signal wins.
    scontrol write batch_script "$JOB_ID" - 2>/dev/null | awk '
        NR == 1 && /^#!/ { next }
        /^[[:space:]]*$/ { next }
        !/^#/ { exit }
        $1 == "#SBATCH" { for (i = 2; i <= NF; i++) {
            if ($i ~ /^--signal=/) spec = substr($i, 10); else if ($i == "--signal") spec = $(i + 1) } }
        END { print spec }'
}
check_time_limit() {
    local limit_text limit spec margin need
    [[ $MIN_TRAIN_TIME =~ ^[0-9]+$ ]] || die "MIN_TRAIN_TIME=$MIN_TRAIN_TIME is not a number of seconds"
    limit_text=$(scontrol show job -o "$JOB_ID" 2>/dev/null | grep -o 'TimeLimit=[^ ]*' | cut -d= -f2)
    if ! limit=$(slurm_seconds "$limit_text"); then
        log "time limit ${limit_text:-unknown}: not checked against the warning signal"
        return 0
    fi
    if [ -n "${SIGNAL_MARGIN:-}" ]; then
        [[ $SIGNAL_MARGIN =~ ^[0-9]+$ ]] || die "SIGNAL_MARGIN=$SIGNAL_MARGIN is not a number of seconds"
        margin=$SIGNAL_MARGIN spec="SIGNAL_MARGIN=$SIGNAL_MARGIN"
    elif ! spec=$(signal_spec); then
        log "WARNING: cannot read this job's --signal (scontrol write batch_script failed):" \
            "time limit $limit_text not checked; set SIGNAL_MARGIN=<seconds> to check it"
        return 0
    elif [ -z "$spec" ]; then
        log "time limit $limit_text, no --signal warning: the run ends TIMEOUT at the limit, without a requeue"
        return 0
    else
        margin=60   # SLURM's default when the spec has no @T
        [[ $spec != *@* ]] || margin=${spec##*@}
        [[ $margin =~ ^[0-9]+$ ]] || die "cannot read the warning margin of --signal=$spec (want [B:]USR1@<seconds>)"
        spec="--signal=$spec"
    fi
    need=$(( margin + MIN_TRAIN_TIME ))
    if [ "$limit" -le "$margin" ] || [ "$limit" -lt "$need" ]; then
        die "time limit $limit_text ($limit s) leaves $(( limit > margin ? limit - margin : 0 )) s of training before the warning signal," \
            "which comes $margin s before the limit ($spec); each start needs MIN_TRAIN_TIME=$MIN_TRAIN_TIME s," \
            "else it is warned at once and requeues itself again and again. Submit with --time=$(( (need + 59) / 60 ))" \
            "or more ($margin + $MIN_TRAIN_TIME = $need s), or with a shorter warning (sbatch --signal=B:USR1@T plus" \
            "SIGNAL_MARGIN=T), or lower MIN_TRAIN_TIME"
    fi
    log "time limit $limit_text: the warning comes $margin s before it ($spec), $(( limit - margin )) s into each start"
}
[ -z "$JOB_ID" ] || check_time_limit

[ -n "${RECIPE:-}" ] || die "RECIPE is not set. Submit e.g. 'RECIPE=recipes/<name>.yaml DATA=... OUTPUT_DIR=... sbatch slurm/$TEMPLATE.sbatch'; recipes in $SCALE_ROOT/recipes: $(cd "$SCALE_ROOT/recipes" 2>/dev/null && ls -- *.yaml 2>/dev/null | tr '\n' ' ')"
RECIPE_PATH=$RECIPE
if [ ! -e "$RECIPE_PATH" ] && [[ "$RECIPE" != /* ]] && [ -e "$SCALE_ROOT/$RECIPE" ]; then
    RECIPE_PATH=$SCALE_ROOT/$RECIPE
fi
[ -e "$RECIPE_PATH" ] || die "recipe not found: RECIPE=$RECIPE (looked in $PWD and $SCALE_ROOT)"
[ -f "$RECIPE_PATH" ] && [ -r "$RECIPE_PATH" ] || die "recipe is not a readable file: $RECIPE_PATH"
RECIPE_PATH=$(realpath -- "$RECIPE_PATH")

command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found on PATH (activate the environment before sbatch, or set PYTHON=/path/to/python)"
export PYTHONPATH=$SCALE_ROOT${PYTHONPATH:+:$PYTHONPATH}   # this checkout's scale, installed or not
export PYTHONUNBUFFERED=1

# Number of tasks: one per GPU, from the allocation this start got. With a node range
# (--nodes=MIN-MAX) the node count is known only now, and it may differ from one requeue to
# the next: the tasks are the allocated nodes x --ntasks-per-node. SLURM_NTASKS is not
# trusted then: sbatch computes it at submit time from MIN (SLURM < 23.02 does so even for
# a range), and srun would start that many tasks if not told otherwise. Without
# --ntasks-per-node the tasks are --ntasks (SLURM_NTASKS).
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
if [ -n "$NNODES" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    NTASKS=$(( NNODES * ${SLURM_NTASKS_PER_NODE%%[!0-9]*} ))
    TASK_LAYOUT="$NNODES node(s) x $SLURM_NTASKS_PER_NODE task(s) per node"
elif [ -n "${SLURM_NTASKS:-}" ]; then
    NTASKS=$SLURM_NTASKS
    TASK_LAYOUT="--ntasks=$NTASKS${NNODES:+ on $NNODES node(s)}"
else
    NTASKS=1
    TASK_LAYOUT="no SLURM allocation: 1 task"
fi
log "world size $NTASKS: $TASK_LAYOUT"

if [ -n "${GLOBAL_BATCH:-}" ]; then
    [[ "$GLOBAL_BATCH" =~ ^[0-9]+$ ]] && [ "$GLOBAL_BATCH" -gt 0 ] || die "GLOBAL_BATCH=$GLOBAL_BATCH is not a positive integer"
    (( GLOBAL_BATCH % NTASKS == 0 )) || die "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by the $NTASKS tasks; pick nodes x GPUs that divide it, or set GLOBAL_BATCH= (empty) and train.micro_batch=N (per task)"
fi
ENV_OVERRIDES=()
[ -z "${DATA:-}" ] || ENV_OVERRIDES+=("data.root=$DATA")
[ -z "${OUTPUT_DIR:-}" ] || ENV_OVERRIDES+=("train.output_dir=$OUTPUT_DIR")
ENV_OVERRIDES+=("engine.name=$ENGINE")

# The resolved config (the same code the trainer runs): catches unknown keys and bad
# values now, and tells where the data and the output go.
read -r -d '' RESOLVE_PY <<'PY'
import sys
try:
    from scale.config import DEFAULT_MICRO_BATCH, ConfigError, load_config
except Exception as err:  # noqa: BLE001
    print(f"IMPORT\tcannot import scale.config with {sys.executable}: {err!r}")
    sys.exit(0)
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    print(f"CONFIG\t{err}")
    sys.exit(0)
for key, value in (("data_name", cfg.data.name), ("data_root", cfg.data.root),
                   ("output_dir", cfg.train.output_dir), ("model", cfg.model.name),
                   ("max_steps", cfg.train.max_steps), ("global_batch", cfg.train.global_batch),
                   ("micro_batch", cfg.train.micro_batch), ("default_micro_batch", DEFAULT_MICRO_BATCH)):
    print(f"{key}\t{value}")
PY
field() { awk -F'\t' -v k="$1" '$1 == k { sub(/^[^\t]*\t/, ""); print; exit }' <<<"$RESOLVED"; }
resolve() {  # resolve OVERRIDE...: RESOLVED = the config of RECIPE + these overrides, or die
    RESOLVED=$("$PYTHON" -c "$RESOLVE_PY" "$RECIPE_PATH" "$@" 2>&1) \
        || die "could not resolve the config with $PYTHON: $RESOLVED"
    [ -z "$(field IMPORT)" ] || die "$(field IMPORT) (activate the environment that has scale's dependencies, or set PYTHON=)"
    [ -z "$(field CONFIG)" ] || die "bad config (RECIPE=$RECIPE, overrides: $*): $(field CONFIG)"
}

# GLOBAL_BATCH is train.global_batch. Trailing key=value overrides still come last and beat it.
BATCH_OVERRIDES=()
[ -z "${GLOBAL_BATCH:-}" ] || BATCH_OVERRIDES=("train.global_batch=$GLOBAL_BATCH")
OVERRIDES=("${BATCH_OVERRIDES[@]}" "${ENV_OVERRIDES[@]}" "$@")
resolve "${OVERRIDES[@]}"

# The batch as the trainer will compute it (scale/engine/batch_plan.py plan_batch): global_batch
# split over the tasks, else micro_batch (or its default) per task.
GLOBAL=$(field global_batch) CHUNK=$(field micro_batch)
if [ "$GLOBAL" != None ]; then
    (( GLOBAL % NTASKS == 0 )) || die "train.global_batch=$GLOBAL does not split evenly over the $NTASKS tasks; set GLOBAL_BATCH (or train.global_batch=) to a multiple of $NTASKS"
    PER_TASK=$(( GLOBAL / NTASKS )) EFFECTIVE=$GLOBAL SIZED_BY="train.global_batch=$GLOBAL"
else
    PER_TASK=$CHUNK
    [ "$PER_TASK" != None ] || PER_TASK=$(field default_micro_batch)
    EFFECTIVE=$(( PER_TASK * NTASKS )) SIZED_BY="train.micro_batch=$PER_TASK"
fi
BATCH_NOTE="effective batch $EFFECTIVE ($SIZED_BY: $PER_TASK/task x $NTASKS task(s)"
[ "$CHUNK" = None ] || (( CHUNK >= PER_TASK )) || BATCH_NOTE+=", in micro-batches of $CHUNK"
if [ -z "${GLOBAL_BATCH:-}" ]; then
    BATCH_NOTE+="; GLOBAL_BATCH is empty)"
elif [ "$EFFECTIVE" = "$GLOBAL_BATCH" ]; then
    BATCH_NOTE+=", from GLOBAL_BATCH=$GLOBAL_BATCH)"
else
    BATCH_NOTE+=")"
    log "WARNING: the effective batch is $EFFECTIVE, not GLOBAL_BATCH=$GLOBAL_BATCH: a trailing override sets it ($SIZED_BY), and trailing overrides win"
fi
DATA_NAME=$(field data_name); DATA_ROOT=$(field data_root); OUT=$(field output_dir)

# Data: a local path or brace pattern must have a readable first shard (file or folder).
# Remote URLs (s3://, https://, pipe:...) are left to the loader.
first_shard() {
    local u=${1%%::*} alt    # webdataset joins several patterns with '::'
    u=${u#file://}
    while [[ $u =~ ^([^{]*)\{([^{}]*)\}(.*)$ ]]; do
        alt=${BASH_REMATCH[2]}
        if [[ $alt == *..* ]]; then alt=${alt%%..*}; else alt=${alt%%,*}; fi
        u=${BASH_REMATCH[1]}$alt${BASH_REMATCH[3]}
    done
    printf '%s\n' "$u"
}
if [ -z "$DATA_ROOT" ]; then
    [ "$DATA_NAME" = synthetic ] || die "data.name=$DATA_NAME needs a data.root: set DATA=<shard pattern or folder>"
    log "data: synthetic (no files)"
elif [[ $DATA_ROOT =~ ^[A-Za-z][A-Za-z0-9+.-]*:// && $DATA_ROOT != file://* ]] || [[ $DATA_ROOT == pipe:* ]]; then
    log "data: $DATA_ROOT (remote: not checked here)"
else
    SHARD=$(first_shard "$DATA_ROOT")
    if [ -d "$SHARD" ]; then
        [ -r "$SHARD" ] && [ -x "$SHARD" ] || die "data folder is not readable: $SHARD (DATA=$DATA_ROOT)"
    elif [ -e "$SHARD" ]; then
        [ -r "$SHARD" ] && head -c 1 -- "$SHARD" >/dev/null 2>&1 || die "first data shard is not readable: $SHARD (DATA=$DATA_ROOT)"
    else
        die "data not found: $SHARD does not exist (first shard of DATA=$DATA_ROOT)"
    fi
    [ "$DATA_NAME" != synthetic ] || log "WARNING: DATA is set but the config says data.name=synthetic: the files will not be read"
    log "data: $DATA_ROOT (first shard $SHARD readable)"
fi

# Output: must be creatable and writable from here (shared filesystem for multi-node).
OUT=$(realpath -m -- "$OUT")
OVERRIDES+=("train.output_dir=$OUT")   # the resolved dir, absolute: the same on every node
mkdir -p -- "$OUT/slurm" 2>/dev/null || die "cannot create the output dir $OUT/slurm (OUTPUT_DIR=${OUTPUT_DIR:-the recipe train.output_dir})"
PROBE=$(mktemp -p "$OUT" .write-test.XXXXXX 2>/dev/null) && rm -f -- "$PROBE" \
    || die "output dir is not writable: $OUT"
log "output: $OUT"

# ---- 2./3. logs, rendezvous ------------------------------------------------------------
NAME=${SLURM_JOB_NAME:-$TEMPLATE}
# Always from this allocation's node list: a MASTER_ADDR inherited from the submitting
# shell (sbatch exports it) would point at some other machine.
MASTER_ADDR=$( { scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null || true; } | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$(hostname)}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${JOB_ID:-0} % 20000 ))}   # same on every task; requeues keep the id
export MASTER_ADDR MASTER_PORT
# Ranks come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; torchrun's variables (say, from
# the submitting shell) would take precedence in the engine, so they must not leak in.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# One task per GPU: SLURM itself starts, signals, accounts for and kills every rank, so
# the warning signal reaches each trainer directly and ranks come from SLURM_PROCID (no
# torchrun agent in between that would swallow USR1 or need its own rendezvous). Each
# task sees all GPUs of its node and picks cuda:$SLURM_LOCALID; no --gpus-per-task, whose
# cgroup isolation would renumber every task's GPU to cuda:0.
SRUN=(srun --kill-on-bad-exit=0 --wait="$TASK_EXIT_GRACE" --label --input=none --ntasks="$NTASKS")
# The allocation's shape, spelled out: srun would otherwise take SLURM_NTASKS / SLURM_NNODES
# from this shell's environment, which a node range leaves at the submit-time minimum.
[ -z "$NNODES" ] || SRUN+=(--nodes="$NNODES")
[ -z "${SLURM_NTASKS_PER_NODE:-}" ] || SRUN+=(--ntasks-per-node="${SLURM_NTASKS_PER_NODE%%[!0-9]*}")
# srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): pass it on.
[ -z "${SLURM_CPUS_PER_TASK:-}" ] || SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
CMD=("$PYTHON" -m scale.train --config "$RECIPE_PATH" --resume auto "${OVERRIDES[@]}")

log "model $(field model), $BATCH_NOTE, engine $ENGINE, rendezvous $MASTER_ADDR:$MASTER_PORT"
if [ "$DRY_RUN" = 1 ]; then
    log "checks passed; DRY_RUN=1, would run: ${SRUN[*]} ${CMD[*]}"
    exit 0
fi

LOG_OUT=$OUT/slurm/$NAME-$JOB_ID.out
LOG_ERR=$OUT/slurm/$NAME-$JOB_ID.err
log "checks passed; the rest of this job's log goes to $LOG_OUT and $LOG_ERR"
exec >>"$LOG_OUT" 2>>"$LOG_ERR"
log "==== job $JOB_ID restart $RESTART on $SLURM_JOB_NODELIST: $NTASKS task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
log "recipe $RECIPE_PATH, overrides: ${OVERRIDES[*]}"

latest_step() {  # newest complete checkpoint's step, or -1
    local d
    d=$(ls -d "$OUT"/checkpoints/step_[0-9]*[0-9] 2>/dev/null | sort | tail -n 1)
    if [ -n "$d" ] && [ -f "$d/meta.json" ]; then basename "$d" | sed 's/^step_0*//; s/^$/0/'; else echo -1; fi
}
STEP_BEFORE=$(latest_step)

requeue() {  # requeue REASON: put this job back in the queue; it resumes from the checkpoint
    local stall_file=$OUT/slurm/.stalled-requeues-$JOB_ID stalled=0 step
    step=$(latest_step)
    if [ "$step" = "$STEP_BEFORE" ]; then
        stalled=$(( $(cat "$stall_file" 2>/dev/null || echo 0) + 1 ))
        if [ "$stalled" -gt "$MAX_STALLED_REQUEUES" ]; then
            log "ERROR: $stalled restarts in a row without a new checkpoint (still step $step): not requeueing." \
                "Is the time limit shorter than the --signal margin?"
            exit "$EXIT_PREEMPTED"
        fi
    fi
    echo "$stalled" >"$stall_file"
    log "$1; newest checkpoint: step $step (was $STEP_BEFORE): scontrol requeue $JOB_ID"
    if scontrol requeue "$JOB_ID"; then
        log "requeued: the job restarts with --resume auto"
        exit 0
    fi
    log "ERROR: scontrol requeue failed; resubmit the same command, it resumes from step $step"
    exit "$EXIT_PREEMPTED"
}

# ---- 4. launch ---------------------------------------------------------------------------
if [ "$GOT_USR1" = 1 ] && [ "$GOT_TERM" = 0 ]; then
    requeue "the warning signal came before the launch"
fi
"${SRUN[@]}" "${CMD[@]}" &
SRUN_PID=$!
log "srun pid $SRUN_PID: ${SRUN[*]} ${CMD[*]}"
# `wait` returns early (status > 128) when a trapped signal arrives: wait again until
# srun itself has exited.
while :; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
SRUN_PID=
log "tasks exited with status $RC"

# ---- 5. requeue or finish ------------------------------------------------------------------
if [ "$GOT_TERM" = 1 ]; then
    log "SIGTERM received (scancel / time limit / preemption by SLURM): not requeueing; resubmit to resume"
    exit "$RC"
fi
if [ "$RC" = 0 ]; then
    rm -f -- "$OUT/slurm/.stalled-requeues-$JOB_ID"
    log "finished: newest checkpoint step $(latest_step)"
    exit 0
fi
if [ "$RC" = "$EXIT_DIVERGED" ]; then
    log "ERROR: the run diverged (exit $RC: a non-finite loss or gradient norm; the tasks' log names the step" \
        "and the last good checkpoint): not requeueing; see $LOG_ERR"
    exit "$RC"
fi
if [ "$RC" = "$EXIT_PREEMPTED" ]; then
    requeue "the trainer stopped early after a signal and checkpointed (exit $RC)"
fi
# A hang is handled like a preemption: the restart resumes from the newest checkpoint, on
# whatever allocation it gets (a bad node may be left out). The stack dumps stay in $OUT/hang.
if [ "$RC" = "$EXIT_HANG" ]; then
    requeue "a rank's watchdog found the run hung and stopped it (exit $RC; stacks in $OUT/hang)"
fi
if [ "$GOT_USR1" = 1 ]; then
    requeue "the warning signal came and the tasks exited with status $RC"
fi
log "ERROR: the tasks failed (status $RC) without a preemption signal: not requeueing; see $LOG_ERR"
exit "$RC"
