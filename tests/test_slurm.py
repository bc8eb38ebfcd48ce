"""The SLURM templates, end to end, on a real single-node SLURM that the tests start.

- the launcher's checks (DRY_RUN=1, no SLURM needed): missing recipe, missing data,
  unwritable output dir, bad overrides; all three templates pass them with real data;
- a real `sbatch slurm/vitb_ocl.sbatch` with CPU overrides: 2 tasks (DDP over gloo), the
  tiny CPU recipe; the job completes and leaves its checkpoint, metrics and logs;
- a failing check ends the job before srun starts anything;
- GLOBAL_BATCH beats a recipe's train.global_batch: the trainer runs with it, and the
  launch log says so;
- a time limit inside the warning margin (--time=1 against --signal=B:USR1@300) is refused
  at the checks, in one line, and the job is not requeued;
- preemption: `scancel --signal=USR1 --batch` (what `#SBATCH --signal=B:USR1@T` sends),
  then, after the requeue, `scancel --signal=USR1` to the tasks themselves (what a
  signal without `B:` does): each time the job checkpoints and requeues itself, resumes
  from the checkpoint's step, and ends with the losses of the uninterrupted run;
- a node range (--nodes=MIN-MAX): the world size is the allocation's (DRY_RUN with 3 nodes
  of a 1-3 range; a real 1-2 range below);
- a hang (the watchdog's exit 4) requeues like a preemption; a divergence (exit 5) never;
- another allocation: a 2-task job preempted, resubmitted with 1 task, preempted, then with 3
  tasks, finishes the epoch with every sample exactly once (data.record_samples).

The cluster (tests/slurm_cluster.py) installs SLURM with apt-get when it is missing; the
SLURM tests are skipped, with the reason, only where that is impossible.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from conftest import REPO
from slurm_cluster import FINAL_STATES, SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.slurm

TEMPLATES = ("vith_ocl", "vitl_ocl", "vitb_ocl")
STEPS = 16
# The engine that runs >1 task on CPU (DDP over gloo); without it the jobs run 1 task.
HAVE_DDP = importlib.util.find_spec("scale.engine.ddp") is not None
NTASKS = 2 if HAVE_DDP else 1
JOB_TIMEOUT = 150.0

# What turns a GPU template into a 2-core CPU job: sbatch flags on the command line beat
# the #SBATCH lines, trailing key=value overrides beat the recipe.
CPU_SBATCH = ["--gpus-per-node=0", "--nodes=1", f"--ntasks-per-node={NTASKS}", "--cpus-per-task=1",
              "--time=10"]
CPU_OVERRIDES = [f"train.max_steps={STEPS}", "data.num_samples=1024", "data.num_workers=0",
                 "train.device=cpu", "train.precision=fp32", "train.log_every=1", "train.ckpt_every=4",
                 "train.keep_last=2"]


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable)
               + os.pathsep + env.get("PATH", "/usr/bin:/bin"))
    env.update(extra)
    return env


def job_env(out: Path, **extra: str) -> Dict[str, str]:
    return clean_env(**{"RECIPE": "recipes/ocl_cpu_tiny.yaml", "OUTPUT_DIR": str(out), "GLOBAL_BATCH": str(32 * NTASKS),
                        "ENGINE": "ddp" if NTASKS > 1 else "single", "TASK_EXIT_GRACE": "30", **extra})


def read_metrics(run: Path) -> List[dict]:
    with open(run / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def job_log(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("*.out")))


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")


# ----------------------------------------------------------------------------- checks (no SLURM)

def dry_run(template: str, env: Dict[str, str], *overrides: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / f"{template}.sbatch"), *overrides],
                          env={**env, "DRY_RUN": "1"}, cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_pass_their_checks_with_readable_shards(tmp_path, template):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"\0" * 512)  # only the first shard is checked
    out = dry_run(template, clean_env(DATA=str(shards / "train-{000000..000009}.tar"),
                                      OUTPUT_DIR=str(tmp_path / "run")))
    assert out.returncode == 0, out.stderr
    assert "checks passed" in out.stdout and "first shard" in out.stdout
    # The template's recipe, --resume auto, the run dir and the batch split over tasks.
    model = {"vith_ocl": "vit_huge_patch16", "vitl_ocl": "vit_large_patch16", "vitb_ocl": "vit_base_patch16"}
    assert model[template] in out.stdout
    assert "--resume auto" in out.stdout and f"train.output_dir={tmp_path / 'run'}" in out.stdout
    assert (tmp_path / "run" / "slurm").is_dir()


@pytest.mark.parametrize("case, env_extra, overrides, message", [
    ("no recipe", {"RECIPE": "recipes/no_such_recipe.yaml"}, [], "recipe not found"),
    ("missing first shard", {"DATA": "/nonexistent/train-{000000..000009}.tar"}, [],
     "/nonexistent/train-000000.tar does not exist"),
    ("output dir not writable", {"OUTPUT_DIR": "/proc/version/run"}, [], "cannot create the output dir"),
    ("bad override", {}, ["train.no_such_key=1"], "unknown config key 'train.no_such_key'"),
    ("batch does not split", {"GLOBAL_BATCH": "9601", "SLURM_NTASKS": "2"}, [], "not divisible"),
    ("contrastive batch does not split", {"GLOBAL_BATCH": "", "SLURM_NTASKS": "2"},
     ["train.global_batch=9"], "train.global_batch=9 does not split evenly over the 2 tasks"),
])
def test_checks_fail_clearly_before_launch(tmp_path, case, env_extra, overrides, message):
    env = job_env(tmp_path / "run")
    env.update(env_extra)
    out = dry_run("vitb_ocl", env, *overrides)
    assert out.returncode == 1, (case, out.stdout, out.stderr)
    assert "ERROR" in out.stderr and message in out.stderr, (case, out.stderr)
    assert "would run" not in out.stdout


def test_outside_slurm_without_dry_run_refuses(tmp_path):
    out = subprocess.run(["bash", str(REPO / "slurm" / "vitb_ocl.sbatch")], env=job_env(tmp_path / "run"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not inside a SLURM job" in out.stderr


def test_node_range_launches_the_allocated_world_size(tmp_path):
    """`sbatch --nodes=1-3 --ntasks-per-node=2` that got 3 nodes: 6 tasks. SLURM < 23.02 sets
    SLURM_NTASKS at submit time from the range's minimum (1 x 2); the launcher counts the
    allocation instead, splits the global batch over its tasks and tells srun the shape."""
    env = job_env(tmp_path / "run", GLOBAL_BATCH="12", SLURM_JOB_NUM_NODES="3", SLURM_NNODES="3",
                  SLURM_NTASKS_PER_NODE="2", SLURM_NTASKS="2", SLURM_NPROCS="2")
    out = dry_run("vitb_ocl", env)
    assert out.returncode == 0, out.stderr
    assert "world size 6: 3 node(s) x 2 task(s) per node" in out.stdout, out.stdout
    assert "effective batch 12 (train.global_batch=12: 2/task x 6 task(s)" in out.stdout, out.stdout
    assert "srun --kill-on-bad-exit=0 --wait=30 --label --input=none --ntasks=6 --nodes=3 --ntasks-per-node=2 " \
        in out.stdout, out.stdout
    # A global batch that does not split over this allocation stops the job before srun.
    out = dry_run("vitb_ocl", {**env, "GLOBAL_BATCH": "8"})
    assert out.returncode == 1 and "not divisible by the 6 tasks" in out.stderr, out.stderr


# ----------------------------------------------------------------------------- real SLURM

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # 4 CPUs on a 2-core machine: room for the 3-task job of the resume test (1 CPU per task).
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), node_cpus=4, log=lambda m: print(m, file=sys.stderr))
    try:
        c.start()
    except SlurmUnavailable as err:
        pytest.skip(f"SLURM cannot be installed here: {err}")
    yield c
    c.stop()


def submit(cluster: SlurmCluster, tmp_path: Path, run: Path, template: str = "vitb_ocl", env_extra=None,
           overrides=CPU_OVERRIDES, sbatch_extra=()) -> str:
    """sbatch_extra: more sbatch flags; they come after CPU_SBATCH, and sbatch keeps the last."""
    return cluster.sbatch([*CPU_SBATCH, *sbatch_extra, str(REPO / "slurm" / f"{template}.sbatch"), *overrides],
                          env=job_env(run, **(env_extra or {})), cwd=tmp_path)


def explain(cluster: SlurmCluster, tmp_path: Path, run: Path, job: str) -> str:
    boot = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob(f"slurm-*-{job}.out"))
    err = "\n".join(p.read_text(errors="replace")[-3000:] for p in (run / "slurm").glob("*.err")) \
        if (run / "slurm").is_dir() else ""
    return (f"job {job}: {cluster.job(job)}\n--- sbatch output\n{boot}\n--- run log\n"
            f"{job_log(run) if (run / 'slurm').is_dir() else ''}\n--- run stderr\n{err}\n{cluster.tail_logs(10)}")


@pytest.fixture(scope="module")
def reference_run(cluster, tmp_path_factory):
    """One uninterrupted job: the template with CPU overrides, to the last step."""
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    t0 = time.monotonic()
    job = submit(cluster, tmp, run)
    state = cluster.wait_for(job, {"COMPLETED"}, timeout=JOB_TIMEOUT)
    print(f"reference job {job}: {state} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return {"job": job, "state": state, "run": run, "tmp": tmp, "info": explain(cluster, tmp, run, job)}


def test_job_completes_with_checkpoint(cluster, reference_run):
    run = reference_run["run"]
    assert reference_run["state"] == "COMPLETED", reference_run["info"]
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == NTASKS, meta
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    log = job_log(run)
    assert f"engine {'ddp' if NTASKS > 1 else 'single'} x{NTASKS}" in log, log
    assert "finished: newest checkpoint step 16" in log
    job = reference_run["job"]
    # Per-job logs under the run dir; the sbatch --output file in the submit dir holds the checks.
    assert (run / "slurm" / f"ocl-vitb-{job}.out").is_file() and (run / "slurm" / f"ocl-vitb-{job}.err").is_file()
    boot = (reference_run["tmp"] / f"slurm-ocl-vitb-{job}.out").read_text()
    assert "checks passed" in boot
    assert cluster.job(job).get("Restarts") == "0"


def test_failed_check_stops_the_job_before_srun(cluster, tmp_path):
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run, env_extra={"DATA": str(tmp_path / "missing-{0000..0003}.tar")})
    state = cluster.wait_for(job, {"FAILED"}, timeout=60)
    boot = (tmp_path / f"slurm-ocl-vitb-{job}.out").read_text()
    assert state == "FAILED", explain(cluster, tmp_path, run, job)
    assert "data not found" in boot and "missing-0000.tar" in boot and "stops before launching" in boot
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.long
def test_global_batch_beats_the_recipe_global_batch(cluster, tmp_path):
    """A recipe with train.global_batch (as recipes/ocl_vitb16.yaml) plus GLOBAL_BATCH: the run
    scores GLOBAL_BATCH images per step, and the launch log says so."""
    tiny = (REPO / "recipes" / "ocl_cpu_tiny.yaml").read_text()
    assert "  micro_batch: 256" in tiny
    recipe = tmp_path / "contrastive.yaml"
    recipe.write_text(tiny.replace("  micro_batch: 256", "  micro_batch: 16\n  global_batch: 128  #"))
    global_batch = 32 * NTASKS  # job_env's GLOBAL_BATCH; the recipe says 128
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run, env_extra={"RECIPE": str(recipe), "GLOBAL_BATCH": str(global_batch)},
                 overrides=[*CPU_OVERRIDES, "train.max_steps=2"])
    state = cluster.wait_for(job, {"COMPLETED"}, timeout=JOB_TIMEOUT)
    info = explain(cluster, tmp_path, run, job)
    assert state == "COMPLETED", info
    # What the trainer ran with: its saved config, its start-up line, every step's metrics.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["global_batch"] == global_batch, saved["train"]
    assert re.search(rf"(scale:|\|) batch {global_batch} \|", job_log(run)), info
    assert [r["global_batch"] for r in read_metrics(run)] == [global_batch] * 2, info
    # What the launcher told the user before launching.
    boot = (tmp_path / f"slurm-ocl-vitb-{job}.out").read_text()
    assert f"effective batch {global_batch} " in boot and f"GLOBAL_BATCH={global_batch}" in boot, boot
    assert "effective batch 128" not in boot, boot


def test_time_limit_inside_the_warning_margin_is_refused_before_launch(cluster, tmp_path):
    """--time=1 (60 s) with the template's --signal=B:USR1@300: the warning would come at once on
    every start and the job would requeue forever. It must fail at the checks, once."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run, sbatch_extra=["--time=1"])
    diagnose = lambda: explain(cluster, tmp_path, run, job)  # noqa: E731
    wait_until(lambda: cluster.job(job).get("JobState") in FINAL_STATES
               or int(cluster.job(job).get("Restarts", "0")) > 0, 60, "the job to end or requeue", diagnose=diagnose)
    time.sleep(2)  # a requeue would have shown by now
    info = cluster.job(job)
    assert info.get("JobState") == "FAILED" and info.get("Restarts") == "0", diagnose()
    boot = (tmp_path / f"slurm-ocl-vitb-{job}.out").read_text()
    errors = [line for line in boot.splitlines() if "ERROR" in line]
    assert len(errors) == 1, boot
    # One line: both values and what to change.
    assert "time limit" in errors[0] and "60 s" in errors[0] and "--signal=B:USR1@300" in errors[0], errors
    assert "--time=" in errors[0], errors
    assert "stops before launching" in boot and "checks passed" not in boot, boot
    assert not (run / "metrics.jsonl").exists()


