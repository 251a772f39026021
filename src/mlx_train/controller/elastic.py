"""Elastic membership: which hosts a run uses now, which it left out, and when to take one back.

With `--min-devices N` a host that fails repeatedly (`FAIL_LIMIT` attempts in a row ended by it)
or cannot be reached when the group is relaunched is excluded (event `exclude`), as long as N
devices remain, and the run goes on on the rest from its last checkpoint. The global batch stays:
planning re-splits it over the devices left (per-device batch x accumulation, within the memory
budget), and the Batcher maps (seed, step) to the same samples for any split, so a resized run
trains on exactly the same data. Excluded hosts are probed with a growing cooldown (as Horovod
elastic's blacklist does); one that answers again is re-admitted at the next checkpoint (events
`readmit`, `resize`), up to `--max-devices`.

A resize also re-shares (event `reshare`): the shares and micro-batch caps a config names by rank
belong to hosts, so they follow the hosts. `--shares auto` measures again from equal shares (the
ranks' speeds on a new group are new); explicit weights keep each remaining host's weight and drop
the lost host's (a re-admitted host gets its own back); per-rank micro-batch caps (--optimize-memory
on hosts of unequal memory) stay with their hosts the same way.

A pipeline (--pipeline-stages S) re-plans its stages too (`restage`): the checkpoint holds the whole
model, so any split of the layers resumes from it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mlx_train.config import TrainConfig
from mlx_train.errors import UserError
from mlx_train.fleet.hosts import Host

FAIL_LIMIT = 2          # attempts in a row ended by the same host before it is excluded
COOLDOWN_S = 10.0       # first wait before an excluded host is probed; doubles per failed probe
MAX_COOLDOWN_S = 300.0
PROBE_TIMEOUT_S = 10.0


def reachable(host: Host) -> Tuple[bool, str]:
    """Can a rank be started there? A fresh ssh connection that runs the host's interpreter."""
    if host.local:
        return True, ""
    from mlx_train.fleet import ssh

    res = ssh.run(host.name, f"exec {host.python} -c pass", timeout=PROBE_TIMEOUT_S, fresh=True)
    return res.ok, "" if res.ok else res.why()


@dataclass
class _Out:
    host: Host
    reason: str
    cooldown: float
    next_probe: float
    probing: bool = False
    healthy: bool = False


