"""Start or resume a run: resolve the configuration, check it against the data, supervise it."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import List, Tuple

from mlx_train.fleet import hosts as cluster
from mlx_train.fleet import ship
from mlx_train.config import BACKENDS, ModelKind, RunOptions, Split, TrainConfig, flag_of, from_dict
from mlx_train.controller import reporting
from mlx_train.controller.console import ProgressView
from mlx_train.rank.data import load_corpus
from mlx_train.errors import UserError
from mlx_train.units import MAX_BYTES, human
from mlx_train.controller.launch import local_hosts
from mlx_train.fleet.hosts import Host
from mlx_train.rundir import RUNS_ROOT, RunDir, new_run_id
from mlx_train.controller.supervisor import Supervision, Supervisor
from mlx_train.planning.oom import OomPolicy
from mlx_train.rank.device import rank_budget_for


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def resolve_config(flags: dict, opts: RunOptions) -> TrainConfig:
    """flags > --config file (or the resumed run's config.yaml) > defaults: one TrainConfig, checked here once.

    `flags` holds only what the user typed, nested like `TrainConfig.to_dict()`.
    """
    base: dict = {}
    source = "flags"
    if opts.resume:
        run = RunDir(opts.resume)
        if not run.exists():
            raise UserError(f"nothing to resume in {opts.resume}: no config.yaml there (pass the run directory)")
        try:
            base, source = TrainConfig.from_yaml(run.config_path, complete=True).to_dict(), str(run.config_path)
        except ValueError as exc:
            raise UserError(f"{run.config_path} is damaged ({exc}): restore it, or start a new run") from None
    elif opts.config:
        try:
            base, source = TrainConfig.from_yaml(opts.config).to_dict(), opts.config
        except ValueError as exc:
            raise UserError(f"--config {opts.config}: {exc}") from None
    try:
        return from_dict(TrainConfig, _merge(base, flags))
    except ValueError as exc:
        # Name what the user typed: the flag when the bad value came from one, else the file.
        flag = flag_of(str(exc).split(" ", 1)[0].rsplit(".", 1)[-1], flags)
        raise UserError(f"{exc} (from {flag or source}): fix the value and run again") from None


def check_inputs(cfg: TrainConfig) -> TrainConfig:
    """Fail before any rank starts if the model or data cannot serve this configuration; the data sets
    the vocabulary (256 for bytes, max id + 1 for a .npy, the tokenizer's model for a pretrained one)."""
    from mlx_train.rank import hf

    if cfg.model.kind is ModelKind.PRETRAINED:
        path = hf.check(cfg.model, cfg.fine_tune)
        if Path(cfg.model.name).expanduser().exists():  # a local directory: recorded absolute (resume, export)
            cfg = replace(cfg, model=replace(cfg.model, name=str(path.resolve())))
    elif cfg.fine_tune.mode != "full":
        raise UserError(f"--fine-tune {cfg.fine_tune.mode} needs a pretrained model (--model DIR or a hub id); "
                        f"model {cfg.model.name} trains in full: drop --fine-tune")
    elif cfg.model.kind is ModelKind.FACTORY:
        from mlx_train.rank.model import load_factory

        load_factory(cfg.model.name)
    corpus = load_corpus(cfg.data, cfg.model)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=corpus.vocab_size))
    corpus.batcher("train", cfg.model.seq_len, cfg.seed).require(cfg.dist.global_batch_size, "one global batch")
    corpus.batcher("val", cfg.model.seq_len, cfg.seed).require(cfg.dist.num_devices,
                                                               "one validation sequence per device")
    return cfg


def hosts_for(opts: RunOptions, cfg: TrainConfig, flags: dict) -> Tuple[List[Host], TrainConfig]:
    """The hosts a run uses and the config with its device count: the cluster's slots (cut to the
    --devices the user asked for) with --distributed or --cluster, else `cfg`'s local ranks."""
    if not (opts.distributed or opts.cluster):
        return local_hosts(cfg.dist.num_devices), cfg
    dist = flags.get("dist", {})
    found = cluster.load_cluster(opts.cluster)
    _check_hosts(found.hosts, str(found.path))
    hosts = cluster.with_devices(found.hosts, dist.get("num_devices"))
    cfg = replace(cfg, dist=replace(cfg.dist, num_devices=sum(h.slots for h in hosts)))
    # The backend the nodes were provisioned for, unless --backend, --config or --resume chose one.
    if found.backend and not (opts.resume or opts.config or "backend" in dist):
        if found.backend not in BACKENDS:
            raise UserError(f"{found.path}: backend {found.backend[:40]!r} is not one of {', '.join(BACKENDS)}: fix "
                            "it, or regenerate the file with `mlx-train configure --distributed`")
        cfg = replace(cfg, dist=replace(cfg.dist, backend=found.backend))
    return hosts, cfg