@pytest.mark.long
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(cluster, reference_run, tmp_path):
    assert reference_run["state"] == "COMPLETED", reference_run["info"]
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, run)

    def steps_logged() -> int:
        try:
            return len((run / "metrics.jsonl").read_text().splitlines())
        except FileNotFoundError:
            return 0

    # 1) The warning to the batch shell (as #SBATCH --signal=B:USR1@T sends it), mid-run.
    diagnose = lambda: explain(cluster, tmp_path, run, job)  # noqa: E731
    wait_until(lambda: steps_logged() >= 5, JOB_TIMEOUT, "5 steps of the first run", diagnose=diagnose)
    cluster.scancel("--signal=USR1", "--batch", job)
    wait_until(lambda: int(cluster.job(job).get("Restarts", "0")) >= 1, 90,
               "the job to requeue itself after the batch-shell signal", diagnose=diagnose)
    first_stop = int(re.search(r"stopped by signal 10 at step (\d+)", job_log(run)).group(1))
    assert 5 <= first_stop < STEPS
    # 2) After the restart, the signal to the tasks themselves (no B:): exit 3 -> requeue.
    wait_until(lambda: steps_logged() >= first_stop + 2, JOB_TIMEOUT, "the resumed run's steps", diagnose=diagnose)
    cluster.scancel("--signal=USR1", job)
    try:
        state = cluster.wait_for(job, {"COMPLETED"}, timeout=JOB_TIMEOUT)
    except TimeoutError as err:
        raise TimeoutError(f"{err}\n{diagnose()}") from None
    info = explain(cluster, tmp_path, run, job)
    print(f"interrupted job {job}: {state} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    assert state == "COMPLETED", info
    assert cluster.job(job).get("Restarts") == "2", info

    log = job_log(run)
    stops = [int(s) for s in re.findall(r"stopped by signal 10 at step (\d+)", log)]
    assert len(stops) == 2 and stops[0] == first_stop < stops[1] < STEPS, info
    # Each restart resumed from the checkpoint written at the stop.
    for stop in stops:
        assert f"resumed from {run / 'checkpoints' / f'step_{stop:08d}'}" in log, info
    assert log.count("requeued: the job restarts with --resume auto") == 2, info
    assert "got SIGUSR1" in log and "(exit 3)" in log
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").is_file()

    # Every step exactly once, and the same losses as the uninterrupted run, to the bit.
    resumed, reference = read_metrics(run), read_metrics(reference_run["run"])
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), info
    assert resumed[-1]["loss"] == reference[-1]["loss"], (resumed[-1], reference[-1])
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]


