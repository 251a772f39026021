"""The memory model of one pipeline stage (rank/pipeline.py): what `mx.get_peak_memory()` shows on
stage s of S during a step of M micro-batches, from the one-device model's terms (memory.py).

A stage holds its own layers' weights and AdamW state (the first stage also the embeddings, the last
the final norm and the head), a gradient accumulator over the micro-batches, and the activations of
the micro-batches in flight: 1F1B keeps at most min(S - s, M) forwards waiting for their backward,
each with its layers' saved activations and its input (the last stage runs each forward and its
backward in one evaluation, so one). Checked against real ring ranks by bench/pipeline_memory.py
(docs/pipeline.md, "Memory per stage").
"""

from __future__ import annotations

from mlx_train.planning.memory import (ACTIVATIONS, LOGITS_FP32_COPIES, OPTIMIZER_STATE_COPIES, RUNTIME_OVERHEAD,
                                       UPDATE_TEMPORARIES, UPDATE_WEIGHT_AND_GRAD_COPIES, MemoryBreakdown,
                                       ModelShape)


def stage_params(shape: ModelShape, layers: int, first: bool, last: bool) -> int:
    """The built-in GPT's parameters on a stage of `layers` blocks (ModelShape.n_params, split)."""
    d, v = shape.d_model, shape.vocab_size
    return layers * (12 * d * d + 9 * d) + (first and (v + shape.seq_len) * d) + (last and (v * d + 2 * d))


def stage_memory(shape: ModelShape, stages: int, stage: int, batch: int, micro: int, checkpointing: bool = False,
                 optimizer: str = "adamw") -> MemoryBreakdown:
    """Predicted peak of one fp32 pipelined step on `stage` of `stages` (equal layer weights), `micro`
    micro-batches of `batch` sequences."""
    from mlx_train.rank.pipeline import stage_layers

    layers = len(stage_layers(shape.n_layers, [1.0] * stages)[stage])
    first, last = stage == 0, stage == stages - 1
    p = 4 * stage_params(shape, layers, first, last)
    state = OPTIMIZER_STATE_COPIES[optimizer] * p
    tokens = batch * shape.seq_len
    d = tokens * shape.d_model
    s = batch * shape.n_heads * shape.seq_len * shape.seq_len
    (saved_d, saved_s), (live_d, live_s) = ACTIVATIONS[bool(checkpointing)]
    one = 4 * (layers * (saved_d * d + saved_s * s) + d)  # its layers' saved tensors and its input
    in_flight = 1 if last else min(stages - stage, micro)
    head = 4 * LOGITS_FP32_COPIES[bool(checkpointing)] * tokens * shape.vocab_size if last else 0
    activations = int(in_flight * one + 4 * (live_d * d + live_s * s) + head)
    accumulator = p if micro > 1 else 0
    backward_peak = p + state + accumulator + activations
    largest = max(4 * shape.d_model * shape.d_model, shape.vocab_size * shape.d_model if first or last else 0)
    update_peak = int((UPDATE_WEIGHT_AND_GRAD_COPIES + OPTIMIZER_STATE_COPIES[optimizer]) * p
                      + UPDATE_TEMPORARIES * 4 * largest)
    peak = max(backward_peak, update_peak)
    return MemoryBreakdown(
        parameters=p, gradients=p + accumulator, optimizer_state=state, activations=activations,
        optimizer_step=max(0, update_peak - (2 * p + state)), runtime_overhead=RUNTIME_OVERHEAD,
        backward_peak=backward_peak, update_peak=update_peak, peak=peak, total=peak + RUNTIME_OVERHEAD,
        peak_phase="backward" if backward_peak >= update_peak else "update")
