"""Saving and loading a PhaseModel as JSON + .npz (never a pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.phases.preprocess import PhaseInputError, Preprocessor

MODEL_JSON = "model.json"
ARRAYS = "arrays.npz"
PARAMS = (
    "n_states",
    "states_range",
    "restarts",
    "covariance",
    "features",
    "log_transform",
    "scale",
    "n_folds",
    "n_iter",
    "tol",
    "n_jobs",
    "random_state",
)


def _versions() -> dict:
    import hmmlearn
    import sklearn

    import polymap

    return {
        "polymap": polymap.__version__,
        "hmmlearn": hmmlearn.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }


def model_arrays(model) -> dict[str, np.ndarray]:
    """The arrays of a fitted PhaseModel: HMM parameters and the scaler."""
    hmm = model.hmm_
    covars = hmm.covars_
    if hmm.covariance_type == "diag":
        covars = np.array([np.diag(c) for c in covars])
    arrays = {
        "startprob": hmm.startprob_,
        "transmat": hmm.transmat_,
        "means": hmm.means_,
        "covars": covars,
    }
    pre = model.preprocessor_
    if pre.center_ is not None:
        arrays["scaler_center"] = pre.center_
        arrays["scaler_scale"] = pre.scale_
    return arrays


def model_meta(model) -> dict:
    """The JSON part of a fitted PhaseModel (parameters, K, preprocessing)."""
    meta = {
        "params": {k: getattr(model, k) for k in PARAMS},
        "n_states": model.n_states_,
        "covariance": model.hmm_.covariance_type,
        "preprocessing": model.preprocessor_.to_dict(),
        "train_runs": model.train_runs_,
    }
    meta["params"]["states_range"] = list(meta["params"]["states_range"])
    return meta


def model_from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray]):
    """A PhaseModel rebuilt from :func:`model_meta` and :func:`model_arrays`."""
    from hmmlearn.hmm import GaussianHMM

    params = dict(meta["params"])
    params["states_range"] = tuple(params["states_range"])
    model = cls(**params)
    k, covariance = meta["n_states"], meta["covariance"]
    hmm = GaussianHMM(n_components=k, covariance_type=covariance, init_params="", params="")
    hmm.implementation = "log"
    hmm.n_features = arrays["means"].shape[1]
    hmm.startprob_ = arrays["startprob"]
    hmm.transmat_ = arrays["transmat"]
    hmm.means_ = arrays["means"]
    hmm.covars_ = arrays["covars"]
    prep = meta["preprocessing"]
    pre = Preprocessor(prep["features"], prep["log_features"], prep["scale"])
    if "scaler_center" in arrays:
        pre.center_, pre.scale_ = arrays["scaler_center"], arrays["scaler_scale"]
    model.hmm_, model.preprocessor_, model.n_states_ = hmm, pre, k
    model.train_runs_ = meta["train_runs"]
    return model


def save_model(model, directory: Path) -> Path:
    from polymap.phases.model import FORMAT, FORMAT_VERSION

    directory.mkdir(parents=True, exist_ok=True)
    arrays = model_arrays(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **model_meta(model),
        "reason": model.reason_,
        "n_states_likelihood": getattr(model, "n_states_likelihood_", model.n_states_),
        "n_degenerate": model.n_degenerate_,
        "n_not_converged": model.n_not_converged_,
        "checkpoint_order": "the HMM is over checkpoint order, not step distance",
        "versions": _versions(),
    }
    tmp = directory / f".{ARRAYS}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, directory / ARRAYS)
    json_tmp = directory / f".{MODEL_JSON}.tmp"
    json_tmp.write_text(json.dumps(meta, indent=1, default=jsonable))
    os.replace(json_tmp, directory / MODEL_JSON)
    model.selection_.to_csv(directory / "selection.csv", index=False)
    return directory


def jsonable(value):
    """``json.dumps`` default for numpy scalars and tuples."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_model(cls, directory: Path):
    from polymap.phases.model import FORMAT, FORMAT_VERSION

    path = directory / MODEL_JSON
    if not path.exists():
        raise PhaseInputError(f"{directory}: no {MODEL_JSON} (not a polymap model directory)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise PhaseInputError(f"{path}: unreadable ({err})") from err
    if meta.get("format") != FORMAT:
        raise PhaseInputError(f"{path}: not a {FORMAT} (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PhaseInputError(
            f"{path}: format version {meta.get('format_version')} is not supported by this "
            f"polymap (reads version {FORMAT_VERSION}); refit with `polymap fit`"
        )
    with np.load(directory / ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    model = model_from_arrays(cls, meta, arrays)
    model.reason_ = meta["reason"]
    model.n_states_likelihood_ = meta.get("n_states_likelihood", model.n_states_)
    model.n_degenerate_ = meta["n_degenerate"]
    model.n_not_converged_ = meta["n_not_converged"]
    selection = directory / "selection.csv"
    model.selection_ = pd.read_csv(selection) if selection.exists() else pd.DataFrame()
    return model
