"""Saving and loading a PhaseModel as JSON + .npz (never a pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from polymap.atomic import atomic_file, write_csv, write_json
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
    "noise_merge",
    "progress",
)


def _versions() -> dict:
    import hmmlearn
    import sklearn

    from polymap import __version__

    return {
        "polymap": __version__,
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


def check_model(meta, arrays: dict[str, np.ndarray], where: str = "model") -> None:
    """Check a saved model's JSON part and arrays against each other before anything is
    built from them: types, K, feature count, shapes, finite values, stochastic start and
    transition probabilities, positive (definite) covariances, a positive scaler. Raises
    :class:`PhaseInputError` naming ``where``, the field and the reason."""

    def fail(reason: str):
        raise PhaseInputError(f"{where}: {reason}; refit with `polymap fit`")

    if not isinstance(meta, dict):
        fail(f"model.json holds a {type(meta).__name__}, not an object")
    for key, kind in (("params", dict), ("preprocessing", dict), ("train_runs", list)):
        if not isinstance(meta.get(key), kind):
            fail(
                f"model.json: {key!r} is missing or not a{'n object' if kind is dict else ' list'}"
            )
    k = meta.get("n_states")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        fail(f"model.json: n_states {k!r} is not a number of states (1 .. 1000)")
    if meta.get("covariance") not in ("diag", "full"):
        fail(f"model.json: covariance {meta.get('covariance')!r} is not 'diag' or 'full'")
    prep = meta["preprocessing"]
    features = prep.get("features")
    if (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) for f in features)
    ):
        fail("model.json: preprocessing.features is not a non-empty list of column names")
    if not isinstance(prep.get("log_features", []), list):
        fail("model.json: preprocessing.log_features is not a list")
    if prep.get("scale") not in ("global", "per-run"):
        fail(f"model.json: preprocessing.scale {prep.get('scale')!r} is not global or per-run")
    unknown = set(meta["params"]) - set(PARAMS)
    if unknown:
        fail(f"model.json: unknown parameter(s) {sorted(unknown)}")
    d = len(features)
    shapes = {
        "startprob": (k,),
        "transmat": (k, k),
        "means": (k, d),
        "covars": (k, d) if meta["covariance"] == "diag" else (k, d, d),
    }
    if prep["scale"] == "global":
        shapes.update(scaler_center=(d,), scaler_scale=(d,))
    for name, shape in shapes.items():
        if name not in arrays:
            fail(f"{ARRAYS} lacks {name!r}")
        value = arrays[name]
        if value.shape != shape or value.dtype.kind not in "fiu":
            fail(f"{ARRAYS}: {name} has shape {value.shape} ({value.dtype}), expected {shape} "
                 f"for K={k} and {d} feature(s)")  # fmt: skip
        if not np.isfinite(value).all():
            fail(f"{ARRAYS}: {name} has non-finite values")
    for name, rows in (
        ("startprob", arrays["startprob"][None, :]),
        ("transmat", arrays["transmat"]),
    ):
        if (rows < 0).any() or not np.allclose(rows.sum(axis=1), 1.0, atol=1e-6):
            fail(f"{ARRAYS}: {name} is not a probability distribution per row (>= 0, sums to 1)")
    covars = arrays["covars"]
    if meta["covariance"] == "diag":
        if (covars <= 0).any():
            fail(f"{ARRAYS}: covars has non-positive variances")
    else:
        if not np.allclose(covars, np.swapaxes(covars, 1, 2)) or (
            np.linalg.eigvalsh(covars).min() <= 0
        ):
            fail(f"{ARRAYS}: covars are not symmetric positive definite")
    if "scaler_scale" in shapes and (arrays["scaler_scale"] <= 0).any():
        fail(f"{ARRAYS}: scaler_scale has non-positive entries")


def model_from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray], where: str = "model"):
    """A PhaseModel rebuilt from :func:`model_meta` and :func:`model_arrays` (checked
    first by :func:`check_model`)."""
    from hmmlearn.hmm import GaussianHMM

    check_model(meta, arrays, where)
    params = dict(meta["params"])
    params["states_range"] = tuple(params.get("states_range", range(1, 9)))
    try:
        model = cls(**params)
        model.get_params()
        model._validate()
    except (TypeError, ValueError) as err:
        raise PhaseInputError(
            f"{where}: model.json params: {err}; refit with `polymap fit`"
        ) from err
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
    from polymap.phases.model_format import FORMAT, FORMAT_VERSION

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
    with atomic_file(directory / ARRAYS) as tmp:
        np.savez(tmp, **arrays)
    write_csv(model.selection_, directory / "selection.csv")
    write_json(directory / MODEL_JSON, meta, default=jsonable)  # last: the commit point
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


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` written by polymap (never unpickled); a missing,
    truncated or garbage file is a :class:`PhaseInputError` naming it."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise PhaseInputError(f"{path}: missing; refit with `polymap fit`") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise PhaseInputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def read_model_files(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``model.json`` and ``arrays.npz`` of a MODEL_DIR, checked (:func:`check_model`)
    without building a model: what ``describe`` needs, with numpy only."""
    from polymap.phases.model_format import FORMAT, FORMAT_VERSION

    path = directory / MODEL_JSON
    if not path.exists():
        raise PhaseInputError(f"{directory}: no {MODEL_JSON} (not a polymap model directory)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise PhaseInputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(meta, dict):
        raise PhaseInputError(f"{path}: holds a {type(meta).__name__}, not a model object")
    if meta.get("format") != FORMAT:
        raise PhaseInputError(f"{path}: not a {FORMAT} (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PhaseInputError(
            f"{path}: format version {meta.get('format_version')!r} is not supported by this "
            f"polymap (reads version {FORMAT_VERSION}); refit with `polymap fit`"
        )
    arrays = read_arrays(directory / ARRAYS)
    check_model(meta, arrays, str(directory))
    for key, kind in (("reason", str), ("n_degenerate", int), ("n_not_converged", int)):
        if not isinstance(meta.get(key), kind):
            raise PhaseInputError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    return meta, arrays


def load_model(cls, directory: Path):
    meta, arrays = read_model_files(directory)
    model = model_from_arrays(cls, meta, arrays, str(directory))
    model.reason_ = meta["reason"]
    k_likelihood = meta.get("n_states_likelihood", model.n_states_)
    model.n_states_likelihood_ = k_likelihood if isinstance(k_likelihood, int) else model.n_states_
    model.n_degenerate_ = meta["n_degenerate"]
    model.n_not_converged_ = meta["n_not_converged"]
    model.selection_ = read_selection(directory / "selection.csv")
    if (directory / "table.parquet").exists():  # a full MODEL_DIR: the training table too
        from polymap.table import read_table

        model.train_table_ = read_table(directory / "table.parquet")
    return model


SELECTION_COLUMNS = ("k", "seed", "heldout_ll", "train_ll", "bic", "converged", "degenerate")


def read_selection(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    try:
        selection = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise PhaseInputError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    missing = [c for c in (*SELECTION_COLUMNS, "chosen") if c not in selection.columns]
    if missing:
        raise PhaseInputError(f"{path}: lacks column(s) {missing}; refit with `polymap fit`")
    return selection