def _check_hosts(hosts: List[Host], where: str) -> None:
    """What a run needs of the cluster file's hosts, judged before launch."""
    fix = "fix it, or regenerate it with `mlx-train configure --distributed`"
    for h in hosts:
        if not isinstance(h.slots, int) or isinstance(h.slots, bool) or not 1 <= h.slots <= 1024:
            raise UserError(f"{where}: host {h.name} has {h.slots!r} slots (ranks), not a number from 1 to 1024: {fix}")
        if h.memory is not None and (not isinstance(h.memory, int) or not 0 < h.memory <= MAX_BYTES):
            raise UserError(f"{where}: host {h.name} has memory {h.memory!r}, not a positive number of bytes: {fix}")
    names, addrs = set(), {}
    for h in hosts:
        if h.name in names:
            raise UserError(f"{where}: host {h.name} is listed twice: remove one entry and set `slots: N` on the "
                            "other for N ranks")
        if h.addr in addrs:
            raise UserError(f"{where}: hosts {addrs[h.addr]} and {h.name} share the address {h.addr}: {fix}")
        names.add(h.name)
        addrs[h.addr] = h.name


def leave_out_slow(opts: RunOptions, cfg: TrainConfig, hosts: List[Host], flags: dict) -> Tuple[List[Host], TrainConfig]:
    """The cluster's hosts less any too slow to help (planning/planner.py hosts_to_run), with one line
    naming them; not when the user fixed the ranks (--devices, explicit --shares weights) or resumes."""
    if opts.resume or "num_devices" in flags.get("dist", {}) or cfg.dist.share_weights() is not None:
        return hosts, cfg
    from mlx_train.planning.planner import hosts_to_run, resplit

    leaving = hosts_to_run(cfg, hosts)
    if not leaving.left_out:
        return hosts, cfg
    print(leaving.line, flush=True)
    kept = list(leaving.kept)
    return kept, resplit(cfg, sum(h.slots for h in kept))


def plan_for_budget(cfg: TrainConfig, hosts: List[Host]) -> TrainConfig:
    """--optimize-memory: the planner's split of the requested global batch for this budget. On hosts of
    unequal memory the split is the tightest host's, and each rank's micro-batch is what its own host
    holds (micro_caps, the accumulation making up its rows): the same global batch and data order."""
    from mlx_train.planning import stages
    from mlx_train.planning.planner import micro_caps_for, split_for

    if cfg.dist.pipeline_stages > 1:  # --pipeline-stages S: kept, the micro-batch planned per stage
        found = stages.fit_at(cfg, hosts, cfg.dist.pipeline_stages)
        if found is None:
            check_fits(cfg, hosts)  # names the stage that does not fit
            raise UserError(f"--optimize-memory: no micro-batch fits every one of the {cfg.dist.pipeline_stages} "
                            "pipeline stages: use more --pipeline-stages (or auto) or more hosts")
        print(f"--optimize-memory: {stages.described(*found)}", flush=True)
        return found[0]
    try:
        check_fits(cfg, hosts)
        plan = split_for(cfg, hosts)
    except UserError as refused:
        # Nothing fits one device at any level allowed: a pipeline holds each host's layers only.
        found = None if stages.why_not_pipelined(cfg) else stages.fewest(cfg, hosts)
        if found is None:
            raise refused
        print(f"--optimize-memory: the model fits no device unpipelined{_at_levels(cfg)}: "
              f"{stages.described(*found)}", flush=True)
        return found[0]
    if plan.shard != "none" and not stages.why_not_pipelined(cfg):
        found = stages.fewest(cfg, hosts)
        if found is not None:
            pipelined, why = stages.prefer(plan.split.apply(cfg), found[0], hosts)
            print(f"--optimize-memory: a pipeline of {found[1].stages} stages fits too; "
                  f"{'pipelined' if pipelined else f'--shard {plan.shard}'}: {why}", flush=True)
            if pipelined:
                print(f"--optimize-memory: {stages.described(*found)}", flush=True)
                return found[0]
    print(f"--optimize-memory: {plan.split} (predicted peak {plan.breakdown.peak / 2**20:.0f} MiB of "
          f"{rank_budget_for(cfg, hosts) / 2**20:.0f} MiB)", flush=True)
    cfg = plan.split.apply(cfg)
    caps = micro_caps_for(cfg, hosts)
    if caps is None:
        return cfg
    per_host, first = [], 0
    for h in hosts:
        per_host.append(f"{h.name} {caps[first]}")
        first += h.slots
    print(f"--optimize-memory: hosts of unequal memory: each rank's micro-batch by its own host's "
          f"({', '.join(per_host)}), the accumulation making up its rows", flush=True)
    return replace(cfg, dist=replace(cfg.dist, micro_caps=caps))


