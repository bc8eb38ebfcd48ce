"""The pre-training loop: data -> masks -> encoder -> objective -> engine step.

Everything that decides what a step computes is a function of (seed, step, rank): the
data order of (seed, epoch), each rank taking its rows of the global batch, the masks of
(seed, step), drawn for the global batch and kept for those rows, the global RNG (drop
path), re-seeded from (seed, step, rank) at every step, and the learning rate of the step.
A checkpoint therefore only has to hold the parameters, the optimizer and the step (and
the config it checks on resume), and `--resume auto` continues bit-for-bit on CPU.
"""
from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn as nn

from ..checkpoint_io import encoder_state_dict
from ..checkpoint_io.directory import CONFIG_KEY, DATA_ORDER_KEY, CheckpointError, CheckpointManager, read_meta
from ..checkpoint_io.safe_load import describe_load_error
from ..config import AUTO_MICRO_BATCH, ConfigError, RunConfig, to_dict, to_yaml
from ..errors import UserError
from ..device import autocast_dtype, resolve_device
from ..data import LoaderSpec, PretrainData, build_dataset
from ..data.device_input import DeviceImages
from ..data.gpu_decode import resolve_decode
from ..engine import (ACCUMULATE, GRAD_CACHE, Engine, GradCache, GradientAccumulation, StepTimer, build_engine,
                      plan_batch)
from ..engine.memory_plan import choose_micro_batch, pretrain_step_memory
from ..engine.parallelize import apply_block_wrappers
from ..masking import (MASK_GENERATORS, MaskContext, MaskGenerator, build_mask_generator, seed_global_rng,
                       step_generator)
from ..models import build_encoder
from ..pretraining import PretrainModule, build_pretrain_module
from .divergence import NONFINITE_ENV, DivergenceGuard, poisoned_for_test
from .monitors import Monitor
from .resume_check import check_resume_config, resume_meta
from .sample_record import SampleRecord
from .step_log import forget_steps_after, open_for_appending
from .flops import method_step_flops
from .optim import build_optimizer, build_schedule, learning_rate
from .plan import run_length
from ..plot import METRICS_FILE
from .progress import ProgressReporter
from .watchdog import (CHECKPOINT, COLLECTIVE, DATA_WAIT, FORWARD_BACKWARD, HANG_ENV, MONITORS, HangWatchdog,
                       hang_injected_for_test, injected_steps)


@dataclass
class TrainSummary:
    steps_done: int
    final_step: int
    losses: List[float] = field(default_factory=list)  # one per step run in this process
    output_dir: str = ""
    last_checkpoint: Optional[str] = None
    preempted: bool = False


