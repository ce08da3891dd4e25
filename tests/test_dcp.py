"""torch.distributed.checkpoint (DCP) directories as checkpoints: what torchtitan,
OLMo-core and Megatron write. Real DCP files (``torch.distributed.checkpoint.save``, one
process and a two-process gloo group) against the same weights as safetensors."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from polymap.checkpoints import CheckpointError, CheckpointRef, DCPReader, UnsafeCheckpointError
from polymap.checkpoints.local import discover_local
from polymap.extraction import extract_checkpoint
from polymap.synthetic import make_tiny_run

SETS = ("weights", "spectral", "shape")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dcp")
    (checkpoint,) = make_tiny_run(root / "hf", steps=(3,), seed=0)
    return checkpoint


def _single_process_save(weights: dict, out: Path, nested: bool = True) -> None:
    """As OLMo-core (``{"model": ..., "optim": ...}``) or, ``nested=False``, torchtitan
    (the model's keys at the top level, beside the optimizer's)."""
    import warnings

    if nested:
        state = {"model": weights, "optim": {"state.step": torch.tensor(3.0)}, "step": 3}
    else:
        state = {**weights, "optimizer": {"state.exp_avg": torch.zeros(3)}, "step": 3}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(out))


def _features(path: Path) -> dict:
    row = extract_checkpoint(CheckpointRef("r", 3, str(path)), feature_sets=SETS, device="cpu")
    assert row["status"] in ("ok", "warning"), row["error"]
    return {k: v for k, v in row.items() if k.split(".")[0] in SETS}


def test_reader_returns_the_saved_tensors(tiny, tmp_path):
    weights = load_file(tiny / "model.safetensors")
    _single_process_save(weights, tmp_path / "step3")
    with DCPReader(tmp_path / "step3") as reader:
        assert sorted(reader.names()) == sorted(weights)  # "model." stripped, optim skipped
        for name, tensor in weights.items():
            assert reader.shape(name) == tuple(tensor.shape)
            assert torch.equal(reader.get(name), tensor)


def test_dcp_features_equal_safetensors_features(tiny, tmp_path):
    weights = load_file(tiny / "model.safetensors")
    # OLMo-core's layout: the DCP directory inside the step folder
    _single_process_save(weights, tmp_path / "run" / "step3" / "model_and_optim")
    (ref,) = discover_local(tmp_path / "run")
    assert ref.step == 3
    expected, got = _features(tiny), _features(Path(ref.location))
    assert got.keys() == expected.keys() and len(got) > 20
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_two_process_sharded_save_is_assembled(tiny, tmp_path):
    """Each 2-D tensor split by rows across two gloo ranks (a chunk per rank)."""
    worker = Path(__file__).with_name("dcp_save_worker.py")
    out = tmp_path / "step3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(worker), str(tiny), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("*.distcp"))) == 2
    weights = load_file(tiny / "model.safetensors")
    with DCPReader(out) as reader:
        assert sorted(reader.names()) == sorted(weights)
        for name, tensor in weights.items():
            assert torch.equal(reader.get(name), tensor), name
    expected, got = _features(tiny), _features(out)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_torchtitan_names_get_their_roles(tmp_path):
    torch.manual_seed(0)
    d, hidden, vocab = 16, 32, 64
    weights = {"tok_embeddings.weight": torch.randn(vocab, d), "norm.weight": torch.ones(d),
               "output.weight": torch.randn(vocab, d)}  # fmt: skip
    for i in range(2):
        for w in ("wq", "wk", "wv", "wo"):
            weights[f"layers.{i}.attention.{w}.weight"] = torch.randn(d, d) / 4
        weights[f"layers.{i}.feed_forward.w1.weight"] = torch.randn(hidden, d) / 4
        weights[f"layers.{i}.feed_forward.w3.weight"] = torch.randn(hidden, d) / 4
        weights[f"layers.{i}.feed_forward.w2.weight"] = torch.randn(d, hidden) / 4
        weights[f"layers.{i}.attention_norm.weight"] = torch.ones(d)
        weights[f"layers.{i}.ffn_norm.weight"] = torch.ones(d)
    _single_process_save(weights, tmp_path / "step5", nested=False)
    with DCPReader(tmp_path / "step5") as reader:
        assert sorted(reader.names()) == sorted(weights)
    row = extract_checkpoint(CheckpointRef("r", 5, str(tmp_path / "step5")), feature_sets=SETS,
                             device="cpu")  # fmt: skip
    assert "unknown architecture" not in (row["error"] or "")
    qkv = torch.cat([weights[f"layers.{i}.attention.{w}.weight"].flatten()
                     for i in range(2) for w in ("wq", "wk", "wv")])  # fmt: skip
    assert row["weights.attn_qkv.fro"] == pytest.approx(float(qkv.norm()), rel=1e-5)


def test_hostile_dcp_files_are_refused_with_the_reason(tiny, tmp_path):
    weights = load_file(tiny / "model.safetensors")
    _single_process_save(weights, tmp_path / "ok")

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(UnsafeCheckpointError, match="builtins.print is not DCP metadata"):
        DCPReader(evil)
    row = extract_checkpoint(CheckpointRef("r", 1, str(evil)), feature_sets=SETS, device="cpu")
    assert row["status"] == "failed" and "refusing to unpickle" in row["error"]
    # a truncated shard: the tensor and the file are named, nothing else breaks
    (shard,) = (tmp_path / "ok").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with (
        DCPReader(tmp_path / "ok") as reader,
        pytest.raises(CheckpointError, match=r"__0_0\.distcp: tensor .*truncated"),
    ):
        for name in reader.names():
            reader.get(name)
    (tmp_path / "ok" / ".metadata").write_bytes(b"\x80\x04trunc")
    with pytest.raises(CheckpointError, match="corrupt or truncated DCP metadata"):
        DCPReader(tmp_path / "ok")
