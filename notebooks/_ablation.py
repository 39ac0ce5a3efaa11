"""Shared by the ablation notebooks: the longhop setting, the dense base, SRA retrofitted onto it, scoring, plots.

Not a notebook (the leading underscore keeps it out of `experiments/execute_notebooks.py` and the notebook tests).
Every training run is a stage of `sra_jax.train.stages`, the commands a user runs: the dense base is `sra-jax train`
on longhop problems then `sra-jax export` (a Hugging Face Llama folder), and each SRA variant is `sra-jax train` with
`init: {from: <base export>, trainable: router}` (routers trained by policy gradient with a token penalty and KL to
the dense teacher, `sra_jax.train.demo.DEMO_ROUTER_LOSS`; the Llama stays bit-identical) then `sra-jax export`.
Every number is a forward pass of an export over fixed held-out problems (`sra_jax.train.longhop_eval.score`:
teacher-forced exact match = greedy answer; FLOPs counted from the masks used; router precision / recall against the
oracle critical set over the prompt).

The full (CPU) setting is the `sra-jax demo` run: 2 layers x 64 wide, 128-token prompts, dense base 800 steps. Its
stages live in runs/notebooks/ of the checkout, so the notebooks share one base and a re-run skips every stage whose
export verifies; TINY stages live in $SRA_JAX_NOTEBOOK_WORKDIR or a fresh temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from IPython.display import Image, display  # noqa: E402

from sra_jax.config import SRAConfig  # noqa: E402
from sra_jax.convert.source import load_source  # noqa: E402
from sra_jax.data import longhop  # noqa: E402
from sra_jax.evals.stats import wilson_interval  # noqa: E402
from sra_jax.train import demo, longhop_eval  # noqa: E402
from sra_jax.train.config import InitConfig, LossConfig  # noqa: E402
from sra_jax.train.data import LonghopStream  # noqa: E402
from sra_jax.train.stages import Stage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_TASK = longhop.LonghopConfig(context_len=40, longer_context_len=64, min_hops=1, max_hops=2, num_vars=16,
                                  value_range=8, operand_max=2, extra_test_hops=1)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One notebook setting: the task, training lengths, evaluation size and where the stages live."""

    tiny: bool
    task: longhop.LonghopConfig
    base_steps: int
    router_steps: int
    eval_size: int
    workdir: Path
    sra: SRAConfig  # the reference SRA settings; each notebook varies some fields

    def describe(self) -> str:
        return (f"TINY={self.tiny}: longhop {self.task.context_len}-token prompts, {self.task.min_hops}-"
                f"{self.task.max_hops} hops, values mod {self.task.value_range} (uniform guess "
                f"{1 / self.task.value_range:.1%}); 2 layers x 64 wide; dense base {self.base_steps} steps, each router "
                f"{self.router_steps} steps (batch 32, group 4); {self.eval_size} held-out (test split) problems per "
                f"row; stages in {self.workdir}")


def setting(tiny: bool, *, router_steps: int = demo.DEMO_ROUTER_STEPS) -> Setting:
    """TINY: a 40-token task, 2 base steps and 1 router step (a smoke run) in $SRA_JAX_NOTEBOOK_WORKDIR (the tests
    share one folder, so one tiny base serves every notebook) or a fresh temporary folder; else the `sra-jax demo`
    setting."""
    sra = dataclasses.replace(demo.DEMO_SRA, selection="gumbel_topk")
    if tiny:
        workdir = os.environ.get("SRA_JAX_NOTEBOOK_WORKDIR") or tempfile.mkdtemp(prefix="sra-notebook-")
        return Setting(True, TINY_TASK, 2, 1, 16, Path(workdir), dataclasses.replace(sra, window=4))
    return Setting(False, demo.DEMO_TASK, demo.DEMO_STEPS, router_steps, 256, ROOT / "runs" / "notebooks", sra)


