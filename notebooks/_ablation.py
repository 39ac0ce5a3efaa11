"""Shared by the ablation notebooks: train one variant with the project's loop, score it on fixed problems, plot.

Not a notebook (the leading underscore keeps it out of `experiments/execute_notebooks.py` and the notebook tests).
Every number comes from a real training run (`sra_jax.train.loop.run`, the loop behind `sra-jax train`) and a real
forward pass over fixed evaluation problems (`sra_jax.train.evaluate.evaluate_synthetic`: teacher-forced exact match =
greedy exact match of a direct answer; attention FLOPs counted from the masks the model used).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from IPython.display import Image, display  # noqa: E402
from scipy import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "experiments") not in sys.path:
    sys.path.insert(0, str(ROOT / "experiments"))
import reasoning_tradeoff as rt  # noqa: E402  (sets the persistent XLA cache: seeds reuse compiled programs)

from sra_jax.data import synthetic  # noqa: E402
from sra_jax.train.config import TrainConfig  # noqa: E402
from sra_jax.train.evaluate import evaluate_synthetic  # noqa: E402
from sra_jax.train.loop import run  # noqa: E402

EVAL_SEED = rt.EVAL_SEED  # the same evaluation problems for every variant and training seed


def preset(tiny: bool, *, steps: int, layers: int | None = None) -> rt.Preset:
    """The experiments' "tiny" (smoke) or "cpu" preset, with `steps` training steps (full setting only)."""
    base = rt.PRESETS["tiny" if tiny else "cpu"]
    changes: dict[str, Any] = {} if tiny else {"steps": steps}
    if layers is not None:
        changes["layers"] = layers
    return dataclasses.replace(base, **changes)


def sra_config(preset_: rt.Preset, seed: int = 0, **sra_changes: Any) -> TrainConfig:
    """The SRA variant of `rt.train_config` with some SRAConfig fields changed."""
    config = rt.train_config(preset_, "sra", seed)
    return dataclasses.replace(config, sra=dataclasses.replace(config.sra, **sra_changes))


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Fixed problems: `held_out` (test split: chain templates never trained on) and `seen` (fresh problems of the
    training templates, drawn with another seed; `seen_overlap` of their questions also occur in training)."""

    held_out: synthetic.SyntheticBatch
    seen: synthetic.SyntheticBatch
    seen_overlap: float


def eval_set(config: TrainConfig, size: int) -> EvalSet:
    task, seq_len, form = config.data.synthetic, config.data.seq_len, config.data.form
    tokenizer = synthetic.SyntheticTokenizer()
    held_out = synthetic.generate(task, size, split="test", seed=EVAL_SEED)
    seen = synthetic.generate(task, size, split="train", seed=EVAL_SEED)
    trained = {p.question for p in synthetic.generate(task, config.steps * config.batch_size, split="train",
                                                      seed=config.data.seed)}
    overlap = float(np.mean([p.question in trained for p in seen]))
    return EvalSet(synthetic.make_batch(held_out, tokenizer, seq_len, form=form),
                   synthetic.make_batch(seen, tokenizer, seq_len, form=form), overlap)


def train_and_score(config: TrainConfig, evals: EvalSet, **labels: Any) -> dict[str, Any]:
    """Train `config` from scratch, then score it on `evals`; one flat record (labels first)."""
    began = time.perf_counter()
    result = run(config)
    train_s = time.perf_counter() - began
    model = result.trainer.model(result.state.params)
    held_out = evaluate_synthetic(model, evals.held_out)
    seen = evaluate_synthetic(model, evals.seen)
    record = {
        **labels,
        "seed": config.seed,
        "accuracy": held_out["accuracy"],
        "seen_accuracy": seen["accuracy"],
        "selected_fraction": held_out["selected_fraction"],
        "attention_flops_ratio": held_out["attention_flops_ratio"],
        "router_flops_per_token": int(model.router_flops_per_token()),
        "final_train_ce": float(np.mean([h["ce"] for h in result.history[-10:]])),
        "train_s": train_s,
        "step_s": float(np.median([h["step_time"] for h in result.history[1:]])) if len(result.history) > 1 else
        float("nan"),
    }
    record["model"] = model  # for notebooks that look inside (`table` shows only the columns it is given)
    record["history"] = result.history
    return record


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval over seeds; nan for one seed)."""
    array = np.asarray(values, np.float64)
    if len(array) < 2:
        return float(array.mean()), float("nan")
    return float(array.mean()), float(stats.t.ppf(0.975, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))


def binomial_ci(accuracy: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy measured on n problems (the evaluation noise of a single run)."""
    result = stats.binomtest(int(round(accuracy * n)), n).proportion_ci(0.95, method="wilson")
    return float(result.low), float(result.high)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Fixed-width text table of `columns` (floats as percentages when they are fractions)."""
    def cell(key, value):
        if isinstance(value, float) and key in ("accuracy", "seen_accuracy", "selected_fraction"):
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(k, r[k]) for k in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def show(fig, name: str) -> None:
    """Inline PNG in the notebook's outputs (no file is left behind)."""
    path = Path(f"{name}.png").resolve()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    path.unlink()
