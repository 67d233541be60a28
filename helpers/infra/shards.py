"""Safetensors files read and written one tensor at a time, never mapped whole into memory.

`safetensors.safe_open` memory-maps a file, and every page a read touches then
counts in the process's resident set until the file is closed: streaming a
16 GB checkpoint through one open handle would show 16 GB resident. These
helpers read a tensor with plain file reads into a fresh buffer, and write a
file whose header (names, dtypes, shapes) is fixed first, the data filled in
as each tensor is computed. The format is the safetensors one: an 8-byte
little-endian header length, a JSON header, then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"  # Hugging Face's map from tensor name to shard


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return header, 8 + length


class CheckpointReader:
    """The tensors of a checkpoint folder (one model.safetensors or an index of shards), read by name on demand."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.exists():
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no .safetensors weights to stream.")
        self.entries: dict[str, tuple[Path, int, dict]] = {}
        self.aliases: dict[str, str] = {}  # a shared tensor's other names -> the stored one (safetensors' metadata)
        for path in files:
            header, start = read_header(path)
            metadata = header.pop("__metadata__", None) or {}
            self.entries.update({name: (path, start, info) for name, info in header.items()})
            self.aliases.update({name: kept for name, kept in metadata.items() if kept in header})

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.aliases

    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(info["data_offsets"][1] - info["data_offsets"][0] for _, _, info in self.entries.values())

    def numel(self) -> int:
        """Stored numbers (a parameter count: tied tensors are stored once)."""
        return sum(torch.Size(info["shape"]).numel() for _, _, info in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` in its stored dtype, read into a buffer of its own (no mapping left behind)."""
        if name not in self:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        path, start, info = self.entries[self.aliases.get(name, name)]
        begin, end = info["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            f.readinto(buffer.numpy())
        return buffer.view(DTYPES[info["dtype"]]).reshape(info["shape"])


class ShardWriter:
    """A safetensors file laid out up front from `specs` (name -> (dtype, shape)) and filled tensor by tensor."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.path, self.header, self.start = path, header, 8 + len(raw)
        self.pending = set(specs)
        self.file = open(path, "wb")  # noqa: SIM115 -- open for the writer's lifetime, closed by close()
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put `tensor` at its place; its dtype and shape must be those announced."""
        info = self.header[name]
        if CODES.get(tensor.dtype) != info["dtype"] or list(tensor.shape) != info["shape"]:
            raise ValueError(
                f"{name}: got {tensor.dtype} {list(tensor.shape)}, the layout says {info['dtype']} {info['shape']}"
            )
        self.file.seek(self.start + info["data_offsets"][0])
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no bytes copy
        self.pending.discard(name)

    def close(self) -> None:
        """Close the file; raise if a tensor of the layout was never written."""
        self.file.close()
        if self.pending:
            raise ValueError(f"{self.path}: {len(self.pending)} tensors never written, e.g. {sorted(self.pending)[:3]}")
