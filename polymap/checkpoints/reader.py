"""`TensorReader`: stream the tensors of one Hugging Face checkpoint directory, one at a time.

Formats, in order of preference:

1. ``model.safetensors`` (or any single ``*.safetensors``),
2. sharded safetensors described by ``model.safetensors.index.json``,
3. ``pytorch_model.bin`` (or its sharded index), loaded with
   ``torch.load(weights_only=True, mmap=True)``. A file that needs full unpickling is
   refused with :class:`UnsafeCheckpointError`; polymap never unpickles.

A model is never materialised: each tensor is read when asked for, into its own buffer.
Errors name the file and the reason.

Examples
--------
>>> reader = TensorReader("runs/seed0/step1000")            # doctest: +SKIP
>>> for name in reader.names():                             # doctest: +SKIP
...     tensor = reader.get(name)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from polymap.errors import PolymapError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILE_PATTERNS = ("*.safetensors", SAFETENSORS_INDEX, "pytorch_model*.bin", BIN_INDEX)


# Tensors are read with plain file reads into fresh buffers rather than through a memory
# map: mapped pages stay resident for as long as the file is open, so a mapped model
# would count its whole size against the process, whereas this keeps the peak at the
# largest tensor.
_SAFETENSORS_DTYPES = {
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(file: Path) -> tuple[dict, int]:
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(length))
    return header, 8 + length


class CheckpointError(PolymapError):
    """A checkpoint that cannot be read; the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint that would need arbitrary code to load."""


def check_regular(file: Path) -> Path:
    """``file`` (symlinks followed) must be a regular file: opening a FIFO named
    ``model.safetensors`` blocked the sweep forever, a device reads without end."""
    import stat

    try:
        mode = os.stat(file).st_mode
    except OSError as err:
        raise CheckpointError(f"{file}: cannot stat ({err})") from err
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else (
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
        )  # fmt: skip
        raise CheckpointError(f"{file}: {kind}, not a weight file; refused")
    return file


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory in the format polymap will read."""
    directory = Path(directory)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.exists():
            return [directory / f for f in sorted(set(_read_index(index).values()))]
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return safetensors
    bins = sorted(directory.glob("pytorch_model*.bin"))
    return bins


def _read_index(index: Path) -> dict[str, str]:
    """A shard index's ``weight_map`` (tensor -> file), checked: an object of strings
    naming files *in* the checkpoint directory (no ``..``, no absolute path, no folder)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8-sig"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: weight_map is a {type(weight_map).__name__}, not an object"
        )
    if not weight_map:
        raise CheckpointError(f"{index}: empty weight_map")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointError(f"{index}: weight_map[{name!r}] is {file!r}, not a file name")
        if Path(file).name != file or file in (".", ".."):
            raise CheckpointError(
                f"{index}: weight_map[{name!r}] = {file!r} points outside the checkpoint "
                "directory (shards must be files next to the index)"
            )
    return weight_map


def architecture_signature(config: dict | None) -> str | None:
    """What two checkpoints must share to be compared feature by feature: model type,
    width, depth and vocabulary (the tokenizer's size), from ``config.json``.

    >>> architecture_signature({"model_type": "gpt_neox", "hidden_size": 64,
    ...                         "num_hidden_layers": 2, "vocab_size": 512})
    'gpt_neox d=64 L=2 V=512'
    """
    if not config:
        return None

    def first(*keys):
        return next((config[k] for k in keys if config.get(k) is not None), "?")

    width = first("hidden_size", "n_embd", "d_model", "dim")
    depth = first("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    return f"{config.get('model_type', '?')} d={width} L={depth} V={first('vocab_size')}"


def read_config(directory: Path) -> dict | None:
    """``config.json`` as a dict, or None when absent. Raises on unreadable JSON."""
    path = Path(directory) / "config.json"
    if not path.exists():
        return None
    check_regular(path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable config ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is not a JSON object")
    return config


class TensorReader:
    """Random access to the tensors of one checkpoint directory without loading it whole.

    Use as a context manager (or call :meth:`close`). ``get`` returns the tensor in its
    stored dtype on the CPU; callers upcast.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        self.files = weight_files(self.directory)
        if not self.files:
            raise CheckpointError(
                f"{self.directory}: no weights (expected model.safetensors, "
                f"{SAFETENSORS_INDEX} or pytorch_model.bin)"
            )
        self._stack = ExitStack()
        self._where: dict[str, tuple[str, object]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        try:
            for file in self.files:
                self._open(file)
            if not self._where:
                raise CheckpointError(
                    f"{self.directory}: the weight file(s) {[f.name for f in self.files]} "
                    "hold no tensors"
                )
        except BaseException:
            self._stack.close()
            raise

    def _open(self, file: Path) -> None:
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the shard index but missing")
        check_regular(file)
        if file.suffix == ".safetensors":
            try:  # safetensors validates the header and the file's extent
                with safe_open(str(file), framework="pt") as handle:
                    names = list(handle.keys())
                header, data_start = _safetensors_header(file)
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors ({err})") from err
            fh = self._stack.enter_context(open(file, "rb"))  # noqa: SIM115
            for name in names:
                self._check_new(name, file)
                entry = header[name]
                if entry["dtype"] not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {entry['dtype']}")
                self._where[name] = ("st", (fh, data_start, entry))
                self._shapes[name] = tuple(entry["shape"])
        else:
            state = load_bin(file)
            for name, tensor in state.items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                self._check_new(name, file)
                self._where[name] = ("bin", tensor)
                self._shapes[name] = tuple(tensor.shape)

    def _check_new(self, name: str, file: Path) -> None:
        if name in self._where:  # two shards with one tensor: which one is the weight?
            raise CheckpointError(f"{file}: tensor {name!r} is also in another weight file")

    def names(self) -> list[str]:
        """Tensor names in the checkpoint, in stored order per file."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype, on the CPU."""
        kind, source = self._where[name]
        if kind == "bin":
            return source  # type: ignore[return-value]
        fh, data_start, entry = source  # type: ignore[misc]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        try:
            fh.seek(data_start + begin)
            if fh.readinto(memoryview(buffer.numpy())) != end - begin:
                raise OSError("short read")
        except OSError as err:
            raise CheckpointError(f"{self.directory}: cannot read tensor {name} ({err})") from err
        return buffer.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        self._stack.close()
        self._where.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """Load a ``pytorch_model.bin`` with ``weights_only=True`` (memory-mapped when the
    file is in the zip format); refuse anything that needs real unpickling."""
    last: Exception | None = None
    for mmap in (True, False):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as err:  # torch raises the unpickler's own error class
            if type(err).__name__ != "UnpicklingError":
                if isinstance(err, (RuntimeError, OSError, EOFError, ValueError)):
                    last = err
                    continue
                raise
            raise UnsafeCheckpointError(
                f"{file}: refusing to unpickle: the file holds objects other than tensors"
                f"{_unsupported_global(err)}. polymap loads .bin files only with "
                "weights_only=True; convert the checkpoint to safetensors."
            ) from err
    else:
        raise CheckpointError(f"{file}: corrupt or truncated .bin ({last})") from last
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict, found {type(state).__name__}")
    return state


def _unsupported_global(err: Exception) -> str:
    match = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
    return f" (it references {match.group(1)})" if match else ""
