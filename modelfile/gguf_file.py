"""Open a GGUF model (one file or a split set) as metadata plus memory-mapped tensor views.

Nothing here copies weight bytes: every tensor is a uint8 numpy view [rows, row_bytes] into a
read-only memory map, so pages are read from disk only when a kernel touches them. (A private
writable map would be charged against the commit limit: a 400 GB model could not be opened.)
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from modelfile.errors import HeteroError
from modelfile.gguf_header import GGUFHeader, TensorEntry, read_header
from modelfile.quants import row_bytes

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: numpy-order shape (rows are output features), ggml type, raw bytes."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray  # uint8 [prod(shape[:-1]), row_bytes], a read-only view into the file
    file: Path

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape))


class GGUFModelFile:
    """Metadata and tensors of a GGUF model, merged across its split files."""

    def __init__(self, path: str | Path):
        paths = split_paths(Path(path))
        self.paths = paths
        headers = [read_header(p) for p in paths]
        self.metadata = headers[0].metadata
        _check_split_parts(headers)
        self._identity = [_identity(p) for p in paths]
        self.tensors: dict[str, TensorInfo] = {}
        for header in headers:
            data = np.memmap(header.path, np.uint8, "r") if header.tensors else None
            for entry in header.tensors:
                if entry.name in self.tensors:
                    raise HeteroError(f"{header.path}: tensor {entry.name} appears twice")
                self.tensors[entry.name] = _tensor_info(entry, data, header)
        count = self.metadata.get("split.tensors.count")
        if count is not None and count != len(self.tensors):
            raise HeteroError(f"{paths[0]}: split set holds {len(self.tensors)} tensors, header says {count}")

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def check_unchanged(self) -> None:
        """The files are still the ones opened (size and modification time): a model file
        replaced or cut short under a running model would otherwise fault (SIGBUS) on a read."""
        for path, seen in zip(self.paths, self._identity, strict=True):
            try:
                now = _identity(path)
            except OSError:
                now = None
            if now != seen:
                raise HeteroError(f"{path} changed on disk since it was opened; load the model again")


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _check_split_parts(headers) -> None:
    """Each part of a split set says which part it is, of how many, of a set of how many
    tensors, as the first does. (A part of another model with the same shapes and split
    layout says the same: headers cannot tell it apart.)"""
    if len(headers) == 1:
        return
    first = headers[0].metadata
    for i, h in enumerate(headers):
        m = h.metadata
        said = (m.get("split.no"), m.get("split.count"), m.get("split.tensors.count"))
        if said != (i, len(headers), first.get("split.tensors.count")):
            part = said[0] + 1 if isinstance(said[0], int) else said[0]  # split.no counts from 0
            raise HeteroError(f"{h.path}: not part {i + 1} of {len(headers)} of this split set (its header says "
                              f"part {part} of {said[1]}, {said[2]} tensors)")  # fmt: skip
        arch = m.get("general.architecture")
        if i and arch is not None and arch != first.get("general.architecture"):
            raise HeteroError(f"{h.path}: architecture {arch!r} differs from the first part's")


def split_paths(path: Path) -> list[Path]:
    """All files of a model: [path] for a single file, every split in order for a split set."""
    if not path.exists():
        raise HeteroError(f"{path}: no such file")
    if not path.is_file():
        raise HeteroError(f"{path}: is not a file")
    match = SPLIT_NAME.match(path.name)
    if not match:
        return [path]
    count, index = int(match["count"]), int(match["no"])
    if not 1 <= index <= count:
        raise HeteroError(f"{path}: a split name says part {index} of {count}")
    paths = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise HeteroError(f"{path}: split set is incomplete, missing {', '.join(missing)}")
    return paths


def _tensor_info(entry: TensorEntry, data: np.ndarray, header: GGUFHeader) -> TensorInfo:
    shape = tuple(reversed(entry.ne))
    per_row = row_bytes(entry.qtype, shape[-1], entry.name)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    start, end = entry.offset, entry.offset + rows * per_row
    if end > header.file_size:
        raise HeteroError(f"{header.path}: truncated, tensor {entry.name} ends past the end of the file")
    view = data[start:end].reshape(rows, per_row)
    return TensorInfo(entry.name, GGMLQuantizationType(entry.qtype), shape, view, header.path)
