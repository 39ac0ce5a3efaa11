"""Does a learned router find the tokens that matter? Dense, window-only, random, oracle and learned critical sets
(and chain of thought) on the long-context multi-hop task (sra_jax.data.longhop), at matched budgets alpha.

Per seed, every training run is a stage of `sra_jax.train.stages` (a config.yaml run by `sra-jax train`'s loop,
exported by `sra-jax export` as a Hugging Face Llama folder), so the experiment is the retrofit recipe a user runs:
  1. base      a dense Llama pretrained on longhop (direct answers; with CoT variants also one on the CoT form),
               exported to WORKDIR/base-FORM-seedS/hf.
  2. forced    that export loaded with SRA layers (queries="all") and a forced critical set: `dense` (every token:
               exactly causal attention), `window` (no token: window + globals), `random` (alpha * tokens uniformly),
               `oracle` (the answer key: the chain's statements).
  3. learned   SRA retrofitted onto the export through `init: {from: base export, trainable: router}` (only the
               routers move; the Llama stays bit-identical): loss.kind="rl", reward correctness - token_penalty *
               selected fraction, without (`learned_rl`) and with KL to the dense teacher (`learned_rl_kl`); router
               distillation (loss.router_distill_weight: each router's softmax toward the dense teacher's attention
               mass per key, from the answer queries) alone (`learned_distill`) and with the RL (`learned_distill_rl`);
               the gpu scale then trains routers and Llama jointly from the `learned_rl_kl` export (`learned_joint`:
               `init: {from: router export, trainable: all}`, loss.kind="sl+rl"). Each variant is scored from its
               export.
  4. cot       `cot_dense` (the CoT base, dense) and `cot_sra` (routers retrofitted onto the CoT base) when the scale
               has CoT.
  5. per-query `nsa` and `dsa` (`Scale.per_query_kinds`): NSA / DSA layers retrofitted onto the direct base the same
               way (`init: {from: base export, trainable: router}`: only their extras train; NSA's gates and pool on
               the cross-entropy, DSA's lightning indexer on its KL to the dense attention, the warm-up stage), at
               the SRA budgets: a query selects about alpha * context_len keys (DSA top_k = ceil(alpha * L); NSA
               round(alpha * L / block) selected blocks of `Scale.nsa_block`, beside its compressed branch and the
               SRA window). Their attention FLOPs are measured (pairs attended + the DSA indexer's scoring).
Every variant answers the held-out splits test / new_values / more_hops / longer (longer: contexts past the trained
length). A stage whose export verifies (WORKDIR/STAGE/export.json: step and sha256 of every file) is skipped, one cut
short resumes from its checkpoint; rows are appended to rows.jsonl (in --record-dir, default WORKDIR) as they finish
and skipped when present. So an invocation cut by --time-budget (exit 3) or killed resumes where it stopped, and one
on a machine that lost WORKDIR but has the record retrains only what unfinished rows need; every invocation rewrites
the results JSON + MD.

    python experiments/longhop.py --scale cpu                       # ~12 min on 2 CPU cores
    python experiments/longhop.py --scale gpu --time-budget 300 --record-dir experiments/results/longhop-gpu-record
                                                                    # repeat until it prints "all rows done"
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from sra_jax.config import DSAConfig, LlamaConfig, NSAConfig, SRAConfig
from sra_jax.convert.source import load_source
from sra_jax.data import longhop
from sra_jax.train import longhop_eval, stages
from sra_jax.train.config import (CheckpointConfig, DataConfig, InitConfig, LogConfig, LossConfig, OptimConfig,
                                  RouterRLConfig, TrainConfig)
from sra_jax.train.data import LonghopStream
from sra_jax.train.loop import StopFlag

HYPOTHESIS = (
    "At alpha = 0.1, SRA with the learned router keeps >= 90% of dense accuracy on the test "
    "split where window-only falls to chance (1 / value_range); random critical tokens sit between window-only and "
    "dense; the oracle set is about dense. Router recall against the oracle is well above alpha (random's recall). "
    "On the longer split every variant loses accuracy, and the selective ones no more than dense."
)
# Router distillation (learned_distill*): the answer queries' attention mass; see experiments/results/
# longhop-router-diagnostics-cpu-*.json for the measurement behind the choice.
DISTILL_QUERIES = "target"
ROUTER_KINDS = ("rl", "rl_kl", "distill", "distill_rl", "joint")  # Experiment.router's kinds
PER_QUERY_KINDS = ("nsa", "dsa")  # Experiment.per_query's kinds
DISTILL_HYPOTHESIS = (
    "Router distillation (learned_distill, learned_distill_rl) makes the router's picks follow the dense teacher's "
    "attention mass from the answer queries, so its precision and recall against the oracle rise to about those of "
    "the teacher's own top-mass keys (measured on the CPU base before the run: precision 8-13% at alpha 0.05, 2x the "
    "5.5% of random picks) and above RL-only routers; it does not reach the oracle, because the dense teacher itself "
    "spreads most of its mass off the answer key. Accuracy stays within the CI of the RL-only router and of dense."
)
SPLITS = ("test", "new_values", "more_hops", "longer")
ROW_KEYS = ("variant", "alpha", "seed", "context_len", "split", "accuracy", "ci_low", "ci_high",
            "attention_flops_vs_dense", "total_flops_vs_dense", "latency_ms", "selected_fraction",
            "router_precision", "router_recall")


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one invocation preset."""

    task: longhop.LonghopConfig
    layers: int
    hidden: int
    heads: int
    window: int
    base_steps: int
    router_steps: int
    batch_size: int
    eval_size: int
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    cot: bool
    joint: bool
    learning_rate: float
    note: str
    # Router trainings of the direct form, each a `learned_<kind>` row (`Experiment.router`); "joint" joins with `joint`.
    learned_kinds: tuple[str, ...] = ("rl", "rl_kl", "distill", "distill_rl")
    # Per-query selection retrofits of the direct form, each an `nsa` / `dsa` row (`Experiment.per_query`).
    per_query_kinds: tuple[str, ...] = ("nsa", "dsa")
    # NSA's selection block; its compression pool takes 2 * nsa_block keys at stride nsa_block (NSA's l = 2 d).
    nsa_block: int = 4