class Trainer:
    def __init__(self, cfg: RunConfig, data: Optional[PretrainData] = None, engine: Optional[Engine] = None,
                 monitors: Sequence[Monitor] = ()):
        self.cfg = cfg
        self.monitors = list(monitors)
        self.device = resolve_device(cfg.train.device)
        self.engine = engine or build_engine(cfg, self.device)
        self.device = self.engine.device
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)

        torch.manual_seed(cfg.train.seed)  # parameter init; everything later is seeded by step
        module = build_pretrain_module(cfg)
        self.spec = module.encoder.spec
        self.data = data or build_dataset(resolve_decode(cfg.data, self.device), self.spec.img_size,
                                          self.spec.in_chans, train=True)
        objective = module.objective
        # Per-rank batch: train.global_batch / world_size, else train.micro_batch; micro-batches by the
        # objective's kind: gradient caching for a loss that couples the batch, else accumulation.
        self.batch_plan = plan_batch(cfg.train, self.engine.world_size, objective.couples_batch)
        if cfg.train.micro_batch == AUTO_MICRO_BATCH:  # sized to the free memory before the model is on the device
            memory = pretrain_step_memory(module, cfg.mask.ratio, self.amp_dtype is not None,
                                          cfg.train.activation_checkpointing.strip() == "full")
            choice = choose_micro_batch(self.batch_plan.per_rank_batch, self.device, memory)
            if self.engine.is_main:
                print(f"scale: {choice.note}", file=sys.stderr, flush=True)
            self.batch_plan = plan_batch(cfg.train, self.engine.world_size, objective.couples_batch, choice.micro_batch)
        if self.batch_plan.global_batch < objective.min_global_batch:
            raise ConfigError(f"train.global_batch (or micro_batch x ranks) is {self.batch_plan.global_batch}; "
                              f"objective {cfg.objective.name!r} needs at least {objective.min_global_batch}")
        self.masking: MaskGenerator = build_mask_generator(cfg.mask, self.spec.grid_size)
        if self.masking.num_groups != objective.num_groups:
            matching = [name for name in MASK_GENERATORS.names() if self._groups_of(name) == objective.num_groups]
            raise ConfigError(f"mask.name={cfg.mask.name!r} draws {self.masking.num_groups} visible group(s) per image, "
                              f"objective.name={cfg.objective.name!r} scores {objective.num_groups}; pick a matching "
                              f"generator: {', '.join(matching)}")
        if self.batch_plan.mode == GRAD_CACHE and objective.needs.tokens:
            raise ConfigError(f"train.micro_batch: objective {cfg.objective.name!r} couples the batch and needs "
                              "tokens, which gradient caching does not carry; leave train.micro_batch unset")
        self.loader_spec = LoaderSpec(batch_size=self.batch_plan.per_rank_batch, seed=cfg.train.seed,
                                      rank=self.engine.rank, world_size=self.engine.world_size,
                                      num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        length = run_length(cfg.train, self.data, self.loader_spec)
        self.steps_per_epoch, self.total_steps = length.steps_per_epoch, length.total_steps
        self.stop_step = length.stop_step
        self.effective_batch = self.batch_plan.global_batch  # images of one optimizer step
        self.base_lr = learning_rate(cfg.optim, self.effective_batch)

        apply_block_wrappers(module, cfg.train)  # AC -> compile; the engine shards after (FSDP2 order)
        self.engine.setup(module, lambda m: build_optimizer(m, cfg.optim, self.base_lr), self.batch_plan)
        # set_attn_backend resolves `auto` against the device the module now lives on.
        self.pretrain_module.set_attn_backend(cfg.model.attn_backend)
        self.schedule = build_schedule(self.engine.optimizer, cfg.optim, self.total_steps,
                                       round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints", cfg.train.keep_last)
        self.sample_record = (SampleRecord.for_run(self.data, cfg.data.name, self.output_dir, self.engine.rank)
                              if cfg.data.record_samples else None)
        self.step = 0
        self._stop_signal: Optional[int] = None
        # (per-rank batch, groups, visible per group) of the last step's masks: what its FLOPs count.
        self.last_group_shape = (self.batch_plan.per_rank_batch, 2, self.spec.num_patches)
        passes = {GRAD_CACHE: GradCache, ACCUMULATE: GradientAccumulation}.get(self.batch_plan.mode)
        self.passes = passes(self.engine, self.batch_plan.chunk) if passes is not None else None
        self.timer: StepTimer = self.engine.timer  # per-step timings, shared with the engine's collectives
        # Hangs and divergence (docs/reliability.md): the loop marks its phase and heartbeat on the watchdog,
        # and keeps each step's loss and grad norm on the device for the checks at log and checkpoint steps.
        self.watchdog = HangWatchdog(self.output_dir, self.engine.rank, cfg.train.hang_timeout_s, cfg.engine.timeout_s,
                                     self.timer)
        self.divergence = DivergenceGuard(self.engine, cfg.train.on_nonfinite, cfg.train.max_rollbacks,
                                          self.output_dir)
        # Test-only faults (tests/test_watchdog.py, tests/test_divergence.py): steps where this rank hangs or
        # trains on NaN pixels; empty unless their environment variables name this rank.
        self._hang_at = injected_steps(HANG_ENV, self.engine.rank)
        self._nonfinite_at = injected_steps(NONFINITE_ENV, self.engine.rank)

    def _groups_of(self, generator_name: str) -> Optional[int]:
        """Visible groups the generator `generator_name` draws under this run's mask config (None: it refuses it)."""
        try:
            return build_mask_generator(self.cfg.mask.switched(generator_name), self.spec.grid_size).num_groups
        except ConfigError:
            return None

    @property
    def pretrain_module(self) -> PretrainModule:
        return self.engine.unwrapped()

    # ------------------------------------------------------------------ state
    def _trainer_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"step": self.step, CONFIG_KEY: to_dict(self.cfg),
                                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path:
        extra = self._trainer_state()
        return self.checkpoints.save(
            self.step, lambda d: self.engine.save(d, extra),
            meta={"step": self.step, "epoch": self.step // self.steps_per_epoch, "engine": self.engine.name,
                  "checkpoint_format": self.engine.checkpoint_format,
                  "world_size": self.engine.world_size, "model": self.cfg.model.name, CONFIG_KEY: to_dict(self.cfg),
                  DATA_ORDER_KEY: self.data.order},  # a resume mid-epoch must continue this order (resume_check.py)
            is_writer=self.engine.is_main, barrier=self.engine.barrier)

    def _resume_path(self) -> Optional[Path]:
        """The checkpoint to resume: chosen (and verified) by the main rank, then shared, so
        every rank loads the same one even if they saw the directory at different moments."""
        chosen: Optional[Path] = None
        refused: Optional[UserError] = None
        if self.engine.is_main:
            try:
                chosen = self.checkpoints.resolve(self.cfg.train.resume, warn=self._warn)
            except UserError as err:
                refused = err
        if self.engine.world_size == 1:
            if refused is not None:
                raise refused
            return chosen
        # The main rank's answer as a number every rank agrees on (float64 holds any step exactly):
        # the step, -1 nothing to resume, -2 refused (every rank stops, none waits in a collective).
        answer = -2.0 if refused is not None else (float(read_meta(chosen)["step"]) if chosen else -1.0)
        code = torch.tensor(answer * self.engine.world_size if self.engine.is_main else 0.0, dtype=torch.float64,
                            device=self.device)
        step = int(round(float(self.engine.all_reduce_mean(code).item())))
        if step == -2:
            raise refused if refused is not None else CheckpointError(
                "rank 0 refused the checkpoint to resume (its error says why)")
        if step < 0:
            return None
        return chosen if chosen is not None else (
            self.checkpoints.path_for(step) if self.cfg.train.resume == "auto" else Path(self.cfg.train.resume))

    def _warn(self, message: str) -> None:
        if self.engine.is_main:
            print(f"scale: warning: {message}", file=sys.stderr, flush=True)

    def maybe_resume(self) -> Optional[Path]:
        if not self.cfg.train.resume:
            existing = self.checkpoints.latest()
            if existing is not None:  # a fresh run here would rotate another run's checkpoints away
                raise CheckpointError(
                    f"train.output_dir {self.output_dir} already holds checkpoints of a run (newest {existing.name}); "
                    "continue it with --resume auto, or start this run in another train.output_dir")
            return None
        path = self._resume_path()
        if path is None:
            return None
        meta = resume_meta(read_meta(path), str(path))
        for warning in check_resume_config(meta[CONFIG_KEY], self.cfg, meta, self.engine.checkpoint_format,
                                           self.engine.world_size, str(path), self.data.order, self.steps_per_epoch):
            self._warn(warning)
        self._load_state(path)
        return path

    def _load_state(self, path: Path) -> None:
        """Model, optimizer, step and RNG from the checkpoint `path` (a resume, a rollback)."""
        try:
            extra = self.engine.load(path)
        except UserError:
            raise
        except Exception as err:  # state-dict mismatches, damaged shards: a user-facing file problem
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {describe_load_error(err)}") from err
        self.step = int(extra["step"])
        torch.set_rng_state(extra["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"], self.device)

    def _roll_back(self, checkpoint: Path) -> None:
        """train.on_nonfinite=rollback: reload the last good checkpoint through the resume's load path; the
        sample record forgets the steps after it, as on resume."""
        with self.watchdog.long_phase(CHECKPOINT, self.step):
            self._load_state(checkpoint)
        self.watchdog.restart(self.step)
        if self.sample_record is not None:
            self.sample_record.close()
            self.sample_record.start(self.step, self.engine.is_main, self.engine.barrier)

    def _open_metrics_log(self, rewound: bool) -> Optional[TextIO]:
        """The main rank's metrics.jsonl, for appending (None elsewhere). After a resume or a rollback
        (`rewound`) it first forgets the lines of steps after this one: they describe a model that was lost."""
        if not self.engine.is_main:
            return None
        path = self.output_dir / METRICS_FILE
        if rewound:
            forget_steps_after(path, self.step, "the metrics log")
        return open_for_appending(path, "the metrics log")

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> Dict[int, Any]:
        """SIGUSR1 (SLURM's preemption warning) and SIGTERM: finish the step, checkpoint, stop."""
        previous = {}

        def request_stop(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass
        return previous

    def _stop_requested(self, at_log_step: bool) -> bool:
        """Whether any rank was signalled. Across ranks this needs a collective and a host
        sync, so it is checked at log steps only; a single process checks every step."""
        if self.engine.world_size == 1:
            return self._stop_signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor(float(self._stop_signal is not None), device=self.device)
        return bool(self.engine.all_reduce_mean(flag).item() > 0)

    # ------------------------------------------------------------------ loop
    def _window_record(self, step_metrics: Dict[str, torch.Tensor], elapsed: float, steps: int,
                       data_wait: float) -> Dict[str, Any]:
        """Metrics of the last step plus throughput over the steps since the last log."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        batch, groups, visible = self.last_group_shape
        batch *= self.engine.world_size
        objective = self.pretrain_module.objective
        flops = method_step_flops(self.spec, objective, self.masking, batch, groups, visible,
                                  self.cfg.model.train_patch_embed)
        groups *= objective.needs.encoder_passes
        record: Dict[str, Any] = {k: float(v) for k, v in step_metrics.items()}
        record.update({
            "engine": self.engine.name,  # text: in the log line and metrics.jsonl, not TensorBoard
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "epoch": self.step / self.steps_per_epoch,
            "img_per_s": steps * batch / elapsed,
            "tokens_per_s": steps * batch * groups * (1 + visible) / elapsed,
            "flops_per_s": steps * flops / elapsed,
            "data_wait_frac": data_wait / elapsed,
            "skipped_samples": float(self.data.skipped_samples()),
        })
        return record

    def mask_context(self, batch: DeviceImages) -> MaskContext:
        """What the mask generator may draw from: (seed, step) and this rank's rows of the global batch,
        progress, and what it declared it needs. Every rank seeds rank 0's stream and draws for the whole
        global batch, keeping its rows: an image's masks do not depend on the world size."""
        needs = self.masking.needs
        per_rank = self.batch_plan.per_rank_batch
        context = MaskContext(generator=step_generator(self.cfg.train.seed, self.step, 0, self.device),
                              device=self.device, step=self.step, global_batch=self.batch_plan.global_batch,
                              rows=slice(self.engine.rank * per_rank, (self.engine.rank + 1) * per_rank),
                              # Exact fractions: EHM's depth floor(progress x H) must not round one level low.
                              progress=min(Fraction(self.step, max(self.total_steps, 1)), Fraction(1)),
                              epoch_progress=min(Fraction(self.step // self.steps_per_epoch,
                                                          max(self.cfg.train.epochs, 1)), Fraction(1)),
                              time_region=self.timer.time)
        if needs.images or needs.model_signal is not None:
            context.images = batch.all()
        if needs.model_signal is not None:
            request = needs.model_signal
            context.model_signal = lambda x: self.engine.model_signal(x, request)
        return context

    def logs_at(self, step: int) -> bool:
        """Whether the loop logs after step `step` (and may read the device there: a host sync)."""
        return step % self.cfg.train.log_every == 0 or step == self.stop_step

    def train_step(self, images: torch.Tensor) -> Dict[str, Any]:
        """One optimizer step; returns detached metrics, still on the device (no host sync).

        With gradient caching the local batch is encoded chunk by chunk (scale.engine.grad_cache)
        under masks drawn once for the whole batch. Timings: the all-gather (forward and
        backward) and the optimizer step are communication-bound; the rest is compute.
        """
        started = time.perf_counter()
        # Only this step's regions; on CUDA they synchronise the device in the steps that log them alone.
        self.timer.begin_step(measured=self.logs_at(self.step + 1))
        with self.timer.time("input"):  # uint8 to the device (non-blocking), decoded there with data.decode=gpu
            batch = self.data.to_device(images, self.device)
        if self.step + 1 in self._nonfinite_at:
            batch = poisoned_for_test(batch)
        # Drop path draws from the global RNG: seeded by (seed, step, rank) alone, a step never depends on
        # what drew before it (DataLoader start-up, monitors, a resume).
        seed_global_rng(self.cfg.train.seed, self.step, self.engine.rank, self.device)
        masks = self.masking(len(batch), self.mask_context(batch))
        self.schedule.step_update(self.step)

        def autocast():
            return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                  enabled=self.amp_dtype is not None)

        if self.passes is not None:  # micro-batches: gradient caching or accumulation, normalised one at a time
            out = self.passes(batch, masks, autocast)
        else:
            with autocast():
                out = self.engine.forward(batch.all(), masks)
            self.engine.backward(out.loss)
        with self.timer.time("optimizer"):
            grad_norm = self.engine.step(self.cfg.optim.clip_grad)
        with self.timer.time("weight_followers"):  # e.g. an EMA of the encoder (FSDP2 / ZeRO-3: gathered)
            self.engine.update_weight_followers()
        metrics: Dict[str, Any] = {"loss": out.loss.detach(), **out.metrics, **masks.metrics}
        if self.engine.world_size > 1:  # log the global loss (mean of the ranks' local losses), not rank 0's
            self.watchdog.enter(COLLECTIVE, self.step + 1)
            names = list(metrics)
            reduced = self.engine.all_reduce_mean(torch.stack([metrics[n].float().reshape(()) for n in names]))
            metrics = dict(zip(names, reduced.unbind()))
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.detach()
        self.last_group_shape = tuple(masks.group_ids.shape)
        timings = self.timer.pop()
        total = time.perf_counter() - started
        allgather = timings.get("allgather_fwd", 0.0) + timings.get("allgather_bwd", 0.0)
        metrics.update({
            "global_batch": float(len(batch) * self.engine.world_size),
            "world_size": float(self.engine.world_size),
            "micro_batches": float(self.batch_plan.num_chunks),
            "time_step_s": total,
            "time_allgather_s": allgather,
            "time_optimizer_s": timings.get("optimizer", 0.0),
            "time_compute_s": max(total - allgather - timings.get("optimizer", 0.0), 0.0),
        })
        # Other timed regions (e.g. the mask generator's: time_mask_signal_s, time_mask_tree_s), inside compute.
        metrics.update({f"time_{name}_s": seconds for name, seconds in timings.items()
                        if name not in ("allgather_fwd", "allgather_bwd", "optimizer")})
        return metrics

    def encoder_for_eval(self) -> Optional[nn.Module]:
        """The encoder with the current weights on the main rank (None elsewhere). Collective:
        sharded engines (FSDP2, ZeRO-3) hold no whole encoder, so every rank joins the gather
        of the full state and the main rank evaluates a copy; replicated engines lend their own."""
        if not self.engine.sharded_state:
            return self.pretrain_module.encoder if self.engine.is_main else None
        state = self.engine.full_state_dict()
        if not self.engine.is_main:
            return None
        m = self.cfg.model
        encoder = build_encoder(m.name, img_size=m.img_size, in_chans=m.in_chans, attn_backend="math")
        encoder.load_state_dict(encoder_state_dict(state, "the trainer's state"))
        encoder.to(self.device).set_attn_backend(m.attn_backend)
        return encoder

    def _run_monitors(self, reporter: ProgressReporter, metrics_file: Any, stop: bool) -> float:
        """The monitors due at this step (every rank calls it); returns their seconds."""
        due = [m for m in self.monitors if not stop and m.due(self.step, self.steps_per_epoch)]
        if not due:
            return 0.0
        started = time.perf_counter()
        encoder = self.encoder_for_eval()
        for monitor in due:
            record = monitor.evaluate(encoder, self.device, self.amp_dtype) if encoder is not None else None
            if record is not None:
                self._log_eval(record, monitor.describe(record), reporter, metrics_file)
        self.engine.barrier()
        return time.perf_counter() - started

    def _log_eval(self, record: Dict[str, float], line: str, reporter: ProgressReporter, metrics_file: Any) -> None:
        """Into metrics.jsonl (a line with "kind": "eval"), TensorBoard (eval/*) and the console."""
        epoch = self.step / self.steps_per_epoch
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": self.step, "kind": "eval", "epoch": epoch, **record}) + "\n")
            metrics_file.flush()
        reporter.log_eval(self.step, record)
        reporter.message(f"eval step {self.step} (epoch {epoch:.3g}): {line}")

    def fit(self) -> TrainSummary:
        cfg = self.cfg
        resumed = self.maybe_resume()
        rollbacks = self.divergence.load(resumed is not None)  # a resume skips what an earlier rollback skipped
        main = self.engine.is_main
        if main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "config.yaml").write_text(to_yaml(cfg))
            except OSError as err:
                raise ConfigError(f"train.output_dir {str(self.output_dir)!r}: cannot be written "
                                  f"({err.strerror or err}); choose a writable folder") from None
        if self.sample_record is not None:  # the record forgets the steps after the checkpoint resumed
            self.sample_record.start(self.step, main, self.engine.barrier)
        reporter = ProgressReporter(self.output_dir / "tensorboard", self.stop_step, self.step, enabled=main,
                                    headline=self.pretrain_module.objective.console_metrics + self.masking.console_metrics)
        reporter.message(
            f"scale: {cfg.objective.name} | {cfg.model.name} "
            f"({sum(p.numel() for p in self.pretrain_module.encoder.parameters()) / 1e6:.1f}M params, attention "
            f"{self.pretrain_module.encoder.attn_backend}) | engine {self.engine.name} x{self.engine.world_size} "
            f"on {self.device.type}{' bf16' if self.amp_dtype else ' fp32'}")
        reporter.message(
            f"scale: batch {self.effective_batch} | lr {self.base_lr:.3g} | {self.steps_per_epoch} steps/epoch, "
            f"stopping at step {self.stop_step} of {self.total_steps}" + (f" | resumed from {resumed}" if resumed else ""))
        if rollbacks:
            reporter.message(f"scale: skipping the steps {self.divergence.path} records: "
                             + ", ".join("{}-{}".format(*r["skipped"]) for r in self.divergence.rollbacks))
        previous_handlers = self._install_signal_handlers()
        metrics_file = self._open_metrics_log(rewound=resumed is not None)
        losses: List[Tuple[int, torch.Tensor]] = []  # (step, loss) of each step trained in this process
        steps_at_start = self.step
        last_ckpt: Optional[Path] = resumed
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        stop = False
        self.watchdog.start()
        try:
            while self.step < self.stop_step and not stop:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                fetch_start = time.perf_counter()
                self.watchdog.restart(self.step)  # every new loader forks workers and waits for its first batch
                self.watchdog.enter(DATA_WAIT, self.step + 1)
                batches = self.data.loader(self.loader_spec, epoch, start_batch)
                rollback: Optional[Dict[str, Any]] = None
                for batch, (images, _labels, samples) in enumerate(batches, start_batch):
                    data_wait += time.perf_counter() - fetch_start
                    # A step a rollback skipped advances without an update: step == data position stays true.
                    trained = not self.divergence.skips(self.step + 1)
                    if trained:
                        self.watchdog.enter(FORWARD_BACKWARD, self.step + 1)
                        if self.step + 1 in self._hang_at:
                            hang_injected_for_test()
                        step_metrics = self.train_step(images)
                    self.step += 1
                    self.watchdog.step_done(self.step)
                    if trained:
                        if self.sample_record is not None:
                            self.sample_record.write(self.step, epoch, batch, samples)
                        window_steps += 1
                        losses.append((self.step, step_metrics["loss"]))
                        self.divergence.record(self.step, step_metrics)
                    reporter.advance(self.step)
                    at_log_step = self.logs_at(self.step)
                    self.watchdog.enter(COLLECTIVE, self.step)
                    stop = self._stop_requested(at_log_step)
                    at_checkpoint = self.step % cfg.train.ckpt_every == 0 or stop
                    if at_log_step or at_checkpoint:  # nothing non-finite is logged as good or checkpointed
                        nonfinite = self.divergence.check(self.step)
                        if nonfinite is not None:  # stop, or rollbacks used up: Diverged (exit 5)
                            rollback = self.divergence.decide(nonfinite, last_ckpt)
                            reporter.message(f"scale: {nonfinite.describe()}; {self.divergence.describe(rollback)}")
                            break
                    if (at_log_step or stop) and trained:
                        record = self._window_record(step_metrics, time.perf_counter() - window_start,
                                                     window_steps, data_wait)
                        reporter.log(self.step, record)
                        if metrics_file:
                            metrics_file.write(json.dumps({"step": self.step, **record}) + "\n")
                            metrics_file.flush()
                        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                    if at_checkpoint:
                        with self.watchdog.long_phase(CHECKPOINT, self.step):
                            last_ckpt = self.save_checkpoint()
                    if stop or self.step >= self.stop_step:
                        break
                    fetch_start = time.perf_counter()
                    self.watchdog.enter(DATA_WAIT, self.step + 1)
                if rollback is not None:
                    batches.close()  # its workers end before the next loader forks its own
                    self._roll_back(Path(rollback["checkpoint"]))
                    losses = [(step, loss) for step, loss in losses if step <= self.step]
                    if metrics_file:  # the steps after the checkpoint are trained and logged again, as on resume
                        metrics_file.close()
                        metrics_file = self._open_metrics_log(rewound=True)
                    # The next throughput line covers the steps after the rollback only.
                    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                    continue
                with self.watchdog.long_phase(MONITORS, self.step):  # monitor time is not step time
                    window_start += self._run_monitors(reporter, metrics_file, stop)
            if last_ckpt is None or self.checkpoints.path_for(self.step) != last_ckpt:
                with self.watchdog.long_phase(CHECKPOINT, self.step):
                    last_ckpt = self.save_checkpoint()
        finally:
            self.watchdog.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            if metrics_file:
                metrics_file.close()
            if self.sample_record is not None:
                self.sample_record.close()
        preempted = self._stop_signal is not None
        reporter.message(
            f"{'stopped by signal ' + str(self._stop_signal) + ' at' if preempted else 'finished'} step {self.step}"
            f" | checkpoint: {last_ckpt} | logs: {self.output_dir / 'metrics.jsonl'} and "
            f"tensorboard --logdir {self.output_dir / 'tensorboard'}")
        reporter.close()
        return TrainSummary(steps_done=self.step - steps_at_start, final_step=self.step,
                            losses=[float(loss) for _, loss in losses],
                            output_dir=str(self.output_dir), last_checkpoint=str(last_ckpt) if last_ckpt else None,
                            preempted=preempted)