def _at_levels(cfg: TrainConfig) -> str:
    return " at any shard level" if cfg.shard == "auto" else f" at --shard {cfg.shard}"


def check_fits(cfg: TrainConfig, hosts: List[Host]) -> None:
    """Refuse, before launch, a budget that cannot hold the model even at its smallest step (batch 1 per
    device, checkpointing, fp32 or bf16) at any shard level --shard allows, naming the smallest budget that would
    and what else would fit: a shard level the user ruled out, more devices, a smaller model."""
    kind = cfg.model.kind  # a pretrained model's shape comes from its config.json (planning/memory.py)
    if not kind.knows_shape:
        return  # a model of your own: the planner does not know its shape
    if cfg.dist.pipeline_stages > 1:  # each stage holds its layers only: judged per stage
        from mlx_train.planning.stages import check_fits as stages_fit

        return stages_fit(cfg, hosts)
    from mlx_train.config import SHARD_LEVELS
    from mlx_train.planning.memory import step_memory
    from mlx_train.planning.planner import levels_allowed, model_shape

    budget = rank_budget_for(cfg, hosts)
    n = cfg.dist.num_devices
    accumulation = 2 if cfg.dist.global_batch_size > n else 1  # only > 1 matters
    shape = model_shape(cfg.model, cfg.fine_tune)

    def least(level: str, devices: int = n) -> int:
        # bf16 keeps a bf16 copy of the weights and, over several devices, one of the gradients more.
        return min(step_memory(shape, 1, accumulation, True, precision, num_devices=devices, shard=level).peak
                   for precision in ("fp32", "bf16"))

    allowed = levels_allowed(cfg.shard, n)
    lowest = min(least(level) for level in allowed)
    if lowest <= budget:
        return
    need = size_at_least(lowest)
    ways = []
    if n > 1:
        other = next((level for level in SHARD_LEVELS if level not in allowed and least(level) <= budget), None)
        if other:
            ways.append(f"--shard {other}")
    if not ways:  # more devices: the fewest at which a fully sharded step fits this budget
        more = next((m for m in (2 ** i for i in range(1, 11)) if m > n and least("full", m) <= budget), None)
        if more:
            ways.append(f"{more} devices or more with --shard full")
    ways.append("--fine-tune lora, a quantized model or a shorter --seq-len" if kind is ModelKind.PRETRAINED else
                "a smaller model (--layers, --width, --seq-len)")
    use = ", ".join(ways[:-1]) + f" or {ways[-1]}" if len(ways) > 1 else ways[0]
    at = f" with --shard {cfg.shard}" if cfg.shard != "auto" else " at any shard level" if n > 1 else ""
    if cfg.memory_budget:
        raise UserError(f"--memory-budget {human(budget)} cannot hold this model even at batch 1 with checkpointing "
                        f"in either precision{at}: raise it to at least {need}, or use {use}")
    raise UserError(f"this model needs at least {need} per device even at batch 1 with checkpointing in either "
                    f"precision{at}, more than the {human(budget)} a rank has here: use {use}")


