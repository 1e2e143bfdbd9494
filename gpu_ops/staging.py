"""A prompt's CPU-resident routed experts streamed to the GPU and run there (the GPU road).

A long prompt chunk uses nearly every routed expert of every layer (with A of E experts per
token, a chunk of T tokens leaves an expert unused with probability (1 - A/E)^T: 1% for R1 at
143 tokens). Its experts can run on the CPU, bound by the CPU's integer throughput, or be
copied over PCIe and run on the GPU, bound by the copy; the planner picks by chunk size
(placement.predict: the crossover). This module is the second road.

Every layer's experts are copied whole, in a fixed order: layer by layer, each layer's stacks
in units of whole experts that fit one staging slot. A fixed order is what lets the copy of
the next unit, the next layer's first one included, start while this unit computes: the next
layer's routing is not known until its attention has run, and at the chunk sizes where this
road wins, copying only the used experts would save a few percent. Two slots, each a pinned
host buffer and a device buffer: the host fills one pinned buffer from the file's pages while
the other's copy is in flight and the GPU computes the unit before it.

On the device the GGUF blocks are dequantized by the reference dequantizers (bit-identical to
gguf's) one used expert at a time, each matrix in calls of at most DEQUANTIZE_CHUNK_VALUES
values (their temporaries, up to DEQUANTIZE_BYTES a value, stay bounded), and multiplied in
float32: every quant type runs, and nothing is repacked on the host (the GPU formats' numpy
repack runs at 0.06-0.5 GB/s on one core, a fraction of PCIe's rate). A fused kernel that
dequantizes as it multiplies would cut both the device traffic and the launches.
The CPU standing in for the GPU runs the same code with synchronous copies (gpu_ops.graphs).
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpu_ops.graphs import CopyStream, host_buffer
from modelfile.quants.types import dequantize

SLOT_BYTES = 64 << 20  # GGUF bytes per copy: 2.7 ms of PCIe 4.0, a few experts of R1
DEQUANTIZE_CHUNK_VALUES = 4 << 20  # values per dequantization call: R1's expert matrices in 4
DEQUANTIZE_BYTES = 96  # device bytes a value's dequantization allocates at most (IQ2_XXS 92, K-quants 26-37)


def expert_bytes(stacks) -> int:
    """GGUF bytes of one expert's gate, up and down rows."""
    return sum(raw.shape[1] * raw.shape[2] for raw, _, _ in stacks)


def slot_bytes(per_expert: int, layer_bytes: int) -> int:
    """A staging slot: SLOT_BYTES, at least one expert, at most a whole layer's experts."""
    return max(per_expert, min(SLOT_BYTES, layer_bytes))


def staging_bytes(per_expert: int, n_expert: int, matrix_values: int) -> tuple[int, int]:
    """(device bytes, pinned host bytes) the road holds for experts of up to `per_expert` GGUF
    bytes (n_expert a layer, their largest matrix `matrix_values` values): two slots on each
    side, and on the device one expert's three matrices in float32 plus one dequantization
    call's temporaries."""
    slot = slot_bytes(per_expert, per_expert * n_expert)
    temporaries = min(matrix_values, DEQUANTIZE_CHUNK_VALUES) * DEQUANTIZE_BYTES
    return 2 * slot + 3 * matrix_values * 4 + temporaries, 2 * slot


@dataclass(frozen=True)
class Unit:
    """One copy: experts [first, stop) of layer bank `bank`, at these offsets in a slot."""

    bank: int
    first: int
    stop: int
    offsets: tuple[int, int, int]  # where gate, up and down start in the slot
    nbytes: int