class Membership:
    def __init__(self, hosts: List[Host], min_devices: Optional[int], max_devices: Optional[int] = None,
                 probe: Callable[[Host], Tuple[bool, str]] = reachable, clock: Callable[[], float] = time.monotonic):
        self.hosts = list(hosts)                  # in the cluster file's order, which sets rank order
        self.active = list(hosts)
        self.min_devices, self.max_devices = min_devices, max_devices
        self.probe, self.clock = probe, clock
        self.out: Dict[str, _Out] = {}
        self.failures: Counter = Counter()
        self.lock = threading.Lock()
        # Each host's --shares weights and micro-batch caps, by host name, as last seen: an excluded
        # host's are kept so that it gets them back when re-admitted.
        self.weights: Dict[str, Tuple[str, ...]] = {}
        self.caps: Dict[str, Tuple[int, ...]] = {}

    @property
    def enabled(self) -> bool:
        return self.min_devices is not None

    def devices(self, hosts: Optional[List[Host]] = None) -> int:
        return sum(h.slots for h in (self.active if hosts is None else hosts))

    # -- leaving ------------------------------------------------------------------------------------
    def blame(self, host: Optional[str]) -> Optional[str]:
        """An attempt ended because of `host`: the reason to exclude it, once it did so FAIL_LIMIT times in a row."""
        if not host or not any(h.name == host for h in self.active):
            return None
        for other in list(self.failures):
            if other != host:
                del self.failures[other]
        self.failures[host] += 1
        n = self.failures[host]
        return f"ended {n} attempts in a row" if n >= FAIL_LIMIT else None

    def progressed(self) -> None:
        """A checkpoint was written: earlier failures no longer count as 'in a row'."""
        self.failures.clear()

    def unreachable(self) -> List[Tuple[Host, str]]:
        """Active hosts that cannot be reached now (probed at once)."""
        results: List[Optional[Tuple[bool, str]]] = [None] * len(self.active)

        def one(i: int) -> None:
            results[i] = self.probe(self.active[i])

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(self.active))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(PROBE_TIMEOUT_S + 5)
        return [(h, r[1] if r else "no answer") for h, r in zip(self.active, results) if not (r and r[0])]

    def can_exclude(self, host: Host) -> bool:
        return self.devices([h for h in self.active if h.name != host.name]) >= (self.min_devices or 0) > 0

    def exclude(self, host: Host, reason: str) -> None:
        self.active = [h for h in self.active if h.name != host.name]
        self.failures.pop(host.name, None)
        self.out[host.name] = _Out(host, reason, COOLDOWN_S, self.clock() + COOLDOWN_S)

    # -- coming back ----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Probe, in the background, each excluded host whose cooldown is over."""
        now = self.clock()
        with self.lock:
            due = [o for o in self.out.values() if not o.probing and not o.healthy and o.next_probe <= now]
            for o in due:
                o.probing = True
        for o in due:
            threading.Thread(target=self._probe_one, args=(o,), daemon=True).start()

    def _probe_one(self, o: _Out) -> None:
        ok, _ = self.probe(o.host)
        with self.lock:
            o.probing, o.healthy = False, ok
            if not ok:
                o.cooldown = min(MAX_COOLDOWN_S, o.cooldown * 2)
                o.next_probe = self.clock() + o.cooldown

    def readmittable(self) -> List[Host]:
        """Excluded hosts that answered their last probe, as many as --max-devices leaves room for."""
        room = (self.max_devices or 1 << 30) - self.devices()
        with self.lock:
            ready = [o.host for o in self.out.values() if o.healthy]
        picked = []
        for h in ready:
            if h.slots <= room:
                picked.append(h)
                room -= h.slots
        return picked

    def readmit(self, host: Host) -> None:
        with self.lock:
            self.out.pop(host.name, None)
        names = {h.name for h in self.active} | {host.name}
        self.active = [h for h in self.hosts if h.name in names]


    def resplit(self, cfg: TrainConfig, before: Sequence[Host]) -> Tuple[TrainConfig, Optional[dict]]:
        """`cfg`, which ran on `before`, re-split over the active hosts and re-shared; with the
        `reshare` event's fields, or None when the run has nothing by rank to carry (equal shares,
        no caps). A UserError when no split fits."""
        self._remember(cfg, before)
        return reshare(resplit(cfg, self.active), cfg, self.active, self.weights, self.caps)

    def _remember(self, cfg: TrainConfig, hosts: Sequence[Host]) -> None:
        weights = cfg.dist.shares.split(",") if cfg.dist.share_weights() is not None else None
        for name, ws in by_host(weights, hosts).items():
            self.weights[name] = tuple(w.strip() for w in ws)
        self.caps.update(by_host(cfg.dist.micro_caps, hosts))


def by_host(values: Optional[Sequence], hosts: Sequence[Host]) -> Dict[str, tuple]:
    """Per-rank `values` (ranks on the hosts in blocks of their slots, as launch places them) by host
    name; empty for None."""
    if values is None:
        return {}
    out, first = {}, 0
    for h in hosts:
        out[h.name] = tuple(values[first:first + h.slots])
        first += h.slots
    return out


def reshare(new: TrainConfig, old: TrainConfig, hosts: Sequence[Host], weights: Dict[str, Tuple[str, ...]],
            caps: Dict[str, Tuple[int, ...]]) -> Tuple[TrainConfig, Optional[dict]]:
    """`new` (`old` re-split over `hosts`) with `old`'s shares and caps carried to `hosts` by host name
    (`weights`, `caps`: what each host had), and the `reshare` event's fields; None for a run with
    equal shares and no caps, which a resize leaves as it was. A host whose weight or cap is not known
    takes the whole run back to equal shares or uncapped micro-batches: a guess would be worse."""
    from dataclasses import replace

    explicit = old.dist.share_weights() is not None
    if old.dist.shares == "equal" and old.dist.micro_caps is None:
        return new, None
    names = [h.name for h in hosts]
    shares, note = new.dist.shares, []
    if explicit:
        if all(n in weights and len(weights[n]) == h.slots for n, h in zip(names, hosts)):
            shares = ",".join(w for n in names for w in weights[n])
            note.append("weights " + ", ".join(f"{n} {','.join(weights[n])}" for n in names))
        else:
            shares = "equal"
            note.append("a host's weight is not known: equal shares")
    elif old.dist.shares == "auto":
        note.append("auto: measured again from equal shares")
    micro_caps = None
    if old.dist.micro_caps is not None:
        if all(n in caps and len(caps[n]) == h.slots for n, h in zip(names, hosts)):
            micro_caps = tuple(c for n in names for c in caps[n])
            note.append("micro-batch caps " + ", ".join(f"{n} {','.join(map(str, caps[n]))}" for n in names))
        else:
            note.append("a host's micro-batch cap is not known: every rank the split's micro-batch")
    out = replace(new, dist=replace(new.dist, shares=shares, micro_caps=micro_caps))
    fields = {"hosts": names, "shares": shares, "micro_caps": list(micro_caps) if micro_caps else None,
              "note": "; ".join(note)}
    return out, fields