SCALES = {
    # Seconds: the direct-answer stages and variants on a 1-layer model, for the tests (CoT and joint: gpu only).
    "tiny": Scale(task=longhop.LonghopConfig(context_len=40, longer_context_len=64, min_hops=1, max_hops=2,
                                             num_vars=16, value_range=8, operand_max=2, extra_test_hops=1),
                  layers=1, hidden=32, heads=2, window=4, base_steps=2, router_steps=2, batch_size=8, eval_size=8,
                  alphas=(0.25,), seeds=(0,), cot=False, joint=False, learning_rate=1e-3,
                  note="tiny smoke setting: numbers mean nothing"),
    # 2 shared CPU cores, ~12 minutes: one seed, three alphas, no CoT, no joint stage.
    "cpu": Scale(task=longhop.LonghopConfig(context_len=128, longer_context_len=256, min_hops=1, max_hops=2,
                                            num_vars=64, value_range=16, operand_max=3),
                 layers=2, hidden=64, heads=4, window=8, base_steps=1000, router_steps=150, batch_size=32,
                 eval_size=256, alphas=(0.05, 0.1, 0.2), seeds=(0,), cot=False, joint=False, learning_rate=3e-3,
                 note="CPU run: 1 seed; alpha 0.05 / 0.1 (the alpha 0.2 rows did not fit the time on 2 shared "
                      "cores); no CoT variants, no joint stage; 128-token prompts, window 8; latency measured on a "
                      "CPU shared with other jobs (noisy)"),
    # One H200, invocations of <= 8 minutes (--time-budget 420), resumable: 3 seeds, every alpha, CoT, joint.
    "gpu": Scale(task=longhop.LonghopConfig(context_len=1024, longer_context_len=2048, min_hops=1, max_hops=3,
                                            num_vars=512, value_range=32, operand_max=5),
                 layers=6, hidden=512, heads=8, window=32, base_steps=2000, router_steps=200, batch_size=16,
                 eval_size=512, alphas=(0.02, 0.05, 0.1, 0.2), seeds=(0, 1, 2), cot=True, joint=True,
                 learning_rate=1e-3, nsa_block=16, note="GPU run: 3 seeds, every alpha, CoT and joint stages"),
}