def size_at_least(n: float) -> str:
    """`n` bytes rounded up to a tenth of a readable unit, written as --memory-budget takes it."""
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40), ("PiB", 2**50)):
        if n < 1024 * scale or unit == "PiB":
            return f"{math.ceil(n / scale * 10) / 10:g}{unit}"
    return f"{n}"


def check_resumable(run: RunDir) -> None:
    """--resume: refuse before launch when the run has checkpoints and none is intact; the ranks would
    start over from step 0 and write over them."""
    from mlx_train.rank.checkpoint import list_steps, verify

    damaged = []
    for path in reversed(list_steps(run.checkpoints)):
        why = verify(path)
        if why is None:
            return
        damaged.append(f"{path.name}: {why}")
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise UserError(f"no intact checkpoint in {run.checkpoints} ({damaged[0]}{more}): restore one, or start "
                        "again with a new --run-dir")


def prepare_run(flags: dict, opts: RunOptions) -> Tuple[TrainConfig, List[Host], RunDir]:
    """Everything before launch: the one resolved config, its hosts, the checks of model, data and
    memory, and the run directory. Bad input stops here, with nothing launched."""
    cfg = resolve_config(flags, opts)
    reporting.check(opts.trackers)  # a missing tracker package: one line, before anything is written
    hosts, cfg = hosts_for(opts, cfg, flags)
    from mlx_train.planning import stages

    # --pipeline-stages auto becomes a number first (the global batch counts replicas); each stage's
    # share of the layers follows its host's memory, judged again on the hosts that stay.
    cfg = stages.resolve(cfg, hosts)
    hosts, cfg = leave_out_slow(opts, cfg, hosts, flags)
    cfg = stages.resolve(cfg, hosts)
    cfg = check_inputs(cfg)  # the data sets the vocabulary, so it comes before any memory judgement
    if opts.optimize_memory:  # judges the fit itself: a model that fits no device may be pipelined instead
        cfg = plan_for_budget(cfg, hosts)
    check_fits(cfg, hosts)
    from mlx_train.planning.planner import replica_warning, resolve_shard

    # Recorded in config.yaml, so the ranks run at the level planned for (TrainConfig.shard_level).
    cfg = replace(cfg, shard_level=resolve_shard(cfg, hosts) if cfg.dist.pipeline_stages == 1 else "none")
    warning = replica_warning(cfg, hosts)
    if warning:
        print(warning, flush=True)
    run = RunDir(opts.resume or opts.run_dir or RUNS_ROOT / new_run_id())
    if opts.resume:
        check_resumable(run)
    # The model and data reach every remote host (or one line names the host that cannot take them).
    hosts, shipped = ship.ship(cfg, hosts, opts.ship_cache, opts.ship_cache_days)
    run.prepare(cfg, resume=bool(opts.resume))
    for s in shipped:
        run.event(s.event_name, **s.event())
    return cfg, hosts, run


def start(flags: dict, opts: RunOptions) -> int:
    cfg, hosts, run = prepare_run(flags, opts)
    split = Split.of(cfg)
    where = ", ".join(f"{h.name} x{h.slots}" for h in hosts)
    # A pipeline's stages share their replica's rows: only replicas multiply the batch.
    replicas = split.devices // split.stages
    rows_from = (f"{replicas} replica{'s' * (replicas != 1)} of {split.stages} pipeline stages" if split.stages > 1
                 else f"{split.devices} devices")
    print(f"run {run.path}: {split.devices} ranks ({where}), backend {cfg.dist.backend}; global batch "
          f"{split.global_batch} = {rows_from} x {split}; {cfg.steps} steps", flush=True)
    start_step = 0
    if opts.resume:
        from mlx_train.rank.checkpoint import list_steps

        steps = list_steps(run.checkpoints)
        start_step = int(steps[-1].name.split("-")[1]) if steps else 0
    view = ProgressView(cfg.steps, start_step, live=opts.live)
    trackers = reporting.open_reporters(run, opts.trackers, cfg)
    sinks = [reporting.MetricsFile(run), *([trackers] if trackers else []), lambda _, record: view.metrics(record)]
    try:
        return Supervisor(cfg, run, hosts, Supervision.of(opts), view=view, oom=OomPolicy(), sinks=sinks).supervise()
    finally:
        if trackers is not None:
            trackers.close()