@pytest.mark.long
def test_scancel_is_not_undone_by_a_requeue(cluster, tmp_path):
    """`scontrol requeue` would bring back even a cancelled job: SIGTERM must disarm it."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run)
    wait_until(lambda: (run / "metrics.jsonl").is_file(), JOB_TIMEOUT, "the training loop",
               diagnose=lambda: explain(cluster, tmp_path, run, job))
    cluster.scancel(job)
    state = cluster.wait_for(job, {"CANCELLED"}, timeout=60)
    time.sleep(3)  # a requeue would have shown by now
    info = cluster.job(job)
    assert state == "CANCELLED" and info.get("JobState") == "CANCELLED" and info.get("Restarts") == "0", \
        explain(cluster, tmp_path, run, job)
    wait_until(lambda: "not requeueing" in job_log(run), 30, "the launcher's last words",
               diagnose=lambda: explain(cluster, tmp_path, run, job))


# ----------------------------------------------------------------------------- hangs and divergence

def hang_on_first_start_python(tmp_path: Path) -> Path:
    """A PYTHON for the launcher that keeps the test-only hang (SCALE_TEST_HANG_AT) for the job's
    first start and drops it after a requeue, as a bad node left out of the next allocation."""
    script = tmp_path / "python"
    script.write_text("#!/bin/bash\n"
                      '[ "${SLURM_RESTART_COUNT:-0}" = 0 ] || unset SCALE_TEST_HANG_AT\n'
                      'exec %s "$@"\n' % sys.executable)
    script.chmod(0o755)
    return script


@pytest.mark.long
def test_a_hang_ends_the_job_with_stacks_and_requeues_it(cluster, reference_run, tmp_path):
    """The last rank stops making progress in step 6 (the others wait for it in a collective):
    the watchdogs (train.hang_timeout_s=5) write their stacks and exit 4, the launcher requeues
    the job like a preemption, and the restart resumes from step 4 to the uninterrupted run's losses."""
    assert reference_run["state"] == "COMPLETED", reference_run["info"]
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run, overrides=[*CPU_OVERRIDES, "train.hang_timeout_s=5"],
                 env_extra={"PYTHON": str(hang_on_first_start_python(tmp_path)),
                            "SCALE_TEST_HANG_AT": f"{NTASKS - 1}:6"})
    state = cluster.wait_for(job, {"COMPLETED"}, timeout=2 * JOB_TIMEOUT)  # two starts
    info = explain(cluster, tmp_path, run, job)
    assert state == "COMPLETED" and cluster.job(job).get("Restarts") == "1", info
    assert (run / "hang" / f"rank_{NTASKS - 1}_step_6.txt").is_file(), info
    log = job_log(run)
    assert "a rank's watchdog found the run hung and stopped it (exit 4" in log, info
    assert "requeued: the job restarts with --resume auto" in log, info
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}" in log, info
    # metrics.jsonl keeps step 5 of the first start too (run after the checkpoint): the last line of a step counts.
    resumed = {r["step"]: r["loss"] for r in read_metrics(run)}
    reference = {r["step"]: r["loss"] for r in read_metrics(reference_run["run"])}
    assert sorted(resumed) == list(range(1, STEPS + 1)), info
    assert resumed == reference