class OutOfTime(Exception):
    """The invocation's --time-budget is spent; the next invocation resumes."""


class Experiment:
    def __init__(self, scale_name: str, workdir: Path, results_dir: Path, time_budget: float | None,
                 overrides: dict[str, Any], record_dir: Path | None = None):
        self.scale_name = scale_name
        self.scale = dataclasses.replace(SCALES[scale_name], **overrides)
        unknown = set(self.scale.learned_kinds) - set(ROUTER_KINDS)
        if unknown or "joint" in self.scale.learned_kinds:
            raise ValueError(f"learned_kinds={self.scale.learned_kinds}: each must be one of {ROUTER_KINDS[:-1]} "
                             f"(the joint stage follows `joint`)")
        if set(self.scale.per_query_kinds) - set(PER_QUERY_KINDS):
            raise ValueError(f"per_query_kinds={self.scale.per_query_kinds}: each must be one of {PER_QUERY_KINDS}")
        self.workdir, self.results_dir = workdir, results_dir
        self.deadline = None if time_budget is None else time.monotonic() + time_budget
        workdir.mkdir(parents=True, exist_ok=True)
        # rows.jsonl and meta.json: small, and all a later invocation needs to skip finished rows (the stages' folders
        # in workdir only save retraining); record_dir keeps them where they outlive a machine that loses workdir.
        self.record_dir = Path(record_dir or workdir)
        self.record_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self.record_dir / "meta.json"
        if not meta_path.exists():
            meta_path.write_text(json.dumps({"date": datetime.date.today().isoformat(), "scale": scale_name}))
        self.meta = json.loads(meta_path.read_text())
        self.rows_path = self.record_dir / "rows.jsonl"
        self.rows = [json.loads(line) for line in self.rows_path.read_text().splitlines()] if self.rows_path.exists() else []
        self.done = {self._key(r) for r in self.rows}
        self.training_tokens: dict[str, int] = self.meta.get("training_tokens", {})

    @staticmethod
    def _key(row: dict[str, Any]) -> tuple:
        return row["variant"], row["alpha"], row["seed"], row["split"]

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime

    # -- configs -------------------------------------------------------------------------------------------------
    def model_config(self) -> LlamaConfig:
        s = self.scale
        return LlamaConfig.tiny(vocab_size=longhop.LonghopTokenizer(s.task).vocab_size, hidden_size=s.hidden,
                                intermediate_size=3 * s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                num_key_value_heads=max(1, s.heads // 2),
                                max_position_embeddings=longhop.sequence_length(s.task, "cot", "longer"))

    def sra_config(self, alpha: float) -> SRAConfig:
        return SRAConfig(critical_fraction=alpha, window=self.scale.window, num_global=longhop.HEADER_LEN,
                         queries="all", router_hidden=32, selection="gumbel_topk")

    def per_query_config(self, kind: str, alpha: float) -> SRAConfig:
        """NSA / DSA layers on every layer at the budget alpha: each query selects about ceil(alpha * context_len)
        keys, as SRA's critical set holds ceil(alpha * tokens) (DSA: top_k of them; NSA: that many keys in whole
        selected blocks of nsa_block, at least one, beside its compressed branch (pools of 2 * nsa_block keys at
        stride nsa_block) and a window of SRA's size)."""
        s = self.scale
        keys = max(1, math.ceil(alpha * s.task.context_len - 1e-9))
        if kind == "nsa":
            b = s.nsa_block
            nsa = NSAConfig(block=2 * b, stride=b, block_sel=b, top_n=max(1, round(keys / b)), window=s.window)
            return SRAConfig(attention="nsa", nsa=nsa)
        head_dim = s.hidden // s.heads
        dsa = DSAConfig(top_k=keys, indexer_heads=max(2, s.heads // 2), indexer_dim=max(8, head_dim // 2), block_q=16,
                        indexer_block_k=256, indexer_loss="dense")
        return SRAConfig(attention="dsa", dsa=dsa)

    def train_config(self, form: str, seed: int, *, sra: SRAConfig | None, loss: LossConfig,
                     steps: int) -> TrainConfig:
        """A stage's run (checkpoint.dir and log.dir are set by the stage)."""
        s = self.scale
        return TrainConfig(
            model=self.model_config(), sra=sra,
            optim=OptimConfig(learning_rate=s.learning_rate, warmup_steps=min(50, steps // 5)),
            loss=loss,
            data=DataConfig(task="longhop", form=form, seq_len=longhop.sequence_length(s.task, form), seed=seed,
                            eval_size=s.eval_size, longhop=s.task),
            checkpoint=CheckpointConfig(every=100, keep=1),
            log=LogConfig(tensorboard=False, progress=False),
            steps=steps, batch_size=s.batch_size, seed=seed,
        )

    # -- training ------------------------------------------------------------------------------------------------
    def _stage(self, name: str, config: TrainConfig) -> Path:
        """Stage `name` (WORKDIR/name) of `config`: its verified export, trained and exported first unless present;
        OutOfTime when the time budget stops the training (the next invocation resumes from its checkpoint)."""
        stage = stages.Stage(self.workdir / name)
        if stage.verified(config):
            return stage.export
        self.check_time()
        stop = StopFlag()

        def on_step(step: int, metrics: dict[str, float]) -> None:
            if self.deadline is not None and time.monotonic() > self.deadline:
                stop.signal = signal.SIGTERM

        print(f"[{name}] training {config.steps} steps: {' && '.join(stage.commands())}", flush=True)
        export = stage.run(config, stop=stop, on_step=on_step, description=name)
        if export is None:
            raise OutOfTime
        print(f"[{name}] done: {export}", flush=True)
        self.training_tokens[name] = config.steps * config.batch_size * config.data.seq_len
        self.meta["training_tokens"] = self.training_tokens
        (self.record_dir / "meta.json").write_text(json.dumps(self.meta))
        return export

    def base(self, form: str, seed: int) -> Path:
        """The export (Hugging Face folder) of the dense base pretrained on `form` problems."""
        config = self.train_config(form, seed, sra=None, loss=LossConfig(kind="sl"), steps=self.scale.base_steps)
        return self._stage(f"base-{form}-seed{seed}", config)

    def router(self, base_export: Path, form: str, seed: int, alpha: float, kind: str) -> Path:
        """The export of SRA retrofitted onto `base_export`: "rl" (routers only, token penalty), "rl_kl" (+ KL to the
        dense teacher), "distill" (routers only, KL to the dense teacher's attention mass per key, no RL),
        "distill_rl" (that + "rl"), "joint" (sl+rl of every parameter, starting from the rl_kl export)."""
        explore = RouterRLConfig(entropy_weight=0.01)
        losses = {
            "rl": LossConfig(kind="rl", token_penalty=0.1, group_size=4, router_rl=explore),
            "rl_kl": LossConfig(kind="rl", token_penalty=0.1, group_size=4, router_rl=explore, teacher_kl_weight=1.0),
            # Distillation only: no cross-entropy (sl_weight 0), no policy gradient; and distillation + RL.
            "distill": LossConfig(kind="sl", sl_weight=0.0, router_distill_weight=1.0,
                                  router_distill_queries=DISTILL_QUERIES),
            "distill_rl": LossConfig(kind="rl", token_penalty=0.1, group_size=4, router_rl=explore,
                                     router_distill_weight=1.0, router_distill_queries=DISTILL_QUERIES),
            "joint": LossConfig(kind="sl+rl", token_penalty=0.1, group_size=4, router_rl=explore,
                                teacher_kl_weight=1.0),
        }
        init = InitConfig(from_=str(base_export), trainable="router")
        if kind == "joint":
            init = InitConfig(from_=str(self.router(base_export, form, seed, alpha, "rl_kl")), trainable="all")
        config = dataclasses.replace(
            self.train_config(form, seed, sra=self.sra_config(alpha), loss=losses[kind],
                              steps=self.scale.router_steps), init=init)
        return self._stage(f"router-{form}-{kind}-a{alpha}-seed{seed}", config)

    def per_query(self, base_export: Path, seed: int, alpha: float, kind: str) -> Path:
        """The export of NSA / DSA layers (`per_query_config`) retrofitted onto the direct base: only their extras
        train (init.trainable router), on the cross-entropy (NSA's gates and pool) and the DSA indexer's KL to the
        dense attention (loss.indexer_kl_weight, on by default: the DSA warm-up stage)."""
        config = dataclasses.replace(
            self.train_config("direct", seed, sra=self.per_query_config(kind, alpha), loss=LossConfig(kind="sl"),
                              steps=self.scale.router_steps),
            init=InitConfig(from_=str(base_export), trainable="router"))
        return self._stage(f"perquery-direct-{kind}-a{alpha}-seed{seed}", config)

    # -- evaluation ----------------------------------------------------------------------------------------------
    def evaluate(self, variant: str, source: str, export: Path, form: str, seed: int, alpha: float | None,
                 sra: SRAConfig | None = None) -> None:
        """Rows of `variant` on every split (skipping those already in rows.jsonl), scoring the model in `export`
        (a Hugging Face folder) with SRA layers: its own routers for "learned", a forced critical set otherwise; or,
        with `sra` (source "per_query"), with those NSA / DSA layers."""
        todo = [split for split in SPLITS if (variant, alpha, seed, split) not in self.done]
        if not todo:
            return
        self.check_time()
        sra_alpha = alpha if alpha and alpha < 1 else 0.1  # forced sets ignore critical_fraction
        config = self.train_config(form, seed, sra=sra or self.sra_config(sra_alpha), loss=LossConfig(kind="sl"),
                                   steps=1)
        # An export with routers of this SRAConfig keeps them (the learned rows); a dense one gets fresh routers
        # (unused: the forced rows override the critical set).
        _, _, model = load_source(export, sra=config.sra, router_seed=seed)
        stream = LonghopStream(config.data, config.batch_size)
        for split in todo:
            batch = stream.eval_batch(self.scale.eval_size, split)
            metrics = longhop_eval.score(model, batch, source, alpha=sra_alpha, seed=seed)
            row = {"variant": variant, "alpha": alpha, "seed": seed, "context_len": self.scale.task.context_for(split),
                   "split": split, **{k: metrics[k] for k in ROW_KEYS if k in metrics},
                   "n": metrics["n"], "generated_tokens": metrics["generated_tokens"], "form": form}
            self.rows.append(row)
            self.done.add(self._key(row))
            with self.rows_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {variant:14s} alpha={alpha} {split:10s} acc {row['accuracy']:.3f} "
                  f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] attn {row['attention_flops_vs_dense']:.2f}x "
                  f"sel {row['selected_fraction']:.3f} P/R {_fmt(row['router_precision'])}/"
                  f"{_fmt(row['router_recall'])}", flush=True)

    def needs(self, variant: str, seed: int, alphas) -> bool:
        return any((variant, a, seed, split) not in self.done for a in alphas for split in SPLITS)

    def run(self) -> bool:
        """Every row of the scale; False when the time budget stopped it first."""
        s = self.scale
        try:
            for seed in s.seeds:
                forms = ("direct", "cot") if s.cot else ("direct",)
                for form in forms:
                    prefix = "" if form == "direct" else "cot_"
                    fixed = [("dense", "dense", 1.0)] if form == "cot" else [
                        ("dense", "dense", 1.0), ("window", "window", 0.0), ("oracle", "oracle", None)]
                    learned_kinds = ([*s.learned_kinds] + (["joint"] if s.joint else [])
                                     if form == "direct" else ["rl"])
                    per_query = list(s.per_query_kinds) if form == "direct" else []
                    variants = [prefix + v for v, _, _ in fixed] + (["random"] if form == "direct" else []) + [
                        f"learned_{k}" if form == "direct" else "cot_sra" for k in learned_kinds] + per_query
                    if not any(self.needs(v, seed, [a]) for v, _, a in fixed) and not any(
                            self.needs(v, seed, s.alphas) for v in variants[len(fixed):]):
                        continue
                    self.check_time()
                    base = self.base(form, seed)
                    for variant, source, alpha in fixed:
                        self.evaluate(prefix + variant, source, base, form, seed, alpha)
                    for alpha in s.alphas:
                        if form == "direct":
                            self.evaluate("random", "random", base, form, seed, alpha)
                        for kind in learned_kinds:
                            variant = f"learned_{kind}" if form == "direct" else "cot_sra"
                            if self.needs(variant, seed, [alpha]):
                                self.check_time()
                                export = self.router(base, form, seed, alpha, kind)
                                self.evaluate(variant, "learned", export, form, seed, alpha)
                        for kind in per_query:
                            if self.needs(kind, seed, [alpha]):
                                self.check_time()
                                export = self.per_query(base, seed, alpha, kind)
                                self.evaluate(kind, "per_query", export, form, seed, alpha,
                                              sra=self.per_query_config(kind, alpha))
        except OutOfTime:
            print("time budget spent: run the same command again to resume", flush=True)
            return False
        finally:
            self.write()
        print("all rows done", flush=True)
        return True

    # -- results -------------------------------------------------------------------------------------------------
    def write(self) -> tuple[Path, Path]:
        device = jax.devices()[0]
        device_name = "cpu" if device.platform == "cpu" else device.device_kind.lower().replace(" ", "-")
        stem = self.results_dir / f"longhop-{device_name}-{self.meta['date']}"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        model = self.model_config()
        params = count_parameters(model)
        s = self.scale
        record = {
            "hypothesis": HYPOTHESIS, "hypothesis_router_distill": DISTILL_HYPOTHESIS,
            "device": device.device_kind, "date": self.meta["date"], "scale": self.scale_name, "note": s.note,
            "versions": {"jax": jax.__version__, "flax": _version("flax"), "python": platform.python_version(),
                         "numpy": np.__version__},
            "model": {**model.to_hf(), "parameters": params}, "sra": dataclasses.asdict(self.sra_config(0.1)),
            "task": dataclasses.asdict(s.task), "chance": 1.0 / s.task.value_range,
            "training_tokens": self.training_tokens,
            "training": {"base_steps": s.base_steps, "router_steps": s.router_steps, "batch_size": s.batch_size,
                         "learning_rate": s.learning_rate, "learned_kinds": list(s.learned_kinds)},
            "per_query": {f"{kind}-a{alpha}": dataclasses.asdict(getattr(self.per_query_config(kind, alpha), kind))
                          for kind in s.per_query_kinds for alpha in s.alphas},
            "eval_size": s.eval_size, "seeds": list(s.seeds), "alphas": list(s.alphas),
            "rows": self.rows,
        }
        stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(record))
        return stem.with_suffix(".json"), stem.with_suffix(".md")


def _fmt(value: float | None, digits: int = 2) -> str:
    """A number of a row, or "-" where the row has none (router precision / recall of NSA / DSA rows)."""
    return "-" if value is None else f"{value:.{digits}f}"


def count_parameters(model: LlamaConfig) -> int:
    """Parameters of the dense model (no routers), counted from its abstract state."""
    from sra_jax.nn import Llama

    _, state, _ = jax.eval_shape(lambda: nnx.split(Llama(model, rngs=nnx.Rngs(0)), nnx.Param, ...))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def markdown(record: dict[str, Any]) -> str:
    """The results page: hypothesis first, then one table per split (rows pooled over seeds: accuracy is the mean
    of the seeds; the CI is the Wilson interval of the pooled counts)."""
    from sra_jax.evals.stats import wilson_interval

    lines = [f"# longhop on {record['device']} ({record['date']}, scale {record['scale']})", "",
             f"**Hypothesis (stated before running).** {record['hypothesis']}", "",
             f"**Router distillation hypothesis (stated before running).** {record['hypothesis_router_distill']}", "",
             f"{record['note']}. Model: {record['model']['num_hidden_layers']} layers, "
             f"hidden {record['model']['hidden_size']}, {record['model']['parameters']:,} parameters; "
             f"training tokens per run: {record['training_tokens']}. Task: {record['task']}. "
             f"Chance = {record['chance']:.3f}. SRA: window {record['sra']['window']}, "
             f"num_global {record['sra']['num_global']}, queries 'all'.", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in record["rows"]:
        groups.setdefault((row["split"], row["variant"], row["alpha"]), []).append(row)
    header = ("| variant | alpha | seeds | L | accuracy | 95% CI | attn FLOPs vs dense | total FLOPs vs dense | "
              "selected | router P | router R | latency ms/query |")
    for split in SPLITS:
        keys = [k for k in groups if k[0] == split]
        if not keys:
            continue
        lines += [f"## split: {split}", "", header, "|" + "---|" * 12]
        for key in keys:
            rows = groups[key]
            n = sum(r["n"] for r in rows)
            correct = round(sum(r["accuracy"] * r["n"] for r in rows))
            low, high = wilson_interval(correct, n)
            def mean(k, rows=rows):
                return None if any(r[k] is None for r in rows) else float(np.mean([r[k] for r in rows]))

            lines.append(f"| {key[1]} | {key[2] if key[2] is not None else 'oracle'} | {len(rows)} | "
                         f"{rows[0]['context_len']} | {mean('accuracy'):.3f} | [{low:.3f}, {high:.3f}] | "
                         f"{mean('attention_flops_vs_dense'):.3f} | {mean('total_flops_vs_dense'):.3f} | "
                         f"{mean('selected_fraction'):.3f} | {_fmt(mean('router_precision'))} | "
                         f"{_fmt(mean('router_recall'))} | {mean('latency_ms'):.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--workdir", help="the stages (checkpoints, exports) and, unless --record-dir, rows.jsonl and "
                                          "meta.json (default runs/longhop-SCALE in the checkout)")
    parser.add_argument("--record-dir", help="rows.jsonl and meta.json (kilobytes): finished rows are skipped, so keeping "
                                             "these is enough to resume on a machine that lost --workdir")
    parser.add_argument("--results-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--time-budget", type=float, help="seconds; stop cleanly (checkpointed) after this")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a Scale field (ints, floats, comma-separated tuples), e.g. base_steps=20")
    args = parser.parse_args(argv)
    overrides = {}
    fields = {f.name: f for f in dataclasses.fields(Scale)}
    for item in args.overrides:
        name, _, value = item.partition("=")
        if name not in fields or name in ("task", "note"):
            parser.error(f"--set {item!r}: {name!r} is not a Scale field ({sorted(set(fields) - {'task', 'note'})})")
        current = getattr(SCALES[args.scale], name)
        if isinstance(current, tuple):
            overrides[name] = tuple(type(current[0])(v) for v in value.split(",") if v)  # "" gives ()
        elif isinstance(current, bool):
            overrides[name] = value.lower() in ("1", "true", "yes")
        else:
            overrides[name] = type(current)(value)
    workdir = Path(args.workdir or Path(__file__).parents[1] / "runs" / f"longhop-{args.scale}")
    experiment = Experiment(args.scale, workdir, Path(args.results_dir), args.time_budget, overrides,
                            Path(args.record_dir) if args.record_dir else None)
    finished = experiment.run()
    json_path, md_path = experiment.write()
    print(f"results: {json_path} and {md_path}")
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
