"""`DCPReader`: stream the model tensors of a ``torch.distributed.checkpoint`` directory.

torchtitan, OLMo-core, Megatron-Core (``torch_dist``) and NeMo save pre-training
checkpoints as DCP directories: ``.metadata`` (which tensor, which chunks, where) and
``__<rank>_<n>.distcp`` shards written by every rank. polymap reads them tensor by tensor
from the metadata, never materialising the model or the optimizer:

- ``.metadata`` is a pickle; it is read with an unpickler that admits only DCP's own
  metadata classes, ``torch.Size``, dtypes and layouts (:func:`read_metadata`) - anything
  else (a file crafted to run code) is refused with :class:`UnsafeCheckpointError`;
- each chunk of a tensor is a ``torch.save`` blob at an offset of a shard, read with
  ``torch.load(weights_only=True)`` and copied into the tensor at its offsets (sharded
  training writes one chunk per rank);
- optimizer state (``optim.*``, ``optimizer.*``, ``state.*``) and non-tensor entries
  (data loader, step counters) are skipped; a ``model.`` prefix common to every model
  tensor is removed, so names read as the model's own (``layers.0.attention.wq.weight``).

Layouts: the DCP directory itself, or a checkpoint folder holding it in
``model_and_optim/`` (OLMo-core) or ``model/``.

>>> reader = DCPReader("runs/seed0/step1000")                # doctest: +SKIP
>>> reader.get("layers.0.attention.wq.weight").shape         # doctest: +SKIP
torch.Size([256, 256])
"""

from __future__ import annotations

import io
import os

# DCP's ``.metadata`` is a pickle by torch's own format (FileSystemReader.read_metadata
# calls pickle.load on it). torch's weights-only unpickler cannot read it (protocol-4
# opcodes such as FRAME and SHORT_BINUNICODE are unsupported, tried), so the only pickle
# use in polymap is this find_class allow-list ("restricting globals"): DCP's metadata
# dataclasses, torch.Size, dtypes and layouts; anything else is refused unexecuted.
# polymap's own saved models and tables are JSON + .npz / Parquet, never pickles.
import pickle
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from polymap.checkpoints.reader import (
    CheckpointError,
    TensorReader,
    UnsafeCheckpointError,
    check_regular,
)

METADATA = ".metadata"
SUBFOLDERS = ("model_and_optim", "model")
# entries of a training state that are not the model's weights
SKIPPED_PREFIXES = ("optim.", "optimizer.", "optimizers.", "state.", "param_groups", "lr_scheduler")

_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    f"{_DCP}.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    f"{_DCP}.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _Forbidden(pickle.UnpicklingError):
    """A global outside the allow-list (not a damaged file)."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, ``torch.Size``, dtypes and layouts; nothing else."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name} is not DCP metadata")


def dcp_directory(directory: str | os.PathLike) -> Path | None:
    """The DCP directory of a checkpoint folder (itself, or its ``model_and_optim/`` or
    ``model/``), or None when it holds none."""
    directory = Path(directory)
    for candidate in (directory, *(directory / s for s in SUBFOLDERS)):
        if (candidate / METADATA).exists():  # a FIFO too: refused, by name, when read
            return candidate
    return None


def read_metadata(directory: str | os.PathLike):
    """The ``Metadata`` of a DCP directory, unpickled with only DCP's own classes."""
    path = check_regular(Path(directory) / METADATA)
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except _Forbidden as err:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle: {err}; polymap reads DCP metadata only"
        ) from err
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as err:  # fmt: skip
        raise CheckpointError(f"{path}: corrupt or truncated DCP metadata ({err})") from err


