"""Checkpoint sources: local layouts, manifests, the Pythia catalogue and the hub cache."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import polymap
from polymap.checkpoints import (
    SourceError,
    discover_local,
    parse_pythia_repo,
    parse_step,
    pythia_eval_steps,
    pythia_steps,
    resolve_sources,
)
from polymap.checkpoints.hub import discover_hub


def test_step_names():
    assert parse_step("step1000") == 1000
    assert parse_step("checkpoint-1000") == 1000
    assert parse_step("global_step1000") == 1000
    assert parse_step("iter_0001000") == 1000
    assert parse_step("step-7") == 7
    assert parse_step("final") is None
    assert parse_step("step1000.bak") is None


def test_runs_dir_single_run_and_single_checkpoint(neox_runs):
    refs = discover_local(neox_runs)
    assert [(r.run, r.step) for r in refs] == [
        (f"seed{s}", st) for s in (0, 1) for st in (0, 1, 2, 4)
    ]
    assert {r.seed for r in refs} == {0, 1}
    single = discover_local(neox_runs / "seed1")
    assert [(r.run, r.step) for r in single] == [("seed1", s) for s in (0, 1, 2, 4)]
    one = discover_local(neox_runs / "seed1" / "step2")
    assert [(r.run, r.step) for r in one] == [("seed1", 2)]


def test_other_step_layouts(neox_runs, tmp_path):
    src = neox_runs / "seed0" / "step1"
    for name in ("checkpoint-10", "global_step20", "iter_0000030"):
        shutil.copytree(src, tmp_path / "run-a" / name)
    refs = resolve_sources([tmp_path])
    assert [(r.run, r.step) for r in refs] == [("run-a", 10), ("run-a", 20), ("run-a", 30)]


def test_steps_filter_and_errors(neox_runs, tmp_path):
    refs = resolve_sources([neox_runs], steps="0,2-4")
    assert sorted({r.step for r in refs}) == [0, 2, 4]
    with pytest.raises(SourceError, match="no such file"):
        resolve_sources([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no checkpoint directories"):
        resolve_sources([tmp_path / "empty"])
    with pytest.raises(SourceError, match="matches steps='99'"):
        resolve_sources([neox_runs], steps="99")
    with pytest.raises(ValueError, match="cannot parse"):
        resolve_sources([neox_runs], steps="1,x")


def test_manifest(neox_runs, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "run,step,path,seed,model,tokens\n"
        f"a,100,{neox_runs / 'seed0' / 'step1'},7,tiny,2048\n"
        f"a,200,{os.path.relpath(neox_runs / 'seed0' / 'step2', tmp_path)},7,tiny,4096\n"
    )
    refs = resolve_sources([manifest])
    assert [(r.run, r.step, r.seed, r.model, r.tokens) for r in refs] == [
        ("a", 100, 7, "tiny", 2048),
        ("a", 200, 7, "tiny", 4096),
    ]
    assert Path(refs[1].location).resolve() == (neox_runs / "seed0" / "step2").resolve()
    bad = tmp_path / "bad.csv"
    bad.write_text("run,path\na,x\n")
    with pytest.raises(SourceError, match=r"lacks column\(s\) \['step'\]"):
        resolve_sources([bad])


def test_pythia_catalogue():
    steps = pythia_steps()
    assert len(steps) == 154 and steps[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert steps[-1] == 143000
    evals = pythia_eval_steps()
    assert len(evals) == 27 and set(evals) <= set(steps)
    assert evals[11:14] == [1000, 3000, 13000]
    assert parse_pythia_repo("EleutherAI/pythia-410m-seed4") == {
        "model": "410m",
        "seed": 4,
        "variant": "seed",
    }
    assert parse_pythia_repo("EleutherAI/pythia-160m-deduped")["model"] == "160m-deduped"
    assert parse_pythia_repo("EleutherAI/pythia-160m-data-seed2")["variant"] == "data-seed"
    refs = resolve_sources(["polypythias:410m:3,4"], steps="eval")
    assert len(refs) == 2 * 27
    assert refs[0].location == "hf://EleutherAI/pythia-410m-seed3@step0"
    assert (refs[0].seed, refs[0].model) == (3, "410m")
    assert len(resolve_sources(["pythia:70m"])) == 154


def populate_hub_cache(cache: Path, repo_id: str, checkpoints: dict[str, Path]) -> None:
    """Lay out a hub cache exactly as huggingface_hub does: content-addressed blobs,
    one snapshot folder per commit of relative symlinks, and refs/<branch> -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for revision, directory in checkpoints.items():
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        (repo / "refs" / revision).write_text(commit)
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for file in sorted(directory.iterdir()):
            data = file.read_bytes()
            etag = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / etag).write_bytes(data)
            (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / etag)


@pytest.fixture
def offline_hub(neox_runs, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    checkpoints = {f"step{s}": neox_runs / "seed0" / f"step{s}" for s in (0, 1, 4)}
    populate_hub_cache(cache, "EleutherAI/pythia-14m-seed3", checkpoints)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_hub_extraction_matches_local(offline_hub, neox_runs):
    hub = polymap.extract(
        ["hf://EleutherAI/pythia-14m-seed3@step0,step1,step4"], device="cpu", progress=False
    )
    local = polymap.extract([neox_runs / "seed0"], device="cpu", progress=False)
    local = local[local["step"].isin([0, 1, 4])].reset_index(drop=True)
    assert list(hub["status"]) == ["ok"] * 3
    assert list(hub["run"].unique()) == ["pythia-14m-seed3"]
    assert list(hub["seed"]) == [3, 3, 3] and list(hub["model"]) == ["14m"] * 3
    features = [c for c in polymap.feature_columns(hub)]
    assert features == polymap.feature_columns(local)
    assert hub[features].equals(local[features])


def test_offline_hub_lists_cached_revisions_and_reports_missing(offline_hub, neox_runs):
    with pytest.raises(SourceError, match="no step revisions"):
        discover_hub("hf://someone/custom-run")  # not Pythia, not cached
    populate_hub_cache(
        offline_hub,
        "someone/custom-run",
        {
            "main": neox_runs / "seed1" / "step4",
            "step2": neox_runs / "seed1" / "step2",
            "step4": neox_runs / "seed1" / "step4",
        },
    )
    refs = discover_hub("hf://someone/custom-run")
    assert [(r.run, r.step, r.location) for r in refs] == [
        ("custom-run", 2, "hf://someone/custom-run@step2"),
        ("custom-run", 4, "hf://someone/custom-run@step4"),
    ]
    refs = discover_hub("hf://EleutherAI/pythia-14m-seed3@step0,step8")
    rows = polymap.extract(refs, device="cpu", progress=False)
    missing = rows[rows["step"] == 8].iloc[0]
    assert missing["status"] == "failed"
    assert "pythia-14m-seed3@step8" in missing["error"] and "HF_HUB_OFFLINE" in missing["error"]


def test_fixture_cache_is_what_huggingface_hub_sees(offline_hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(offline_hub)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "EleutherAI/pythia-14m-seed3"
    assert sorted(r for rev in repo.revisions for r in rev.refs) == ["step0", "step1", "step4"]


def test_delete_after_removes_downloaded_revisions(offline_hub):
    repo = offline_hub / "models--EleutherAI--pythia-14m-seed3"
    before = len(list((repo / "snapshots").iterdir()))
    rows = polymap.extract(
        ["hf://EleutherAI/pythia-14m-seed3@step1"], device="cpu", delete_after=True, progress=False
    )
    assert rows.iloc[0]["status"] == "ok"
    assert len(list((repo / "snapshots").iterdir())) == before - 1