@pytest.mark.long
def test_a_divergence_ends_the_job_once_without_a_requeue(cluster, tmp_path):
    """The last rank trains step 6 on NaN pixels (SCALE_TEST_NONFINITE_AT), train.on_nonfinite=stop:
    the trainer exits 5 with its one line, and the launcher does not requeue (it would diverge
    again): the job ends FAILED with status 5, once, and its log says why."""
    run = tmp_path / "run"
    job = submit(cluster, tmp_path, run, env_extra={"SCALE_TEST_NONFINITE_AT": f"{NTASKS - 1}:6"})
    state = cluster.wait_for(job, {"FAILED"}, timeout=JOB_TIMEOUT)
    time.sleep(2)  # a requeue would have shown by now
    info = cluster.job(job)
    assert state == "FAILED" and info.get("Restarts") == "0" and info.get("ExitCode") == "5:0", \
        explain(cluster, tmp_path, run, job)
    log = job_log(run)
    assert "ERROR: the run diverged (exit 5" in log and "not requeueing" in log, log
    err = (run / "slurm" / f"ocl-vitb-{job}.err").read_text()
    assert f"diverged: loss is nan at step 6; last good checkpoint: {run / 'checkpoints' / 'step_00000004'}" in err, err


# ----------------------------------------------------------------------------- another allocation