class ExpertStream:
    """The routed experts of the layers given (in the order a pass reaches them), streamed to
    `device` through two staging slots."""

    def __init__(self, banks: list, device: torch.device):
        """banks: per layer, the (raw uint8 [E, rows, row_bytes], qtype, in_features) of gate,
        up and down (the GGUF stacks, usually views of the file map)."""
        self.banks = [tuple((np.asarray(r), q, k) for r, q, k in b) for b in banks]
        self.device = device
        per_expert = max(expert_bytes(b) for b in self.banks)
        layer = max(expert_bytes(b) * b[0][0].shape[0] for b in self.banks)
        self.slot = slot_bytes(per_expert, layer)
        self.units = [u for i, b in enumerate(self.banks) for u in self._units(i, b)]
        self.host = [host_buffer((self.slot,), torch.uint8, device) for _ in range(2)]
        self.dev = [torch.empty(self.slot, dtype=torch.uint8, device=device) for _ in range(2)]
        self.copies = CopyStream(device)
        self.copied = [None, None]  # per slot: the event of its last copy
        self.released = [None, None]  # per slot: the compute stream past its last unit
        self.next_copy = self.next_run = self.next_bank = 0

    def _units(self, index: int, stacks) -> list[Unit]:
        n = stacks[0][0].shape[0]
        per = max(1, self.slot // expert_bytes(stacks))
        units = []
        for first in range(0, n, per):
            stop = min(n, first + per)
            sizes = [(stop - first) * raw.shape[1] * raw.shape[2] for raw, _, _ in stacks]
            offsets = (0, sizes[0], sizes[0] + sizes[1])
            units.append(Unit(index, first, stop, offsets, sum(sizes)))
        return units

    def begin(self) -> None:
        """A new pass: the copies start again from the first layer's first unit."""
        for slot in range(2):
            CopyStream.host_after(self.copied[slot])
        self.next_copy = self.next_run = self.next_bank = 0
        self._issue()
        self._issue()

    def _issue(self) -> None:
        """Start copying the next unit of the pass (if any) into its slot."""
        if self.next_copy >= len(self.units):
            return
        unit, slot = self.units[self.next_copy], self.next_copy % 2
        CopyStream.host_after(self.copied[slot])  # its pinned buffer is free again
        host = self.host[slot].numpy()
        for (raw, _, _), at in zip(self.banks[unit.bank], unit.offsets, strict=True):
            part = raw[unit.first : unit.stop].reshape(-1)
            host[at : at + part.size] = part
        self.copied[slot] = self.copies.copy(self.dev[slot][: unit.nbytes], self.host[slot][: unit.nbytes],
                                             after=self.released[slot])  # fmt: skip
        self.next_copy += 1

    def run(self, bank: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Layer bank `bank`'s experts (the pass must reach the layers in order): x [T, D],
        ids [T, A], weights [T, A] -> sum over A of weight * expert(x), float32 [T, D] where x is."""
        if bank != self.next_bank:
            raise RuntimeError(f"expert stream: layer bank {bank} asked for, {self.next_bank} expected")
        home = x.device
        x, ids, weights = x.to(self.device), ids.to(self.device), weights.to(self.device)
        out = torch.zeros(x.shape[0], self.banks[bank][2][0].shape[1], dtype=torch.float32, device=self.device)
        a = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.banks[bank][0][0].shape[0]).tolist()  # a host sync per layer
        starts = np.concatenate([[0], np.cumsum(counts)])
        xf = x.float()
        while self.next_run < len(self.units) and self.units[self.next_run].bank == bank:
            unit, slot = self.units[self.next_run], self.next_run % 2
            self.copies.compute_after(self.copied[slot])
            for e in range(unit.first, unit.stop):
                if not counts[e]:
                    continue
                pairs = order[starts[e] : starts[e + 1]]
                tok, which = pairs // a, pairs % a
                xe = xf[tok]
                gate, up = self._matrix(unit, slot, 0, e), self._matrix(unit, slot, 1, e)
                h = F.silu(xe @ gate.T) * (xe @ up.T)
                del gate, up
                out.index_add_(0, tok, (h @ self._matrix(unit, slot, 2, e).T) * weights[tok, which, None])
            self.released[slot] = self.copies.computed()
            self.next_run += 1
            self._issue()
        self.next_bank += 1
        return out.to(home)

    def _matrix(self, unit: Unit, slot: int, m: int, e: int) -> torch.Tensor:
        """Matrix m (gate, up, down) of expert e, staged in `slot`, dequantized: float32 [rows, K]."""
        raw, qtype, k = self.banks[unit.bank][m]
        rows, row = raw.shape[1], raw.shape[2]
        at = unit.offsets[m] + (e - unit.first) * rows * row
        blocks = self.dev[slot][at : at + rows * row].view(rows, row)
        out = torch.empty(rows, k, dtype=torch.float32, device=self.device)
        step = max(1, DEQUANTIZE_CHUNK_VALUES // k)
        for r in range(0, rows, step):
            out[r : r + step] = dequantize(blocks[r : r + step], qtype, k)
        return out


def staging_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 3) -> tuple[float, str]:
    """(bytes/s, method) of the road's copy: from ordinary (pageable) host memory into a pinned
    slot, then to the device, slot by slot, two slots in flight; best of repeats."""
    source = np.random.default_rng(0).integers(0, 256, megabytes << 20, dtype=np.uint8)
    n = source.size // SLOT_BYTES
    host = [host_buffer((SLOT_BYTES,), torch.uint8, device) for _ in range(2)]
    dev = [torch.empty(SLOT_BYTES, dtype=torch.uint8, device=device) for _ in range(2)]
    copies = CopyStream(device)
    best = float("inf")
    for _ in range(repeats):
        events = [None, None]
        t0 = time.perf_counter()
        for i in range(n):
            CopyStream.host_after(events[i % 2])
            host[i % 2].numpy()[:] = source[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]
            events[i % 2] = copies.copy(dev[i % 2], host[i % 2])
        for e in events:
            CopyStream.host_after(e)
        best = min(best, time.perf_counter() - t0)
    return (
        n * SLOT_BYTES / best,
        f"{n} slots of {SLOT_BYTES >> 20} MiB, pageable -> pinned -> device, best of {repeats}",
    )
