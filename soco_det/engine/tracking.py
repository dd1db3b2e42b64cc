"""Where a run's records go besides ``metrics.jsonl``: TensorBoard, W&B and MLflow behind one small interface.

A :class:`Tracker` takes scalars, text, pictures and tables (:meth:`~Tracker.scalars`,
:meth:`~Tracker.text`, :meth:`~Tracker.image`, :meth:`~Tracker.table`) and hands each to every
back-end of ``logging.backends`` (:class:`~soco_det.engine.config.LoggingConfig`); pretraining and
fine-tuning use it through :class:`~soco_det.engine.metrics.MetricsWriter`, on the main process.

* ``tensorboard``: ``RUN/tensorboard`` (scalars; text and tables as Markdown; pictures);
* ``wandb``: a W&B run with the resolved config, its files in ``RUN/wandb`` (offline with
  ``WANDB_MODE=offline`` or ``logging.wandb_mode=offline``; ``wandb sync RUN/wandb/offline-run-*``
  uploads them later);
* ``mlflow``: an MLflow run in experiment ``logging.project`` with the config as parameters,
  text, pictures and tables as artifacts; at ``logging.mlflow_uri``, else ``MLFLOW_TRACKING_URI``,
  else a file store in ``RUN/mlruns``.

W&B and MLflow are imported only when asked for; one that is not installed is a
:class:`~soco_det.errors.UserError` naming the ``pip install`` (:func:`check_backends`, before any
training). A resumed run (step > 0) continues the same W&B and MLflow runs (their ids are kept in
``RUN/tracking.json``). A back-end that fails while the run trains (a lost connection, say) is
switched off with one warning: a log sink never stops a run.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from soco_det.atomic import atomic_write_json
from soco_det.errors import UserError
from soco_det.logs import get_logger

log = get_logger(__name__)

IDS_FILE = "tracking.json"
# back-end -> (module it needs, what to pip install)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}

Image = Any  # a PNG/JPEG path, or an array [H, W, 3] uint8
Rows = Sequence[Mapping[str, Any]]  # a table: one mapping per row, the first row's keys are the columns


def check_backends(names: Sequence[str]) -> None:
    """Raise a :class:`UserError` for the first back-end of ``names`` whose package is missing."""
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"logging.backends: unknown back-end {name!r} (choose from {', '.join(PACKAGES)})")
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"logging.backends: {name} needs the {module} package, which is not installed: "
                f"pip install {pip} (or pip install 'soco-det[tracking]'), or leave {name} out"
            )


def as_array(image: Image) -> np.ndarray:
    """``image`` as an array ``[H, W, 3]`` uint8 (a file is decoded)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image as PILImage

        with PILImage.open(image) as handle:
            return np.asarray(handle.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image must be [H, W, 3] uint8, got {array.shape} {array.dtype}")
    return array


def columns_of(rows: Rows) -> list[str]:
    """The columns of a table: the keys of its rows in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: Rows) -> str:
    """``rows`` as a Markdown table (floats with 4 significant digits, missing cells empty)."""
    cols = columns_of(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def flatten(config: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"train": {"loop": {"epochs": 4}}}`` -> ``{"train.loop.epochs": 4}`` (``sep`` between the parts)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------- back-ends
class TensorBoardBackend:
    """``RUN/tensorboard``; on resume the events past ``resume_step`` are dropped (``purge_step``)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, name: str, text: str, step: int) -> None:
        # indented lines are a code block in TensorBoard's Markdown: the text shows as written
        self.writer.add_text(name, "\n".join("    " + line for line in text.splitlines()), step)

    def image(self, name: str, array: np.ndarray, step: int) -> None:
        self.writer.add_image(name, array, step, dataformats="HWC")

    def table(self, name: str, rows: Rows, step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """A W&B run (``project``, ``name``, the resolved ``config``) with its files in ``RUN/wandb``."""

    name = "wandb"

    def __init__(self, run_dir: Path, settings: Any, config: Mapping[str, Any], run_id: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.run_id = run_id or secrets.token_hex(4)  # W&B ids: lower-case letters and digits
        kwargs: dict[str, Any] = {"mode": settings.wandb_mode} if settings.wandb_mode else {}
        try:
            self.run = wandb.init(
                project=settings.project,
                name=settings.run_name or run_dir.resolve().name,
                dir=str(run_dir),
                config=dict(config),
                id=self.run_id,
                resume="allow",
                settings=wandb.Settings(console="off"),  # our log lines stay ours
                **kwargs,
            )
        except Exception as exc:
            raise UserError(
                f"logging.backends: W&B did not start ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "log in (wandb login / WANDB_API_KEY) or log offline with logging.wandb_mode=offline"
            ) from exc

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def text(self, name: str, text: str, step: int) -> None:
        self.run.log({name: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def image(self, name: str, array: np.ndarray, step: int) -> None:
        self.run.log({name: self.wandb.Image(array)}, step=step)

    def table(self, name: str, rows: Rows, step: int) -> None:
        cols = columns_of(rows)
        self.run.log(
            {name: self.wandb.Table(columns=cols, data=[[row.get(c) for c in cols] for row in rows])}, step=step
        )

    def close(self) -> None:
        self.run.finish()


def mlflow_uri(settings: Any, run_dir: Path) -> str:
    """``logging.mlflow_uri``, else ``MLFLOW_TRACKING_URI``, else a file store in ``RUN/mlruns``."""
    return settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()


class MlflowBackend:
    """An MLflow run in experiment ``project``: the config as parameters (on a new run), scalars as
    metrics, text, pictures and tables as artifacts (``NAME.txt``, ``NAME/step_XXXXXXXX.png|json``)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, settings: Any, config: Mapping[str, Any], run_id: str | None) -> None:
        uri = mlflow_uri(settings, run_dir)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps file stores in maintenance mode and refuses them unless asked; a store in
            # the run folder is what makes MLflow work offline, without a server or a database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(settings.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.project)
        if run_id is None:
            name = settings.run_name or run_dir.resolve().name
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.run_id = run_id

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, float(v), now, step) for k, v in values.items()])

    def text(self, name: str, text: str, step: int) -> None:
        self.client.log_text(self.run_id, text, f"{name}.txt")

    def image(self, name: str, array: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, array, artifact_file=f"{name}/step_{step:08d}.png")

    def table(self, name: str, rows: Rows, step: int) -> None:
        cols = columns_of(rows)
        table = {"columns": cols, "data": [[row.get(c) for c in cols] for row in rows]}
        self.client.log_dict(self.run_id, table, f"{name}/step_{step:08d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# ---------------------------------------------------------------------------------------- the tracker
class Tracker:
    """Scalars, text, pictures and tables to each of ``backends`` (none: every call does nothing)."""

    def __init__(self, backends: Sequence[Any] = ()) -> None:
        self.backends = list(backends)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for backend in list(self.backends):
            try:
                call(backend)
            except Exception as exc:  # a log sink must not end a run that trains well
                self.backends.remove(backend)
                log.warning(
                    "logging: %s failed to write %s (%s: %s); it is off for the rest of this run",
                    backend.name,
                    what,
                    type(exc).__name__,
                    exc,
                )

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """The finite numbers of ``values`` (nested mappings flattened: ``bbox/AP``) at ``step``."""
        numbers = {
            k: float(v)
            for k, v in flatten(values, "/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if numbers:
            self._each("scalars", lambda b: b.scalars(step, numbers))

    def text(self, name: str, text: str, step: int = 0) -> None:
        self._each(name, lambda b: b.text(name, text, step))

    def image(self, name: str, image: Image, step: int = 0) -> None:
        """A picture (a file or an array ``[H, W, 3]`` uint8) at ``step``."""
        if not self.backends:
            return
        array = as_array(image)
        self._each(name, lambda b: b.image(name, array, step))

    def table(self, name: str, rows: Rows, step: int) -> None:
        if rows:
            self._each(name, lambda b: b.table(name, rows, step))

    def close(self) -> None:
        self._each("its last records", lambda b: b.close())
        self.backends = []


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        return dict(json.loads((run_dir / IDS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def open_tracker(
    run_dir: str | Path,
    settings: Any,
    backends: Sequence[str],
    resume_step: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> Tracker:
    """A :class:`Tracker` over ``backends`` (names; ``settings``: the run's ``logging`` section) for
    the run in ``run_dir``. ``resume_step`` > 0 continues the W&B / MLflow runs named in
    ``RUN/tracking.json``; ``config`` (the resolved config) goes to W&B's config and MLflow's
    parameters."""
    run_dir = Path(run_dir)
    check_backends(backends)
    ids = _read_ids(run_dir) if resume_step else {}
    opened: list[Any] = []
    try:
        for name in backends:
            if name == "tensorboard":
                opened.append(TensorBoardBackend(run_dir, resume_step))
            elif name == "wandb":
                opened.append(WandbBackend(run_dir, settings, config or {}, ids.get("wandb")))
            else:
                opened.append(MlflowBackend(run_dir, settings, config or {}, ids.get("mlflow")))
    except BaseException:
        Tracker(opened).close()
        raise
    new_ids = {b.name: b.run_id for b in opened if hasattr(b, "run_id")}
    if new_ids:
        atomic_write_json(run_dir / IDS_FILE, {**ids, **new_ids}, indent=2)
    if opened:
        log.info("logging to %s", ", ".join(b.name for b in opened))
    return Tracker(opened)