class DCPReader:
    """Random access to the model tensors of a DCP checkpoint; the interface of
    :class:`~polymap.checkpoints.reader.TensorReader` (``names``, ``shape``, ``get``,
    iteration, a context manager)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        found = dcp_directory(self.directory)
        if found is None:
            raise CheckpointError(f"{self.directory}: no {METADATA} (not a DCP checkpoint)")
        self.dcp = found
        metadata = read_metadata(found)
        try:
            entries = metadata.state_dict_metadata
            storage = metadata.storage_data
        except AttributeError as err:
            raise CheckpointError(f"{found / METADATA}: not DCP metadata ({err})") from err
        where = {}
        for index, info in storage.items():
            offset = None if index.offset is None else tuple(index.offset)
            where[(index.fqn, offset)] = info
        tensors = {
            fqn: meta
            for fqn, meta in entries.items()
            if hasattr(meta, "chunks") and not fqn.startswith(SKIPPED_PREFIXES)
        }
        if not tensors:
            raise CheckpointError(f"{found}: the DCP checkpoint holds no model tensors")
        strip = "model." if all(f.startswith("model.") for f in tensors) else ""
        self._meta = {fqn[len(strip) :]: (fqn, meta) for fqn, meta in tensors.items()}
        self._where = where
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def _file(self, relative: str):
        if Path(relative).name != relative:
            raise CheckpointError(f"{self.dcp}: shard {relative!r} points outside the checkpoint")
        if relative not in self._files:
            path = check_regular(self.dcp / relative)
            try:
                self._files[relative] = self._stack.enter_context(open(path, "rb"))  # noqa: SIM115
            except OSError as err:
                raise CheckpointError(f"{path}: cannot open DCP shard ({err})") from err
        return self._files[relative]

    def names(self) -> list[str]:
        """Model tensor names (without a common ``model.`` prefix), in stored order."""
        return list(self._meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._meta[name][1].size)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def get(self, name: str) -> torch.Tensor:
        """One tensor, assembled from its chunks, in its stored dtype, on the CPU."""
        fqn, meta = self._meta[name]
        out = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        covered = 0
        for chunk in meta.chunks:
            info = self._where.get((fqn, tuple(chunk.offsets)))
            if info is None:
                raise CheckpointError(f"{self.dcp}: tensor {name}: chunk at {list(chunk.offsets)} "
                                      "has no storage entry")  # fmt: skip
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{self.dcp}: tensor {name} is stored transformed "
                    f"({info.transform_descriptors}); polymap reads plain DCP shards"
                )
            fh = self._file(info.relative_path)
            try:
                fh.seek(info.offset)
                blob = fh.read(info.length)
                if len(blob) != info.length:
                    raise EOFError(f"short read: {len(blob)} of {info.length} bytes")
                part = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises its unpickler's own error classes
                raise CheckpointError(
                    f"{self.dcp / info.relative_path}: tensor {name}: corrupt or truncated "
                    f"chunk ({type(err).__name__}: {err})"
                ) from err
            sizes = tuple(chunk.sizes)
            if not isinstance(part, torch.Tensor) or tuple(part.shape) != sizes:
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part)
                raise CheckpointError(f"{self.dcp}: tensor {name}: chunk holds {shape}, "
                                      f"metadata says {sizes}")  # fmt: skip
            view = out
            for dim, (start, size) in enumerate(zip(chunk.offsets, sizes, strict=True)):
                view = view.narrow(dim, start, size)
            view.copy_(part)
            covered += part.numel()
        if covered != out.numel():
            raise CheckpointError(
                f"{self.dcp}: tensor {name}: its chunks cover {covered} of {out.numel()} entries"
            )
        return out

    def files(self) -> list[Path]:
        """The metadata and every shard file (for fingerprints)."""
        shards = sorted({info.relative_path for info in self._where.values()})
        return [self.dcp / METADATA, *(self.dcp / s for s in shards)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> DCPReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(directory: str | os.PathLike) -> TensorReader | DCPReader:
    """The reader for a checkpoint folder: :class:`DCPReader` when it holds a
    ``torch.distributed.checkpoint`` (``.metadata``), else
    :class:`~polymap.checkpoints.reader.TensorReader` (safetensors, ``.bin``)."""
    if dcp_directory(directory) is not None:
        return DCPReader(directory)
    return TensorReader(directory)
