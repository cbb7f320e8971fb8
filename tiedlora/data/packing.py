"""Sequence packing for training (``data.packing``): whole examples, first fit, thd buffers.

Without packing, a micro-batch is ``micro_batch_size`` examples right-padded to the
longest of them (to a fixed length under pipeline parallelism), so short examples carry
padding that is computed and thrown away. With packing, the examples one data-parallel
rank trains on in one optimizer step -- exactly the examples, in the same steps, that the
sampler gives it without packing -- are placed whole into *packs* of ``pack_length``
tokens, and each pack is one micro-batch::

    step's examples (this rank)    a a a | b b | c c c c c | d | e e e
    first fit into 8-token packs   [a a a b b d . .]  [c c c c c e e e]      (. = padding)

Examples are never split: one that does not fit in any open pack opens a new one.

Placement (:func:`plan_packs`): ``first_fit_shuffle`` (the default) takes the examples in
a shuffled order, ``first_fit_decreasing`` longest first; each goes into the first pack
with room for it, or opens a new one. The shuffle is drawn from ``trainer.seed`` and the
example indices themselves, so a step's packs depend only on which examples it has:
resuming from a checkpoint (the sampler's position) rebuilds the same packs.

A pack (:func:`collate_packed`) is one row: the examples one after the other, each with
its next-token labels, answer-only loss mask and positions counted from 0, then padding
(loss mask 0). Under pipeline parallelism every row is ``pack_length`` tokens (the stages
exchange one activation shape); otherwise a row ends at its examples' tokens rounded up to
a multiple of 8 (8 x TP under sequence parallelism), so a step's last, part-filled pack
computes no long tail of padding. ``cu_seqlens`` marks where each example
starts, for megatron's ``PackedSeqParams`` (``qkv_format='thd'``): attention never crosses
an example boundary and rotary positions restart at each example
(:mod:`tiedlora.models.attention`). The loss is the same sum of per-token losses over the
same supervised tokens as without packing, divided by the same global count, so packed
and unpacked training take the same steps (up to fp32 rounding).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

PACK_ALGORITHMS = ("first_fit_shuffle", "first_fit_decreasing")

__all__ = ["PACK_ALGORITHMS", "check_fits", "collate_packed", "first_fit", "pack_micro_batches", "plan_packs"]


def first_fit(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Place items (indices into ``lengths``) in the given order, each into the first bin
    with room for it, else a new bin; bins hold at most ``capacity``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit in a pack of {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def plan_packs(lengths: Sequence[int], capacity: int, algorithm: str, seed: int,
               key: Sequence[int] = ()) -> list[list[int]]:
    """Packs of indices into ``lengths`` (module docstring). ``key``: integers that name the
    set being packed (the example indices); with ``seed`` they seed the shuffle."""
    if algorithm not in PACK_ALGORITHMS:
        raise ValueError(f"data.pack_algorithm={algorithm!r}: expected one of {list(PACK_ALGORITHMS)}")
    if algorithm == "first_fit_decreasing":
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    else:
        order = np.random.default_rng([seed, *key]).permutation(len(lengths)).tolist()
    return first_fit(lengths, capacity, order)


def _row_length(n: int, pack_length: int, multiple_of: int | None) -> int:
    """A pack's row length for ``n`` tokens: ``pack_length`` (``multiple_of`` None: one
    shape for every pack), else n rounded up to ``multiple_of``, at most ``pack_length``."""
    if multiple_of is None:
        return pack_length
    return min(pack_length, -(-n // multiple_of) * multiple_of)


def collate_packed(examples: Sequence[Mapping[str, Any]], pad_id: int, pack_length: int,
                   multiple_of: int | None = None) -> dict:
    """One pack of :class:`tiedlora.data.sft.SFTDataset` items as a micro-batch of one row
    of s tokens: ``pack_length``, or with ``multiple_of`` the examples' tokens rounded up to
    a multiple of it (at most ``pack_length``; the padding after the last example is not
    computed).

    Returns ``tokens``, ``labels`` [1, s] int64, ``loss_mask`` [1, s] float32,
    ``position_ids`` [1, s] int64 (from 0 in every example; 0 on padding), ``cu_seqlens``
    int32 (example starts, then the end of the last one), ``cu_seqlens_padded`` (the same,
    ending at s: the padding belongs to the last example), ``max_seqlen`` (the longest
    padded example) and ``real_tokens`` (an int: tokens that are not padding).
    """
    need = sum(max(len(e["input_ids"]) - 1, 0) for e in examples)
    if need > pack_length:
        raise ValueError(f"collate_packed: examples of {need} tokens do not fit in a pack of {pack_length}")
    s = _row_length(need, pack_length, multiple_of)
    tokens = torch.full((1, s), pad_id, dtype=torch.long)
    labels = torch.full((1, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((1, s), dtype=torch.float32)
    position_ids = torch.zeros((1, s), dtype=torch.long)
    cu = [0]
    for e in examples:
        ids, mask = e["input_ids"], e["loss_mask"]
        n = len(ids) - 1
        if n <= 0:  # nothing to predict (as in unpacked collation)
            continue
        at = cu[-1]
        tokens[0, at:at + n] = torch.tensor(ids[:-1], dtype=torch.long)
        labels[0, at:at + n] = torch.tensor(ids[1:], dtype=torch.long)
        loss_mask[0, at:at + n] = torch.tensor(mask[1:], dtype=torch.float32)
        position_ids[0, at:at + n] = torch.arange(n)
        cu.append(at + n)
    if len(cu) == 1:
        raise ValueError("collate_packed: no example with a token to predict")
    padded = cu[:-1] + [s]
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "cu_seqlens_padded": torch.tensor(padded, dtype=torch.int32),
            "max_seqlen": int(max(b - a for a, b in zip(padded[:-1], padded[1:]))),
            "real_tokens": cu[-1]}


def check_fits(dataset, pack_length: int) -> None:
    """Refuse a ``pack_length`` shorter than an example of ``dataset`` (an SFTDataset)."""
    lengths = [len(dataset[i]["input_ids"]) - 1 for i in range(len(dataset))]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[longest] > pack_length:
        raise ValueError(f"data.pack_length={pack_length}: record {longest} (0-based) of {dataset.path} has "
                         f"{lengths[longest]} tokens to train on (a pack holds whole examples); use "
                         f"data.pack_length >= {lengths[longest]} or a smaller task.max_length")


def pack_micro_batches(dataset, indices: Sequence[int], pad_id: int, pack_length: int, algorithm: str,
                       seed: int, multiple_of: int | None = None) -> list[dict]:
    """The examples ``indices`` of ``dataset`` as packed micro-batches (one pack each), each
    ``pack_length`` tokens long or, with ``multiple_of``, cut after its examples
    (:func:`collate_packed`)."""
    lengths = [max(len(dataset[i]["input_ids"]) - 1, 0) for i in indices]
    packs = plan_packs(lengths, pack_length, algorithm, seed, key=indices)
    return [collate_packed([dataset[indices[j]] for j in pack], pad_id, pack_length, multiple_of) for pack in packs]