def base(s: Setting) -> Path:
    """The dense base's export: `sra-jax train` (sl on longhop problems) then `sra-jax export`."""
    return Stage(s.workdir / "base").run(demo.demo_config(None, steps=s.base_steps, task=s.task),
                                         description="dense base")


def retrofit(s: Setting, name: str, sra: SRAConfig, *, loss: LossConfig = demo.DEMO_ROUTER_LOSS) -> Path:
    """The export of SRA `sra` retrofitted onto the base: `sra-jax train` with `init: {from: <base export>,
    trainable: router}` then `sra-jax export` (stage runs/notebooks/<name>)."""
    config = dataclasses.replace(demo.demo_config(sra, steps=s.router_steps, task=s.task, loss=loss),
                                 init=InitConfig(from_=str(base(s)), trainable="router"))
    return Stage(s.workdir / name).run(config, description=name)


def history(s: Setting, name: str) -> list[dict[str, Any]]:
    """The metrics.jsonl rows the loop logged for stage `name` (one per step)."""
    path = Stage(s.workdir / name).logs / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


_BATCHES: dict[tuple, longhop.LonghopBatch] = {}


def eval_batch(s: Setting, split: str = "test") -> longhop.LonghopBatch:
    """The first `eval_size` problems of `split` (seed 0), the same for every variant."""
    key = (s.task, s.eval_size, split)
    if key not in _BATCHES:
        data = demo.demo_config(None, steps=1, task=s.task).data
        _BATCHES[key] = LonghopStream(data, 32).eval_batch(s.eval_size, split)
    return _BATCHES[key]


def score(s: Setting, export: Path, sra: SRAConfig, source: str, *, split: str = "test", **labels: Any) -> dict:
    """One row: the model in `export` with SRA settings `sra` (its own routers when they fit), critical set from
    `source` (dense / window / random / oracle / learned), on the test problems; labels first."""
    _, _, model = load_source(export, sra=sra)
    metrics = longhop_eval.score(model, eval_batch(s, split), source, alpha=sra.critical_fraction, seed=0)
    return {**labels, "source": source, **metrics}


def picks(s: Setting, export: Path, sra: SRAConfig, split: str = "test") -> np.ndarray:
    """The routers' critical sets [layers, b, s] on the test problems (deterministic top-k, `key=None`, as at
    inference)."""
    _, _, model = load_source(export, sra=sra)
    batch = eval_batch(s, split)
    forward = nnx.jit(lambda m, t, p: m(t, p)[1].critical)
    return np.concatenate([np.asarray(forward(model, jnp.asarray(batch.tokens[i:i + 64]),
                                              jnp.asarray(batch.positions[i:i + 64])))
                           for i in range(0, len(batch.tokens), 64)], axis=1)


def references(s: Setting, sra: SRAConfig | None = None) -> dict[str, dict]:
    """The dense, window-only and oracle rows of the base under `sra` (default the setting's)."""
    sra = sra or s.sra
    export = base(s)
    return {source: score(s, export, sra, source, variant=source) for source in ("dense", "window", "oracle")}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Fixed-width text table of `columns` (fractions as percentages)."""
    percent = ("accuracy", "ci_low", "ci_high", "selected_fraction", "router_precision", "router_recall")

    def cell(key, value):
        if isinstance(value, float) and key in percent:
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(k, r.get(k, "")) for k in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


COLUMNS = ["accuracy", "ci_low", "ci_high", "selected_fraction", "router_precision", "router_recall",
           "attention_flops_vs_dense", "total_flops_vs_dense"]


def interval_note(s: Setting, accuracy: float = 0.15) -> str:
    low, high = wilson_interval(int(round(accuracy * s.eval_size)), s.eval_size)
    return (f"one training seed per row; a row's 95% Wilson interval at {accuracy:.0%} accuracy on {s.eval_size} "
            f"problems is [{low:.1%}, {high:.1%}]")


def show(fig, name: str) -> None:
    """Inline PNG in the notebook's outputs (no file is left behind)."""
    path = Path(f"{name}.png").resolve()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    path.unlink()