def resplit(cfg: TrainConfig, hosts: List[Host]) -> TrainConfig:
    """`cfg` for the devices of `hosts` with the same global batch, split by the memory planner (the
    run's own precision and checkpointing first); a UserError when no split fits."""
    from mlx_train.planning.planner import split_for

    if cfg.dist.pipeline_stages > 1:
        return restage(cfg, hosts)
    return split_for(cfg, hosts, keep_mode=True).split.apply(cfg)


def restage(cfg: TrainConfig, hosts: List[Host]) -> TrainConfig:
    """A pipeline's `cfg` for the devices of `hosts`, the same global batch: unpipelined (S = 1, data
    parallel, no bubble) when the planner fits the whole model on one device there; else the fewest
    stages S' (dividing the devices) whose every stage the per-stage memory model (planning/stages.py:
    the built-in GPT in fp32, no checkpointing, full training) fits in the budget; else, for a model
    it does not cover, the same S stages with fewer replicas when the devices divide by S (each stage
    keeps its layers and at most its micro-batch; 1F1B's activations in flight do not grow with the
    accumulation); else a UserError that says what the run needs."""
    import dataclasses

    from mlx_train.config import ModelKind, shard_level_of
    from mlx_train.planning.memory import RUNTIME_OVERHEAD, ModelShape
    from mlx_train.planning.planner import SPLIT_SAFETY, MemoryOptimizer, split_for
    from mlx_train.planning.stages import stage_memory
    from mlx_train.rank.device import rank_budget_for

    d, n = cfg.dist, sum(h.slots for h in hosts)
    stages, g = d.pipeline_stages, d.global_batch_size
    # Unpipelined, every device is a replica: the same global batch is n x (g / n) rows (split_for
    # re-splits it into micro-batches), and only when n divides it. Its shares are the pipeline's (equal
    # or auto, the only ones a pipeline takes): auto re-shares between the hosts once unpipelined.
    whole = dataclasses.replace(cfg, dist=dataclasses.replace(d, pipeline_stages=1, num_devices=n, shares=d.shares,
                                                              micro_caps=None, batch_size_per_device=max(g // n, 1),
                                                              gradient_accumulation=1))
    if g % n == 0:
        try:
            return split_for(whole, hosts, keep_mode=True).split.apply(whole)
        except UserError:
            pass
    budget = rank_budget_for(cfg, hosts)
    modelled = cfg.model.kind is ModelKind.GPT and cfg.precision == "fp32" and not cfg.grad_checkpoint \
        and cfg.fine_tune.mode == "full"

    def split(s: int) -> Optional[TrainConfig]:
        replicas = n // s
        if n % s or g % replicas:
            return None
        rows = g // replicas
        batch = max(b for b in range(1, min(d.batch_size_per_device, rows) + 1) if rows % b == 0)
        return dataclasses.replace(cfg, dist=dataclasses.replace(d, num_devices=n, pipeline_stages=s, micro_caps=None,
                                                                 batch_size_per_device=batch,
                                                                 gradient_accumulation=rows // batch))

    def fits(c: TrainConfig) -> bool:
        s, shape = c.dist.pipeline_stages, ModelShape.from_config(c.model)
        # As split_for judges a device: the peak and the runtime within SPLIT_SAFETY of budget + runtime.
        return s <= shape.n_layers and all(
            stage_memory(shape, s, i, c.dist.batch_size_per_device, c.dist.gradient_accumulation).total
            <= SPLIT_SAFETY * (budget + RUNTIME_OVERHEAD) for i in range(s))

    if modelled:
        for s in range(2, n + 1):
            c = split(s)
            if c is not None and fits(c):
                return c
    elif split(stages) is not None:
        return split(stages)
    one = dataclasses.replace(whole, dist=dataclasses.replace(whole.dist, batch_size_per_device=1))
    need = MemoryOptimizer.breakdown(one).total if shard_level_of(one) == "none" else None
    what = f"a multiple of {stages} devices (the global batch {g} split evenly over its replicas)" if not modelled \
        else f"more devices: no number of stages up to {n} fits every stage in the budget"
    raise UserError(f"{n} device{'s' * (n != 1)} remain{'s' * (n == 1)} for a pipeline of {stages} stages: it needs "
                    + what + (f", or {need / 2**20:.0f} MiB per device to train unpipelined (they have "
                              f"{budget / 2**20:.0f} MiB)" if need else "")
                    + ": bring a host back or resume with fewer --pipeline-stages on more memory")
