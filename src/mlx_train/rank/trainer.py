"""The training loop of one rank: build, restore, step, evaluate, report, checkpoint."""

from __future__ import annotations

import os
import sys
import time
import zlib
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_train.rank import blas, checkpoint, dataskip, hf, inject, lanes, sample
from mlx_train.rank.balance import Balancer, groups_of, spread
from mlx_train.rank.badstep import BadSteps, LossSpike
from mlx_train.rank.batcher import micro_batch_count, share_of, split_rows

from mlx_train import protocol
from mlx_train.events import Event
from mlx_train.config import DistributedConfig, ModelKind, TrainConfig, shard_level_of
from mlx_train.rank.data import load_corpus
from mlx_train.errors import UserError
from mlx_train.rank.model import build_model, count_parameters
from mlx_train.rank.step import Stepper, all_sum_bytes, current_lr, make_optimizer, pack, unpack


class Trainer:
    def __init__(self, cfg: TrainConfig, group: mx.distributed.Group, run_dir: str, memory_budget: int,
                 placed: Optional[dict] = None, hosts: Optional[List[int]] = None):
        self.cfg, self.group = cfg, group
        self.rank, self.size = group.rank(), group.size()
        if self.size != cfg.dist.num_devices:
            raise UserError(f"started with {self.size} ranks but the config asks for {cfg.dist.num_devices} devices")
        self.ckpt_root = Path(run_dir) / "checkpoints"
        self.memory_budget = memory_budget
        self.run_dir = Path(run_dir)
        # Read from this host's copies; self.cfg keeps the user's names (the run's identity).
        local = cfg.placed_at(placed or {})
        corpus = load_corpus(local.data, local.model)
        self.train = corpus.batcher("train", cfg.model.seq_len, cfg.seed)
        self.val = corpus.batcher("val", cfg.model.seq_len, cfg.seed + 1)
        self.train.require(cfg.dist.global_batch_size, "one global batch")
        self.val.require(self.size, "one validation sequence per device")
        # A small validation split may not fill the training batch size: evaluate with what fits.
        # (A pipeline's stages read their replica's rows: the validation set is split over the replicas.)
        # On hosts of unequal memory (micro_caps) this rank's micro-batch is its own cap, and evaluation
        # takes the smallest rank's, the same on every rank.
        caps = cfg.dist.micro_caps
        self.micros = list(caps) if caps else [cfg.dist.batch_size_per_device] * self.size  # by rank
        self.micro = self.micros[self.rank]
        eval_batch = min(cfg.dist.batch_size_per_device, *(caps or ()), self.val.n_windows // cfg.dist.replicas)
        self.val_dist = DistributedConfig(cfg.dist.replicas, eval_batch, 1, cfg.dist.backend)
        # Unequal shares (--shares W1,W2,...): this rank's window of every global batch; None is the
        # equal split's interleaved micro-batches. --shares auto starts equal and re-shares between
        # hosts (`hosts`: each rank's, the same list on every rank; None: all on one) from their
        # measured speeds (rank/balance.py); a host's ranks keep equal parts of its rows.
        weights = cfg.dist.share_weights()
        G = cfg.dist.global_batch_size
        # A pipeline's stages each work on their replica's rows: G / replicas a rank, not G / devices.
        self.set_rows([G // cfg.dist.replicas] * self.size if weights is None else split_rows(G, weights))
        # (Not a pipeline's: its replicas take equal shares, every stage of one the same rows. Nor one
        # host's: its ranks never re-share among themselves, so there is nothing to measure or gather.)
        hosts = list(hosts) if hosts is not None else [0] * self.size
        if len(hosts) != self.size:
            raise UserError(f"{len(hosts)} ranks' hosts given for {self.size} ranks")
        self.balancer = Balancer(G, self.gather_floats, hosts=hosts) \
            if cfg.dist.shares == "auto" and len(set(hosts)) > 1 and cfg.dist.pipeline_stages == 1 else None

        mx.random.seed(cfg.seed)  # the same seed on every rank gives the same initial weights
        # A pipeline's stage reads only its own layers' weights (rank/pipeline.py load_only).
        model, loss_fn = build_model(local.model, cfg.grad_checkpoint, cfg.fine_tune, lazy=cfg.dist.pipeline_stages > 1)
        self.adapter_config = hf.adapter_config(cfg.model.name, cfg.fine_tune, len(model.layers)) \
            if local.model.kind is ModelKind.PRETRAINED else None
        self.optimizer = make_optimizer(cfg.optim, cfg.steps)
        # The bytes each rank all-reduces per step: the trainable parameters' gradients.
        self.grad_bytes = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        self.cores = cores = blas.cores_of_rank()
        self.lanes = lanes.count(cfg.dist.cpu_threads, mx.default_device() == mx.cpu, cores,
                                 self.micro, self.grad_bytes, memory_budget)
        if self.lanes > 1:
            blas.set_threads(cores // self.lanes)  # each lane's matmuls on its share of the cores
        self.n_params = count_parameters(model)  # before the step may hold the parameters in slices
        shard = shard_level_of(cfg)  # planned before launch (planning/planner.resolve_shard)
        self.stepper = Stepper(model, loss_fn, self.optimizer, cfg.precision, cfg.optim.grad_clip, group,
                               bucket_bytes=all_sum_bytes(cfg.dist.backend, self.size, cores, self.grad_bytes),
                               lanes=self.lanes, shard=shard, backend=cfg.dist.backend) \
            if cfg.dist.pipeline_stages == 1 else self._pipeline(model)
        # The data splits over the replicas: a pipeline's stages all read their replica's rows.
        self.data_rank, self.data_dist = self.rank // cfg.dist.pipeline_stages, cfg.dist.data_view()
        self.faults = inject.Faults.from_env(self.stepper, self.rank)  # the tests' faults, off unless set
        self.bad_steps = BadSteps()
        self.spike = LossSpike(cfg.loss_spike)
        self.writer = checkpoint.Writer()  # rank 0 (and the mirror) write checkpoints beside the training loop
        self.mirror: Optional[int] = None  # the rank that writes a copy on other storage (find_stores)
        self.source = 0  # the rank whose values broadcast() sends: at restore, the checkpoint's holder
        self.pending: Optional[dict] = None  # what the write in progress is of
        self.tokens_per_step = cfg.dist.global_batch_size * cfg.model.seq_len
        # The embedded byte-level GPT shows a text sample at each evaluation (rank/sample.py).
        self.prompt = sample.prompt_from(corpus.val, cfg.model.seq_len) \
            if self.rank == 0 and cfg.model.kind is ModelKind.GPT and corpus.vocab_size == 256 else None
        self.say(f"rank {self.rank}/{self.size}: {self.n_params:,} parameters, {corpus.description}, "
                 f"BLAS: {blas.in_use()}; allocator: {blas.allocator_in_use()}; "
                 f"{self.lanes} thread{'s' if self.lanes > 1 else ''} per micro-batch (--cpu-threads)")
        if caps:
            self.say(f"rank {self.rank}: {self.share.rows} rows of every global batch as micro-batches of "
                     f"{', '.join(map(str, self.share.micro))} (its memory's cap: {self.micro})")

    def _pipeline(self, model):
        """--pipeline-stages S: this rank's stage of the model (rank/pipeline.py), which answers the
        Stepper's calls; no lanes (one thread), no --shard."""
        from mlx_train.rank.pipeline import Pipeline

        self.lanes = 1
        blas.set_threads(self.cores)
        return Pipeline(model, self.optimizer, self.cfg.precision, self.cfg.optim.grad_clip, self.group,
                        self.cfg.dist.pipeline_stages, weights=self.cfg.dist.stage_weights, backend=self.cfg.dist.backend)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def set_rows(self, rows: List[int]) -> None:
        """Each rank's rows of every global batch. Equal rows keep the equal split's interleaved
        micro-batches (None), so equal shares are the equal split's bits whichever way they came;
        per-rank micro-batch caps always cut windows (each rank's own micro-batch)."""
        self.rows = [int(r) for r in rows]
        # `full` gathers each block's weights and reduce-scatters its gradients in every micro-batch:
        # a rank with fewer micro-batches than another would leave it waiting in a collective forever.
        count = micro_batch_count(self.rows, self.micros) if shard_level_of(self.cfg) == "full" else 0
        self.share = None if len(set(self.rows)) == 1 and not self.cfg.dist.micro_caps else \
            share_of(self.rank, self.rows, self.micro, count)

    def gather_floats(self, mine: List[float]) -> List[List[float]]:
        """Every rank's `mine`, by rank (one small all_gather: the same bytes on every rank)."""
        out = mx.distributed.all_gather(mx.array(mine, dtype=mx.float32), group=self.group)
        return np.array(out).reshape(self.size, len(mine)).tolist()

    def reshare(self, step: int) -> None:
        """--shares auto, at the end of a step: maybe a new split, the same one on every rank."""
        measured = self.balancer.after(step, self.rows)
        if measured is None or measured.chosen is None:
            return
        if self.rank == 0:
            self.say(f"shares after step {step}: rows {self.rows} -> {measured.chosen} "
                     f"(measured rows/s per rank by host: "
                     f"{', '.join(f'{s:.1f}' for s in measured.speeds)}; fixed s/step: "
                     f"{', '.join(f'{f:.3f}' for f in measured.fixed or [])})")
        self.set_rows(measured.chosen)

    def run(self, resume: bool = False, stop_after: Optional[int] = None) -> None:
        cfg = self.cfg
        stores = self.find_stores()
        # The lowest rank on storage other than rank 0's writes the same files there too: a host lost
        # with its disk (rank 0's or the mirror's) leaves every checkpoint on the other.
        self.mirror = next((r for r in stores if r != 0), None)
        if self.rank == 0 and self.mirror is not None:
            self.say(f"checkpoints: rank 0 and rank {self.mirror} (a mirror on other storage) write each one")
        step = self.restore(stores) if resume else 0
        protocol.emit(protocol.Start(step=step, steps=cfg.steps, params=self.n_params,
                                     global_batch=cfg.dist.global_batch_size))
        window: List[tuple] = []
        while step < cfg.steps:
            t0 = time.perf_counter()
            # MLX has no setter for its global RNG state, so make it a function of (seed, step,
            # rank): a resumed run then draws exactly what the uninterrupted one would have.
            mx.random.seed((cfg.seed * 1_000_003 + step) * 1_009 + self.rank)
            data = dataskip.data_step(cfg.skip_data, step)  # past the data of earlier bad-step rollbacks
            limit = self.spike.limit()
            batches = list(self.train.micro_batches(data, self.data_rank, self.data_dist) if self.share is None
                           else self.train.window(data, cfg.dist.global_batch_size, self.share))
            # Each micro-batch weighs its counted target tokens over the global batch's, so the
            # ranks' summed gradients are the global token mean's whatever each rank's share.
            counts = [int((y >= 0).sum()) for _, y in batches]
            tokens = (counts, self.train.tokens_in_step(data, self.data_dist))
            stats = self.faults.around_step(step, data, resume,
                                            lambda: self.stepper.step(batches, loss_limit=limit, tokens=tokens))
            self.spike.observe(stats.loss, stats.skipped)
            if self.balancer is not None:
                self.balancer.observe(stats.grad_s, self.rows[self.rank], stats.compute_s - stats.grad_s)
            step += 1
            self.bad_steps.after(step, stats, self.rank, data_step=data, loss_limit=limit)
            if self.bad_steps.in_a_row >= protocol.ROLLBACK_AFTER_BAD_STEPS:  # every rank alike (agreed flag)
                self.finish_write(block=True)  # a checkpoint from before the bad steps: the rollback's target
                sys.stdout.flush()
                sys.exit(protocol.EXIT_ROLLBACK)  # the supervisor rolls back; no checkpoint of this state
            self.finish_write(block=False)  # report a checkpoint written in the background as soon as it is
            step_s = time.perf_counter() - t0
            window.append((step_s, stats, tokens[1], sum(counts) / max(tokens[1], 1)))
            protocol.emit(protocol.Heartbeat(step=step, peak=mx.get_peak_memory(), step_s=step_s))
            val_loss = text = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                protocol.emit(protocol.Phase("eval", step))  # longer than a step: the watchdog allows for it
                val_loss = self.validate()
                if self.prompt is not None and not self.stepper.spread.collective_backward:  # (full: not alone)
                    text = sample.generate(self.stepper.model, self.prompt, cfg.model.seq_len, cfg.seed)
                protocol.emit(protocol.Phase("eval", step, done=True))
            if step % cfg.log_every == 0 or step == cfg.steps or val_loss is not None:
                self.log(step, window, val_loss, text)
                window = []
            if self.balancer is not None:  # before the checkpoint: it records the shares of the steps after it
                self.reshare(step)
            self.check_memory_budget(step)
            stopping = stop_after is not None and step >= stop_after
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping:
                self.save(step)
            if stopping:
                self.finish_write(block=True)
                protocol.emit(protocol.Stopped(step=step))
                return
        self.finish_write(block=True)
        protocol.emit(protocol.Done(step=step))

    # -- reporting ---------------------------------------------------------------------------------
    def validate(self) -> float:
        batches = (self.val.batch(i, 0, self.data_rank, self.val_dist) for i in range(self.cfg.eval_batches))
        self.stepper.model.eval()  # no dropout (--lora-dropout) while validating
        if self.lanes > 1:  # this thread alone: its matmuls get all of the rank's cores back
            blas.set_threads(self.cores)
        local = self.stepper.evaluate(batches)
        mx.eval(local)
        if self.lanes > 1:
            blas.set_threads(self.cores // self.lanes)
        self.stepper.model.train()
        return float(self.all_mean(local).item())

    def all_mean(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) / self.size if self.size > 1 else x

    def all_sum(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=self.group) if self.size > 1 else x

    def log(self, step: int, window: List[tuple], val_loss: Optional[float], text: Optional[str] = None) -> None:
        # The global batch's token mean: each rank's mean weighted by its part of the tokens.
        _, last, _, part = window[-1]
        loss = float(self.all_sum(mx.array(last.loss * part)).item()) if self.cfg.dist.pipeline_stages == 1 \
            else last.loss  # a pipeline's step reports the global loss on every rank already
        checksum = self.param_checksum()
        # Every rank's own report is what the divergence check judges (controller/divergence.py).
        protocol.emit(protocol.Checksum(step=step, value=checksum))
        step_time = sum(w[0] for w in window) / len(window)
        compute_s = sum(w[1].compute_s for w in window) / len(window)
        comm_s = sum(w[1].comm_s for w in window) / len(window)
        # Each rank's own compute and sync times travel in the same gather (microseconds).
        idle_s = sum(w[1].idle_s for w in window) / len(window)  # a pipeline stage's waits in its schedule
        mine = mx.array([mx.get_peak_memory(), checksum, round(compute_s * 1e6), round(comm_s * 1e6),
                         round(idle_s * 1e6)], dtype=mx.int64)
        everyone = np.array(mx.distributed.all_gather(mine, group=self.group) if self.size > 1 else mine).reshape(-1, 5)
        ranks_compute, ranks_comm = everyone[:, 2] / 1e6, everyone[:, 3] / 1e6
        record = {
            "step": step, "loss": loss, "lr": current_lr(self.optimizer),
            # Real tokens only: padding and masked prompts are not counted.
            "tokens_per_s": sum(w[2] for w in window) / sum(w[0] for w in window), "step_time_s": step_time,
            "comm_time_s": comm_s, "compute_time_s": compute_s,
            "rank_compute_s": [float(v) for v in ranks_compute], "rank_comm_s": [float(v) for v in ranks_comm],
            # A sync lasts until the slowest rank joins it: what a rank's took beyond the quickest's is waiting.
            "rank_wait_s": [float(v) for v in ranks_comm - ranks_comm.min()],
            "grad_norm": window[-1][1].grad_norm, "devices": self.size, "grad_bytes": self.grad_bytes,
            "scattered_bytes": self.stepper.spread.scattered_bytes, "gathered_bytes": self.stepper.spread.gathered_bytes,
            "global_batch": self.cfg.dist.global_batch_size, "rows": self.rows,
            "peak_memory": [int(v) for v in everyone[:, 0]],
            "param_checksum": [int(v) for v in everyone[:, 1]],
        }
        if self.cfg.dist.pipeline_stages > 1:
            record["stage_idle_s"] = [float(v) for v in everyone[:, 4] / 1e6]
        if self.rank == 0:
            protocol.emit(protocol.Metrics(**record, val_loss=val_loss, sample=text))

    def param_checksum(self) -> int:
        """The crc32 of the whole parameters, keys sorted (every rank calls this). Where the step
        holds them in slices (`full`) it is combined from each owner's crcs of its slices
        (Spread.owned_checksum: no parameter gathered); elsewhere every rank checksums its replica,
        which the divergence check compares across ranks."""
        owned = getattr(self.stepper.spread, "owned_checksum", None)
        value = owned() if owned is not None else None
        if value is not None:
            return value
        crc = 0
        for _, v in sorted(tree_flatten(self.stepper.whole_params()), key=lambda kv: kv[0]):
            crc = zlib.crc32(checkpoint.bytes_of(v), crc)
        return crc

    def check_memory_budget(self, step: int) -> None:
        budget, peak = self.memory_budget, mx.get_peak_memory()
        if peak > budget:
            # Stop with our own code while we still can: the OS would SIGKILL us (Linux) or the
            # Metal driver abort us, and the supervisor then has less to go on.
            protocol.emit(protocol.OutOfMemory(rank=self.rank, step=step, peak=peak, budget=budget))
            self.finish_write(block=True)
            sys.stdout.flush()
            sys.exit(protocol.EXIT_OUT_OF_MEMORY)

    # -- checkpoints -------------------------------------------------------------------------------
    def find_stores(self) -> List[int]:
        """The ranks that keep checkpoints on storage of their own, lowest first: for each storage
        its lowest rank (ranks on one host, or on hosts sharing the run directory's disk, count
        once). Each rank leaves a mark of this launch in its checkpoints directory and the ranks
        say which marks they see: a few bytes in collectives, no socket of our own."""
        if self.size == 1:
            return [0]
        nonce = int.from_bytes(os.urandom(4), "little") >> 1 if self.rank == 0 else 0
        nonce = int(self.broadcast(mx.array(nonce, dtype=mx.int64)).item())
        mark = checkpoint.mark_here(self.ckpt_root, nonce, self.rank)
        mx.eval(self.all_sum(mx.array(1)))  # every mark is down before any is looked for
        first = checkpoint.first_here(self.ckpt_root, nonce, self.size) if mark is not None else -1
        seen = np.array(mx.distributed.all_gather(mx.array([first], dtype=mx.int64), group=self.group)).tolist()
        if mark is not None:  # every rank has looked (the gather): the marks can go
            mark.unlink(missing_ok=True)
        return [r for r, first in enumerate(seen) if first == r]

    def save(self, step: int) -> None:
        """Checkpoint `step`: every rank's checksum goes with it; rank 0 (and the mirror, on its own
        storage) writes the files piece by piece as the pieces come, in the background
        (finish_write reports it). The mirror's pieces are the ones every rank receives anyway."""
        t0 = time.perf_counter()
        keep = self.rank == 0 or self.rank == self.mirror
        if keep:
            # One write at a time: the previous one ends first. Only that wait is announced to the
            # watchdog as a checkpoint phase (handing the pieces over takes about a step), so the
            # allowance it learns comes from waits and writes, never from the hand-over alone.
            t_wait = time.perf_counter()
            self.finish_write(block=True)  # (the wait counts to the previous checkpoint's stall)
            t0 += time.perf_counter() - t_wait
            handoff = checkpoint.Handoff()
            # The files' layouts (MLX's, byte for byte) from the layouts, before any piece: the
            # optimizer's in the unsharded layout, whatever the level.
            flat = [tree_flatten(self.stepper.param_layout()), tree_flatten(self.stepper.optimizer_layout())]
            layouts = {name: checkpoint.file_layout([(k, tuple(v.shape), v.dtype) for k, v in pairs])
                       for name, pairs in zip(("model", "optimizer"), flat)}
            del flat
            self.pending = {"step": step, "handoff": handoff}
            self.writer.start(lambda: self._write(step, layouts, handoff))
        # Every rank's checksum goes with the checkpoint: one written while the ranks disagreed
        # is never resumed from (a silent divergence would be saved with it). Each rank's running
        # loss mean (--loss-spike) travels in the same gather.
        # The whole parameters and optimizer state come piece by piece (fully sharded: one group
        # gathered at a time, every rank in each gather); every rank takes each leaf's crc, rank 0
        # hands each piece to its writer and drops it once written: it holds at most two, the
        # one being written and the next being gathered.
        try:
            crcs = {}
            for pairs, moments in self.stepper.whole_pieces():
                for k, v in pairs:
                    crcs[k] = checkpoint.leaf_crc(v)
                if keep:
                    handoff.give((checkpoint.snapshot(dict(pairs)), checkpoint.snapshot(dict(moments))))
                del pairs, moments
            checksum = checkpoint.combined_crc(crcs[k] for k in sorted(crcs))  # = param_checksum of the whole
            protocol.emit(protocol.Checksum(step=step, value=checksum))
            mine = mx.array([checksum, *self.spike.state()], dtype=mx.int64)
            everyone = np.array(mx.distributed.all_gather(mine, group=self.group) if self.size > 1 else mine)
        except BaseException:
            if keep:
                handoff.end(None)  # the writer removes what it wrote and ends
            raise
        if not keep:
            return
        everyone = everyone.reshape(-1, 3)
        sums = [int(v) for v in everyone[:, 0]]
        agreed = len(set(sums)) == 1
        # The rows in force are those of the steps after this one (--shares auto re-shared before it).
        meta = {"identity": self.cfg.identity(), "param_checksum": sums, "agreed": agreed,
                "skip_data": self.cfg.skip_data, "loss_mean": [[int(b), int(n)] for b, n in everyone[:, 1:]],
                "shares": self.cfg.dist.shares, "rows": self.rows}
        handoff.end(meta)
        # The last piece stays with the training thread until the write is over (the writer thread
        # frees no array).
        self.pending.update(agreed=agreed, sums=sums, stall_s=time.perf_counter() - t0)

    def _write(self, step: int, layouts: dict, handoff: checkpoint.Handoff) -> tuple:
        """The writer thread's job: the checkpoint from the pieces handed over, then the adapters
        (pretrained models). Returns (the checkpoint's path, why the adapters could not be written
        or None)."""
        stream, failed = None, None
        try:
            stream = checkpoint.Stream(self.ckpt_root, step, layouts)
        except BaseException as exc:  # noqa: BLE001 - reported once every piece is taken
            failed = exc
        for params, state in handoff.pieces():  # to the end, whatever happens: the trainer waits on it
            if stream is not None and failed is None:
                try:
                    stream.put("model", params.items())
                    stream.put("optimizer", state.items())
                except BaseException as exc:  # noqa: BLE001 - reported once every piece is taken
                    stream.abort()
                    failed = exc
            del params, state
        if failed is not None:
            raise failed
        if handoff.meta is None:
            stream.abort()
            raise checkpoint.WriteFailed(f"{checkpoint.step_name(step)}: the save was cut short")
        self.faults.before_write()
        path = stream.close(handoff.meta, self.cfg.keep_checkpoints)
        if self.adapter_config is None:  # results in mlx-lm's layout (hf.py) for pretrained models only
            return path, None
        # The adapters' weights are the checkpoint's model.safetensors, byte for byte (the same
        # trainable tree, written as mx.save_safetensors writes it): copied, not held.
        try:
            if self.cfg.fine_tune.mode != "full":  # a full model's weights are the checkpoint itself
                hf.write_adapters(path / "adapters", None, self.adapter_config, weights=path / "model.safetensors")
            hf.write_adapters(self.run_dir / "adapters", None, self.adapter_config, weights=path / "model.safetensors")
        except checkpoint.WriteFailed as exc:
            return path, str(exc)
        return path, None

    def finish_write(self, block: bool) -> None:
        """Report the background write once it is over (rank 0): its checkpoint, or why it failed.
        With block, wait for it, announced to the watchdog as a checkpoint phase: it allows 120 s
        until a write was timed, then 5 x the slowest recent one (the supervisor tells it the
        writes' times), so a rank stuck in a write is stopped like any stuck rank and a slow write
        is not mistaken for one."""
        t0 = time.perf_counter()
        waiting = block and self.writer.busy
        if waiting:
            protocol.emit(protocol.Phase("checkpoint", self.pending["step"]))
        done = self.writer.finish(block)
        if waiting:
            protocol.emit(protocol.Phase("checkpoint", self.pending["step"], done=True))
        if done is None:
            return
        outcome, write_s = done
        p, self.pending = self.pending, None
        stall_s = p.get("stall_s", 0.0) + (time.perf_counter() - t0 if block else 0.0)
        if isinstance(outcome, checkpoint.WriteFailed):
            # Disk full, no permission, a read-only mount: the previous checkpoints are intact and
            # training goes on; the next interval tries again.
            self._write_failed(p["step"], outcome)
            return
        if isinstance(outcome, BaseException):
            raise outcome
        path, adapters_failed = outcome
        protocol.emit(protocol.Checkpoint(step=p["step"], path=str(path), agreed=p["agreed"], param_checksum=p["sums"],
                                          stall_s=round(stall_s, 4), write_s=round(write_s, 4)))
        if adapters_failed:
            protocol.emit(protocol.RankWarning(Event.CHECKPOINT_FAILED, {"step": p["step"], "reason": (
                f"adapters not written: {adapters_failed}; the checkpoint {path.name} itself is intact, training goes "
                "on and the next checkpoint interval tries again")}))

    def _write_failed(self, step: int, exc: Exception) -> None:
        kept = checkpoint.list_steps(self.ckpt_root)
        copy = "" if self.rank == 0 else f"the mirror's copy (rank {self.rank}): "
        protocol.emit(protocol.RankWarning(Event.CHECKPOINT_FAILED, {"step": step, "reason": (
            f"{copy}{exc}; {'the newest checkpoint is still ' + kept[-1].name if kept else 'no checkpoint yet'}, "
            "training goes on and the next checkpoint interval tries again")}))

    def restore(self, stores: Optional[List[int]] = None) -> int:
        """Load the newest intact checkpoint and hand it to every rank; return its step.

        Each storage's lowest rank (`stores`: rank 0's, and another host's own disk) looks for its
        newest intact checkpoint; the one with the newest (rank 0 on a tie) is the holder, which
        reads it. So a run relaunched after rank 0's host was lost with its disk resumes from the
        mirror's copy wherever that rank now is.

        MLX has no broadcast, so the holder contributes the values and the others -0.0 to an all_sum
        (x + -0.0 == x bit for bit, signed zeros included), which keeps resumption exact: one per
        piece of the step's (Spread.piece_keys; at `full` a group's parameters or one moment).
        """
        found, mismatch = None, 0
        if self.rank in (stores or [0]):
            checkpoint.remove_temporaries(self.ckpt_root)  # writes in the background may have been cut short
            result = checkpoint.load_latest(self.ckpt_root)
            for path, reason in result.skipped:
                protocol.emit(protocol.RankWarning(Event.CHECKPOINT_DAMAGED, {"path": path, "reason": reason}))
            found = result.checkpoint
            if found is not None:
                mismatch = checkpoint.identity_mismatch(found.meta, self.cfg.identity())
        header = [found.step + 1 if found else 0, mismatch]
        if self.size > 1:
            everyone = np.array(mx.distributed.all_gather(mx.array(header, dtype=mx.int64), group=self.group))
            everyone = everyone.reshape(self.size, 2).tolist()
            self.source = max(range(self.size), key=lambda r: (everyone[r][0], -r))
            header = everyone[self.source]
        if self.rank != self.source:
            found = None  # an older copy on other storage: the holder's is sent
        step, mismatch = header
        step -= 1
        if mismatch:
            # Every rank learns the verdict, so each exits with the same one-line error.
            raise UserError(f"{self.ckpt_root}/{checkpoint.step_name(step)} belongs to a different run "
                            f"({checkpoint.describe_mismatch(mismatch, self.cfg.identity())}): resume it with "
                            "the config it was written with, or start a new --run-dir")
        if step < 0:
            if self.rank == 0:
                protocol.emit(protocol.Resumed(step=0))
            self.source = 0
            return 0
        # Keep the model's own key order: gradient clipping sums the leaves in tree order, and a
        # different order rounds the norm differently, which would break exact resumption.
        params = dict(tree_flatten(self.stepper.param_layout()))
        # The unsharded layout (a sharded step slices its part out of it in load).
        state = {k: v for k, v in tree_flatten(self.stepper.optimizer_layout()) if k not in ("step", "learning_rate")}
        if found is not None:  # popped: a piece read from the file (lazily) is dropped once sent
            params = {k: found.model.pop(k) for k in params}
            state = {k: found.optimizer.pop(k) for k in state}

        def pieces():
            # One all_sum per piece (fully sharded: a group's parameters, or one of its moments),
            # dropped before the next is sent.
            for keys in self.stepper.piece_keys():
                values = [params.pop(k) if k in params else state.pop(k) for k in keys]
                piece = dict(zip(keys, unpack(self.broadcast(pack(values)), values)))
                del values
                yield piece
                del piece

        extra = {"step": mx.array(step, dtype=mx.uint64), "learning_rate": self.optimizer.state["learning_rate"]}
        self.stepper.load_pieces(pieces(), extra)
        mx.eval(self.stepper.params, self.optimizer.state)
        self.restore_loss_mean(found.meta if found is not None else {})
        self.restore_rows(found.meta if found is not None else {})
        if self.rank == self.source:  # the supervisor names the host it came from (another's than rank 0's)
            protocol.emit(protocol.Resumed(step=step, checkpoint=str(found.path)))
        self.source = 0
        return step

    def restore_loss_mean(self, meta: dict) -> None:
        """Each rank's running loss mean (--loss-spike) as the checkpoint recorded it. A checkpoint of
        another number of ranks (an elastic resize) holds no mean for this split: warm up afresh."""
        saved = meta.get("loss_mean") if self.rank == self.source else None
        rows = saved if isinstance(saved, list) and len(saved) == self.size else [[0, 0]] * self.size
        mine = self.broadcast(mx.array(rows, dtype=mx.int64)).tolist()[self.rank]
        self.spike.load(*mine)

    def restore_rows(self, meta: dict) -> None:
        """--shares auto: the rows the checkpoint was written under, so the steps after it are the
        uninterrupted run's. Another number of ranks, rows of another global batch, or rows that one
        host's ranks here would not share equally (written on other hosts) start equal and measure
        again."""
        if self.balancer is None:
            return
        saved = meta.get("rows") if self.rank == self.source else None
        G, hosts = self.cfg.dist.global_batch_size, self.balancer.hosts
        ok = isinstance(saved, list) and len(saved) == self.size and all(isinstance(r, int) and r > 0 for r in saved) \
            and sum(saved) == G and spread([sum(saved[r] for r in g) for g in groups_of(hosts)], hosts) == saved
        rows = saved if ok else [G // self.size] * self.size
        self.set_rows(self.broadcast(mx.array(rows, dtype=mx.int64)).tolist())

    def broadcast(self, x: mx.array) -> mx.array:
        """`x` as rank `self.source` (rank 0 but while restoring) holds it, on every rank."""
        if self.size == 1:
            return x
        mine = x if self.rank == self.source else mx.full(x.shape, -0.0 if mx.issubdtype(x.dtype, mx.floating) else 0, x.dtype)
        return mx.distributed.all_sum(mine, group=self.group)