ELASTIC_BATCH = 12  # train.global_batch: splits over 2, 1 and 3 tasks
ELASTIC_STEPS = 60  # one epoch
ELASTIC_OVERRIDES = ["train.epochs=1", f"data.num_samples={ELASTIC_BATCH * ELASTIC_STEPS}", "data.num_workers=0",
                     "train.device=cpu", "train.precision=fp32", "train.log_every=1", "train.ckpt_every=4",
                     "train.keep_last=2", "data.record_samples=true"]


def read_sample_record(run: Path) -> Dict[int, List[dict]]:
    """<run>/samples/rank_<R>.jsonl (data.record_samples) -> {step: that step's line of each rank}."""
    steps: Dict[int, List[dict]] = {}
    for path in sorted((run / "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).append(record)
    return steps


def test_preempted_run_resumes_on_other_world_sizes_with_every_sample_once(cluster, tmp_path):
    """A 2-task job preempted (USR1) mid-epoch, resubmitted with 1 task, preempted again, then
    resubmitted with 3 tasks (as a node range, --nodes=1-2, that got one node) to the same output
    directory: the epoch finishes, and the samples the ranks recorded hold every sample of the
    epoch exactly once, each step's global batch of ELASTIC_BATCH split over the world size of
    the job that ran it. --no-requeue: each preempted job ends (the launcher's `scontrol requeue`
    is refused, exit 3, "resubmit"), as on a site that does not requeue."""
    run = tmp_path / "run"
    env = {"GLOBAL_BATCH": str(ELASTIC_BATCH), "ENGINE": "auto"}

    def start(tasks: int, *sbatch: str) -> str:
        return submit(cluster, tmp_path, run, env_extra=env, overrides=ELASTIC_OVERRIDES,
                      sbatch_extra=[f"--ntasks-per-node={tasks}", "--no-requeue", *sbatch])

    def steps_logged() -> int:
        try:
            return len((run / "metrics.jsonl").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def preempt(job: str, after_step: int) -> int:
        """USR1 to the batch shell once `after_step` steps are logged; the step the job stopped at."""
        diagnose = lambda: explain(cluster, tmp_path, run, job)  # noqa: E731
        wait_until(lambda: steps_logged() >= after_step, JOB_TIMEOUT, f"step {after_step} of job {job}",
                   diagnose=diagnose)
        cluster.scancel("--signal=USR1", "--batch", job)
        state = cluster.wait_for(job, {"FAILED"}, timeout=JOB_TIMEOUT)
        assert state == "FAILED" and cluster.job(job).get("ExitCode") == "3:0", diagnose()
        log = (run / "slurm" / f"ocl-vitb-{job}.out").read_text()
        assert "resubmit the same command, it resumes" in log, diagnose()
        return int(re.findall(r"stopped by signal 10 at step (\d+)", log)[-1])

    t0 = time.monotonic()
    first = start(2)
    stop_1 = preempt(first, 5)
    second = start(1)
    stop_2 = preempt(second, stop_1 + 3)
    third = start(3, "--nodes=1-2")
    state = cluster.wait_for(third, {"COMPLETED"}, timeout=JOB_TIMEOUT)
    info = explain(cluster, tmp_path, run, third)
    print(f"2 -> 1 -> 3 tasks: {state} in {time.monotonic() - t0:.1f}s (stops at steps {stop_1}, {stop_2})",
          file=sys.stderr)
    assert state == "COMPLETED", info
    assert 5 <= stop_1 < stop_2 < ELASTIC_STEPS, (stop_1, stop_2, info)

    # Each job ran on its own world size and resumed from the previous one's stop.
    log = job_log(run)
    for job, tasks in ((first, 2), (second, 1), (third, 3)):
        assert re.search(rf"==== job {job} restart 0 on \S+: {tasks} task\(s\),", log), info
    assert "world size 3: 1 node(s) x 3 task(s) per node" in (tmp_path / f"slurm-ocl-vitb-{third}.out").read_text()
    for stop in (stop_1, stop_2):
        assert f"resumed from {run / 'checkpoints' / f'step_{stop:08d}'}" in log, info
    final = json.loads((run / "checkpoints" / f"step_{ELASTIC_STEPS:08d}" / "meta.json").read_text())
    assert final["world_size"] == 3, final
    assert [r["step"] for r in read_metrics(run)] == list(range(1, ELASTIC_STEPS + 1)), info

    # Exactly once: every step of the epoch recorded by each rank of the job that ran it, and
    # the epoch's samples, over all steps and ranks, each once.
    record = read_sample_record(run)
    assert sorted(record) == list(range(1, ELASTIC_STEPS + 1)), sorted(record)
    for step, lines in record.items():
        ranks = 2 if step <= stop_1 else 1 if step <= stop_2 else 3
        assert len(lines) == ranks and sum(len(r["samples"]) for r in lines) == ELASTIC_BATCH, (step, lines)
        assert {r["batch"] for r in lines} == {step - 1} and {r["epoch"] for r in lines} == {0}, (step, lines)
    seen = sorted(i for lines in record.values() for r in lines for i in r["samples"])
    assert seen == list(range(ELASTIC_BATCH * ELASTIC_STEPS)), "samples skipped or repeated"
