"""Standard vs chain-of-thought vs SRA on the synthetic multi-hop task: accuracy against compute, over seeds.

Each variant is trained from scratch with `sra_jax.train.loop.run` (the same loop as `sra-jax train`), then answers
held-out problems (chain templates never seen in training) by greedy generation with the KV cache
(`sra_jax.generate.generate`); an answer is correct when the number after its last `#` is right.

  standard  dense attention, answers directly (`#14`)
  cot       dense attention, writes each hop's value, then the answer (`b=7 c=14 #14`)
  sra       sparse attention, answers directly; the router is trained with the project's losses
            (loss.kind="sl+rl": next-token CE plus the Plackett-Luce policy gradient whose reward is
            correctness minus token_penalty * selected fraction)

FLOPs per query are counted on the tokens the model actually processed (prompt + generated): matmuls
2 * (non-embedding, non-router params) per token, the routers' FLOPs per token, and attention 4 * head_dim * heads
per (query, key) pair the masks kept (`aux.visible_pairs`, the counts behind `aux.mask_density`). Latency is the
median wall time of one query (batch 1, prompt + greedy decode, after compilation) on the device used.

    python experiments/reasoning_tradeoff.py --preset tiny --out /tmp/results
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import jax  # noqa: E402

# Every seed of a variant compiles the same programs: a persistent cache turns the later compiles into loads.
if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("SRA_JAX_XLA_CACHE", str(Path.home() / ".cache" / "sra_jax_experiments_xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from scipy import stats  # noqa: E402

from sra_jax.config import LlamaConfig, SRAConfig  # noqa: E402
from sra_jax.data import synthetic  # noqa: E402
from sra_jax.generate import generate, prompt_bucket  # noqa: E402
from sra_jax.nn import attention_flops  # noqa: E402
from sra_jax.train.config import DataConfig, LogConfig, LossConfig, OptimConfig, TrainConfig  # noqa: E402
from sra_jax.train.loop import StopFlag, run  # noqa: E402

VARIANTS = ("standard", "cot", "sra")
# The seeds' claim (Llama 3 8B on GSM8K), printed beside our numbers.
SEEDS_CLAIM = {
    "standard": {"accuracy": 0.564, "flops_vs_standard": 1.0, "latency_ms": 45.0},
    "cot": {"accuracy": 0.721, "flops_vs_standard": 4.2, "latency_ms": 190.0},
    "sra": {"accuracy": 0.708, "flops_vs_standard": 1.3, "latency_ms": 58.0},
}
EVAL_SEED = 10_000  # held-out problems are the same for every training seed


@dataclasses.dataclass(frozen=True)
class Preset:
    """Size of one comparison: model, task, training length, seeds and evaluation size."""

    hidden_size: int
    layers: int
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    eval_size: int
    latency_queries: int
    task: synthetic.SyntheticConfig
    sra: SRAConfig
    learning_rate: float = 3e-3
    group_size: int = 2
    token_penalty: float = 0.1
    # Router selection temperature schedule (LossConfig.temperature_*): None keeps sra.tau fixed.
    tau_start: float | None = None
    tau_end: float | None = None
    num_heads: int = 4
    num_kv_heads: int = 2
    compute_dtype: str = "float32"  # parameters stay float32 (master weights)


_EASY_TASK = synthetic.SyntheticConfig(min_hops=1, max_hops=2, min_distractors=0, max_distractors=2, value_range=10,
                                       operand_max=5, operators="+-")
_SRA = SRAConfig(critical_fraction=0.25, window=8, num_global=1, queries="all", router_hidden=32)
PRESETS = {
    "tiny": Preset(hidden_size=32, layers=1, steps=8, batch_size=16, seeds=(0, 1), eval_size=32,
                   latency_queries=2, task=_EASY_TASK, sra=_SRA),
    "cpu": Preset(hidden_size=64, layers=2, steps=300, batch_size=32, seeds=(0, 1, 2), eval_size=256,
                  latency_queries=16, task=_EASY_TASK, sra=_SRA),
    # One H100, all 9 runs in parallel processes within ~8 minutes: 8 layers x 512 wide (25M matmul params).
    # SRA: the router decides how many tokens are critical (Bernoulli, capped at 25%) and the token penalty pushes
    # that number down; the selection temperature anneals 1 -> 0.3.
    "gpu": Preset(hidden_size=512, layers=8, steps=1000, batch_size=128, seeds=(0, 1, 2), eval_size=1024,
                  latency_queries=32, learning_rate=1e-3, group_size=4, tau_start=1.0, tau_end=0.3,
                  compute_dtype="bfloat16",
                  task=synthetic.SyntheticConfig(min_hops=2, max_hops=4, min_distractors=2, max_distractors=6),
                  sra=SRAConfig(critical_fraction=0.25, window=8, num_global=1, queries="all", router_hidden=64,
                                selection="bernoulli")),
}


def get_preset(name: str, sra_selection: str | None = None) -> Preset:
    """A preset by name, optionally with another SRA selection mode (e.g. "gumbel_topk" instead of "bernoulli")."""
    preset = PRESETS[name]
    if sra_selection is not None:
        preset = dataclasses.replace(preset, sra=dataclasses.replace(preset.sra, selection=sra_selection))
    return preset


def train_config(preset: Preset, variant: str, seed: int) -> TrainConfig:
    """The `TrainConfig` of one variant and seed (seed sets the initialisation and the training problems)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    form = "cot" if variant == "cot" else "direct"
    seq_len = synthetic.max_length(preset.task, form)
    is_sra = variant == "sra"
    return TrainConfig(
        model=LlamaConfig.tiny(vocab_size=128, hidden_size=preset.hidden_size, intermediate_size=3 * preset.hidden_size,
                               num_hidden_layers=preset.layers, num_attention_heads=preset.num_heads,
                               num_key_value_heads=preset.num_kv_heads,
                               max_position_embeddings=synthetic.max_length(preset.task, "cot") + 8),
        sra=preset.sra if is_sra else None,
        optim=OptimConfig(learning_rate=preset.learning_rate, warmup_steps=min(20, preset.steps // 4)),
        loss=LossConfig(kind="sl+rl", group_size=preset.group_size, token_penalty=preset.token_penalty,
                        **({} if preset.tau_start is None else dict(temperature_start=preset.tau_start,
                                                                     temperature_end=preset.tau_end,
                                                                     temperature_steps=preset.steps)))
        if is_sra else LossConfig(kind="sl"),
        data=DataConfig(task="synthetic", form=form, seq_len=seq_len, seed=seed, eval_size=preset.eval_size,
                        synthetic=preset.task),
        log=LogConfig(progress=False),
        steps=preset.steps,
        batch_size=preset.batch_size,
        compute_dtype=preset.compute_dtype,
        seed=seed,
    )


@functools.partial(nnx.jit)
def _forward_costs(model, tokens, positions):
    """Per sequence: (dense, kept) attention FLOPs, selected fraction over SRA layers."""
    _, aux = model(tokens, positions)
    dense, sparse = attention_flops(model.config, aux)
    if aux.sra_layers:
        selected = aux.selected_fraction[jnp.asarray(aux.sra_layers)].mean(0)
    else:
        selected = jnp.ones(tokens.shape[:1])
    return dense, sparse, selected


def _param_counts(model: nnx.Module) -> tuple[int, int]:
    """(matmul params: everything but the embedding table and the routers, router params)."""
    matmul = router = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        size = int(np.prod(leaf.get_value().shape if hasattr(leaf, "get_value") else leaf.value.shape))
        if "router" in names:
            router += size
        elif "embed" not in names:
            matmul += size
    return matmul, router


def evaluate(model: nnx.Module, problems: list[synthetic.Problem], *, max_new_tokens: int,
             latency_queries: int, latency_gate=contextlib.nullcontext) -> dict[str, float]:
    """Greedy-generate answers to `problems`; accuracy, tokens, FLOPs per query and batch-1 latency (measured
    inside `latency_gate()`, which parallel workers use to time one model at a time on a quiet device)."""
    tokenizer = synthetic.SyntheticTokenizer()
    prompts = [tokenizer.prompt_ids(p) for p in problems]
    outputs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id])
    # The model's vocabulary is padded past the tokenizer's: an id the tokenizer lacks is a wrong answer, not a crash.
    texts = [tokenizer.decode([t for t in out if t < tokenizer.vocab_size]) for out in outputs]
    correct = np.array([synthetic.grade(text, p.answer) for text, p in zip(texts, problems)])

    # The sequences the model processed: prompt + generated tokens (the final eos is produced, never fed back).
    fed = [prompt + out[:-1] if out and out[-1] == tokenizer.eos_id else prompt + out
           for prompt, out in zip(prompts, outputs)]
    width = max(len(s) for s in fed)
    tokens = np.zeros((len(fed), width), np.int32)
    positions = np.full((len(fed), width), -1, np.int32)
    for row, seq in enumerate(fed):
        tokens[row, : len(seq)] = seq
        positions[row, : len(seq)] = np.arange(len(seq))
    dense, sparse, selected = (np.asarray(x, np.float64) for x in
                               _forward_costs(model, jnp.asarray(tokens), jnp.asarray(positions)))
    lengths = (positions >= 0).sum(1).astype(np.float64)
    matmul_params, router_params = _param_counts(model)
    router_per_token = float(model.router_flops_per_token())
    flops = 2.0 * matmul_params * lengths + router_per_token * lengths + sparse

    timed = prompts[:latency_queries]
    for length in sorted({prompt_bucket(len(p)) for p in timed}):  # compile every prompt shape before timing
        warm = next(p for p in timed if prompt_bucket(len(p)) == length)
        generate(model, [warm], max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id])
    times = []
    with latency_gate():
        for prompt in timed:
            began = time.perf_counter()
            generate(model, [prompt], max_new_tokens=max_new_tokens, stop_tokens=[tokenizer.eos_id])
            times.append(time.perf_counter() - began)
    return {
        "accuracy": float(correct.mean()),
        "prompt_tokens": float(np.mean([len(p) for p in prompts])),
        "generated_tokens": float(np.mean([len(o) for o in outputs])),
        "selected_fraction": float(selected.mean()),
        "tokens_selected": float((selected * lengths).mean()),
        "attention_flops_ratio_vs_dense": float(sparse.sum() / dense.sum()),
        "flops_per_query": float(flops.mean()),
        "attention_flops_per_query": float(sparse.mean()),
        "router_flops_per_query": float((router_per_token * lengths).mean()),
        "latency_ms": 1e3 * float(np.median(times)),
        "matmul_params": matmul_params,
        "router_params": router_params,
    }


def confidence_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds, clipped to [0, 1] (zero width for one seed)."""
    array = np.asarray(values, np.float64)
    mean = float(array.mean())
    if len(array) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, len(array) - 1) * array.std(ddof=1) / np.sqrt(len(array)))
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def eval_problems(preset: Preset) -> tuple[list[synthetic.Problem], int]:
    """The held-out problems (the same for every variant and seed) and the generation budget."""
    problems = synthetic.generate(preset.task, preset.eval_size, split="test", seed=EVAL_SEED)
    max_new = synthetic.max_length(preset.task, "cot") - max(len(p.question) + 2 for p in problems)
    return problems, max(max_new, 4)


def run_one(preset: Preset, variant: str, seed: int, *, train_budget_s: float | None = None,
            latency_gate=contextlib.nullcontext) -> dict[str, Any]:
    """Train one variant / seed and evaluate it. `train_budget_s` stops training early (a backstop for a fixed
    device budget; the record says how many steps ran)."""
    problems, max_new = eval_problems(preset)
    config = train_config(preset, variant, seed)
    stop = StopFlag()
    began = time.perf_counter()

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if train_budget_s is not None and time.perf_counter() - began > train_budget_s:
            stop.signal = -1  # the loop ends at the next step boundary

    result = run(config, on_step=on_step, stop=stop)
    train_s = time.perf_counter() - began
    model = result.trainer.model(result.state.params)
    metrics = evaluate(model, problems, max_new_tokens=max_new, latency_queries=preset.latency_queries,
                       latency_gate=latency_gate)
    last = result.history[-1]
    steps_trained = int(last["step"])
    return {"variant": variant, "seed": seed, "train_s": train_s, "steps_trained": steps_trained,
            "steps_planned": config.steps, "train_budget_exceeded": bool(stop),
            "stopped_by_budget": bool(stop) and steps_trained < config.steps, "final_train_ce": last["ce"],
            "final_train_selected_fraction": last.get("selected_fraction"), "final_tau": last.get("tau"),
            "train_step_ms_median": 1e3 * float(np.median([h["step_time"] for h in result.history[1:]] or [0.0])),
            **metrics}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    standard_flops = np.mean([r["flops_per_query"] for r in runs if r["variant"] == "standard"])
    summary = {}
    for variant in VARIANTS:
        rows = [r for r in runs if r["variant"] == variant]
        if not rows:
            continue
        mean, low, high = confidence_interval([r["accuracy"] for r in rows])
        summary[variant] = {
            "accuracy_mean": mean, "accuracy_ci95": [low, high], "num_seeds": len(rows),
            **{key: float(np.mean([r[key] for r in rows])) for key in
               ("flops_per_query", "latency_ms", "generated_tokens", "prompt_tokens", "selected_fraction",
                "tokens_selected", "attention_flops_ratio_vs_dense", "router_flops_per_query")},
        }
        summary[variant]["flops_vs_standard"] = summary[variant]["flops_per_query"] / standard_flops
    return summary


def make_record(preset_name: str, seeds: tuple[int, ...], runs: list[dict[str, Any]], *,
                extra: dict[str, Any] | None = None, sra_selection: str | None = None) -> dict[str, Any]:
    preset = get_preset(preset_name, sra_selection)
    problems, max_new = eval_problems(preset)
    summary = summarize_runs(runs)
    device = jax.devices()[0]
    chance = 1.0 / preset.task.value_range
    return {
        "experiment": "reasoning_tradeoff",
        "preset": preset_name,
        "device": f"{device.platform}:{device.device_kind}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": __import__("flax").__version__, "numpy": np.__version__},
        "seeds": list(seeds),
        "eval": {"split": "test", "size": preset.eval_size, "seed": EVAL_SEED, "max_new_tokens": max_new},
        "config": {"preset": _plain(preset),
                   "train_configs": {v: train_config(preset, v, seeds[0]).to_dict() for v in VARIANTS}},
        **(extra or {}),
        "runs": runs,
        "summary": summary,
        "seeds_claim": SEEDS_CLAIM,
        "chance_accuracy": chance,
        "verdict": verdict(summary, chance) if set(summary) == set(VARIANTS) else "incomplete: some variant has no run",
    }


def run_experiment(preset_name: str, *, seeds: tuple[int, ...] | None = None, log=print,
                   sra_selection: str | None = None) -> dict[str, Any]:
    """Train and evaluate every variant for every seed in this process; the JSON-ready record."""
    preset = get_preset(preset_name, sra_selection)
    seeds = seeds or preset.seeds
    runs = []
    for variant in VARIANTS:
        for seed in seeds:
            record = run_one(preset, variant, seed)
            runs.append(record)
            log(f"{variant:>8} seed {seed}: acc {record['accuracy']:.3f} flops/query "
                f"{record['flops_per_query']:.3g} latency {record['latency_ms']:.1f} ms train {record['train_s']:.0f} s")
    return make_record(preset_name, seeds, runs, sra_selection=sra_selection)


# ------------------------------------------------------------------------------------- parallel worker processes
@contextlib.contextmanager
def _quiet_device(run_dir: Path, wave: int, wave_size: int, name: str, until: float):
    """Latency is timed only once every worker of this wave has finished training and evaluating, and by one
    worker at a time (an exclusive file lock), so no other process shares the device while a query is timed."""
    (run_dir / f"wave{wave}-ready-{name}").touch()
    while len(list(run_dir.glob(f"wave{wave}-ready-*"))) < wave_size and time.time() < until:
        time.sleep(0.5)
    with open(run_dir / "device.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def worker_main(args) -> int:
    """One (variant, seed) in its own process (launched by `run_parallel`); writes run-<variant>-<seed>.json."""
    preset = get_preset(args.preset, args.sra_selection)
    variant, seed = args.worker[0], int(args.worker[1])
    run_dir = Path(args.run_dir)
    name = f"{variant}-{seed}"
    try:
        gate = functools.partial(_quiet_device, run_dir, args.wave, args.wave_size, name, args.barrier_until)
        record = run_one(preset, variant, seed, train_budget_s=args.train_budget_s, latency_gate=gate)
    except BaseException:
        (run_dir / f"wave{args.wave}-ready-{name}").touch()  # never leave the other workers waiting
        raise
    (run_dir / f"run-{name}.json").write_text(json.dumps(record, indent=1))
    print(f"{variant:>8} seed {seed}: acc {record['accuracy']:.3f} flops/query {record['flops_per_query']:.3g} "
          f"latency {record['latency_ms']:.1f} ms, {record['steps_trained']} steps in {record['train_s']:.0f} s "
          f"({record['train_step_ms_median']:.1f} ms/step)", flush=True)
    return 0


def run_parallel(preset_name: str, seeds: tuple[int, ...], *, workers: int, run_dir: Path,
                 train_budget_s: float | None, deadline_s: float, sra_selection: str | None = None) -> dict[str, Any]:
    """Every (variant, seed) in its own process, `workers` at a time (waves), sharing one device; a worker still
    running `deadline_s` after the start is killed. Failed runs are listed in the record, not hidden."""
    jobs = [(variant, seed) for seed in seeds for variant in VARIANTS]
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not {"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE"} & set(env):
        # Workers need different amounts (SRA trains on group_size x the batch): allocate on demand, not up front.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    began = time.perf_counter()
    deadline = time.time() + deadline_s
    failed = []
    for wave, start in enumerate(range(0, len(jobs), workers)):
        batch = jobs[start:start + workers]
        procs = []
        for variant, seed in batch:
            command = [sys.executable, str(Path(__file__).resolve()), "--preset", preset_name, "--worker", variant,
                       str(seed), "--run-dir", str(run_dir), "--wave", str(wave), "--wave-size", str(len(batch)),
                       "--barrier-until", str(deadline - 45.0)]
            if sra_selection is not None:
                command += ["--sra-selection", sra_selection]
            if train_budget_s is not None:
                command += ["--train-budget-s", str(train_budget_s)]
            log = open(run_dir / f"log-{variant}-{seed}.txt", "w")
            # Workers share the persistent XLA cache: later waves load what the first compiled (an entry read while
            # another worker is still writing it fails to load with a warning and is compiled again).
            procs.append(((variant, seed), subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT),
                          log))
        for (variant, seed), proc, log in procs:
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
            if code != 0:
                tail = (run_dir / f"log-{variant}-{seed}.txt").read_text()[-1500:]
                failed.append({"variant": variant, "seed": seed, "exit_code": code, "log_tail": tail})
                print(f"worker {variant} {seed} failed ({code}):\n{tail}", flush=True)
    runs = []
    for variant, seed in sorted(jobs, key=lambda j: (VARIANTS.index(j[0]), j[1])):
        path = run_dir / f"run-{variant}-{seed}.json"
        if path.is_file():
            runs.append(json.loads(path.read_text()))
    return make_record(preset_name, seeds, runs, extra={
        "parallel": {"workers": workers, "wall_s": time.perf_counter() - began, "train_budget_s": train_budget_s,
                     "latency": "timed after every worker of the wave finished training, one worker at a time"},
        "failed_runs": failed}, sra_selection=sra_selection)


def verdict(summary: dict[str, Any], chance: float) -> str:
    """Honest sentences: does our run show the seeds' shape (SRA near CoT accuracy at near-Standard FLOPs), is the
    CoT gain larger than the seed-to-seed spread, and did the router select anything?"""
    std, cot, sra = (summary[v] for v in VARIANTS)
    gain = cot["accuracy_mean"] - std["accuracy_mean"]
    kept = (sra["accuracy_mean"] - std["accuracy_mean"]) / gain if gain > 0 else float("nan")
    cheap = sra["flops_vs_standard"] <= 1.5
    if all(summary[v]["accuracy_ci95"][0] <= chance for v in VARIANTS):
        return (f"Not reproduced, and not testable at this size: every variant's 95% interval reaches down to a "
                f"uniform guess ({chance:.0%}), so the models did not learn the held-out task and the accuracy "
                f"differences (Standard {std['accuracy_mean']:.1%}, CoT {cot['accuracy_mean']:.1%}, SRA "
                f"{sra['accuracy_mean']:.1%}) are noise. Costs are real: CoT {cot['flops_vs_standard']:.2f}x, SRA "
                f"{sra['flops_vs_standard']:.2f}x the Standard FLOPs.")
    if gain <= 0:
        sentences = [f"Not reproduced: chain of thought did not beat the direct answer here "
                     f"({cot['accuracy_mean']:.1%} vs {std['accuracy_mean']:.1%}), so there is no CoT gain for SRA "
                     f"to keep."]
    elif kept >= 0.9 and cheap:
        sentences = [f"Reproduced in shape: SRA keeps {kept:.0%} of the CoT gain at {sra['flops_vs_standard']:.2f}x "
                     f"the Standard FLOPs (CoT {cot['flops_vs_standard']:.2f}x)."]
    else:
        sentences = [f"Not reproduced: SRA keeps {kept:.0%} of CoT's accuracy gain (seeds: 92%) at "
                     f"{sra['flops_vs_standard']:.2f}x the Standard FLOPs; CoT costs {cot['flops_vs_standard']:.2f}x."]
    if gain > 0 and cot["accuracy_ci95"][0] <= std["accuracy_ci95"][1]:
        (c_lo, c_hi), (s_lo, s_hi) = cot["accuracy_ci95"], std["accuracy_ci95"]
        sentences.append(f"CoT's gain itself (+{100 * gain:.1f} points) is within the seed-to-seed spread: its 95% "
                         f"interval [{c_lo:.1%}, {c_hi:.1%}] overlaps Standard's [{s_lo:.1%}, {s_hi:.1%}].")
    if sra["selected_fraction"] < 0.01:
        sentences.append(f"The router learned to select (almost) no critical tokens ({sra['selected_fraction']:.1%}): "
                         f"the token penalty outweighed any reward for selecting, so SRA ran as window + global-token "
                         f"attention.")
    return " ".join(sentences)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def markdown(record: dict[str, Any]) -> str:
    """The table in the seeds' shape, our numbers beside theirs."""
    lines = [
        f"# Reasoning trade-off: Standard vs CoT vs SRA ({record['preset']} preset)",
        "",
        f"device `{record['device']}`, date {record['date']}, seeds {record['seeds']}, "
        f"{record['eval']['size']} held-out problems (unseen chain templates; a uniform guess scores "
        f"{record.get('chance_accuracy', float('nan')):.0%}), versions {record['versions']}.",
        "",
        "| method | accuracy (95% CI over seeds) | FLOPs vs Standard | latency / query | generated tokens | "
        "tokens selected | seeds' claim: accuracy / FLOPs / latency (Llama 3 8B, GSM8K) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"standard": "Standard", "cot": "CoT", "sra": "SRA"}
    for variant in VARIANTS:
        if variant not in record["summary"]:
            lines.append(f"| {names[variant]} | no completed run | | | | | |")
            continue
        s, c = record["summary"][variant], record["seeds_claim"][variant]
        low, high = s["accuracy_ci95"]
        selected = (f"{s['tokens_selected']:.1f} ({s['selected_fraction']:.0%})" if variant == "sra" else "all")
        lines.append(
            f"| {names[variant]} | {s['accuracy_mean']:.1%} [{low:.1%}, {high:.1%}] | {s['flops_vs_standard']:.2f}x "
            f"| {s['latency_ms']:.1f} ms | {s['generated_tokens']:.1f} | {selected} | "
            f"{c['accuracy']:.1%} / {c['flops_vs_standard']:.1f}x / {c['latency_ms']:.0f} ms |")
    on_cpu = record["device"].startswith("cpu")
    sra_cfg = record["config"]["train_configs"]["sra"]
    lines += ["", f"**Verdict.** {record['verdict']}", ""]
    if record.get("findings"):  # written by a person after reading the run; kept in the JSON so --render keeps it
        lines += ["Findings:", "", *[f"- {f}" for f in record["findings"]], ""]
    if record.get("corrections"):
        lines += [f"Corrections: {record['corrections']}", ""]
    lines += [
        "FLOPs per query: 2 x (non-embedding, non-router params) per processed token + router FLOPs per token + "
        "4 x head_dim x heads per attended (query, key) pair from the masks actually used, over prompt + generated "
        "tokens. Latency: median batch-1 greedy generation (prompt + KV-cache decode) on the device above, not "
        "Llama 3 8B" + ("; on a shared CPU it is noisy, so only large differences mean anything. " if on_cpu else
                        ", timed with no other process on the device. ") +
        f"Models with {record['runs'][0]['matmul_params'] if record['runs'] else '?'} matmul params trained from "
        "scratch on the synthetic task, not GSM8K: the seeds' numbers are printed for shape, not as a like-for-like "
        f"comparison. SRA: selection `{sra_cfg['sra']['selection']}` (critical fraction "
        f"{sra_cfg['sra']['critical_fraction']}, window {sra_cfg['sra']['window']}, {sra_cfg['sra']['num_global']} "
        f"global, queries {sra_cfg['sra']['queries']}), loss `{sra_cfg['loss']['kind']}` with token penalty "
        f"{sra_cfg['loss']['token_penalty']}, group {sra_cfg['loss']['group_size']}, selection temperature "
        f"{sra_cfg['loss']['temperature_start'] or sra_cfg['sra']['tau']} -> "
        f"{sra_cfg['loss']['temperature_end'] or sra_cfg['loss']['temperature_start'] or sra_cfg['sra']['tau']}.",
    ]
    if record.get("failed_runs"):
        lines += ["", "Failed runs: " + ", ".join(f"{f['variant']} seed {f['seed']} (exit {f['exit_code']})"
                                                  for f in record["failed_runs"])]
    lines += [
        "",
        "Per run:",
        "",
        "| variant | seed | accuracy | FLOPs / query | latency ms | steps | train s | final train CE | tokens selected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        steps = r.get("steps_trained", "")
        if r.get("stopped_by_budget"):
            steps = f"{steps} of {r['steps_planned']} (time budget)"
        lines.append(f"| {r['variant']} | {r['seed']} | {r['accuracy']:.3f} | {r['flops_per_query']:.3g} | "
                     f"{r['latency_ms']:.1f} | {steps} | {r['train_s']:.0f} | {r['final_train_ce']:.3f} | "
                     f"{r['tokens_selected']:.1f} ({r['selected_fraction']:.0%}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    parser.add_argument("--render", metavar="JSON", help="rewrite the verdict and markdown of an existing record")
    parser.add_argument("--workers", type=int, default=1,
                        help="train (variant, seed) runs in this many parallel processes sharing the device")
    parser.add_argument("--train-budget-s", type=float, default=None,
                        help="stop a run's training after this many seconds (backstop; steps_trained is recorded)")
    parser.add_argument("--deadline-s", type=float, default=3600.0,
                        help="with --workers: kill workers still running this long after the start")
    parser.add_argument("--sra-selection", default=None, help="override the preset's SRAConfig.selection")
    parser.add_argument("--barrier-until", type=float, default=float("inf"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help="with --workers: folder for worker logs and run records")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--wave", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--wave-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.worker:
        if args.worker[0] not in VARIANTS or args.run_dir is None:
            parser.error(f"--worker needs a variant in {VARIANTS}, a seed and --run-dir")
        return worker_main(args)
    if args.render:
        path = Path(args.render)
        record = json.loads(path.read_text())
        record["chance_accuracy"] = 1.0 / get_preset(record["preset"]).task.value_range
        record["verdict"] = verdict(record["summary"], record["chance_accuracy"])
        path.write_text(json.dumps(record, indent=1))
        path.with_suffix(".md").write_text(markdown(record))
        print(markdown(record))
        return 0
    seeds = tuple(args.seeds) if args.seeds else get_preset(args.preset).seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.workers > 1:
        # This process touches the device only after the workers are done; it must not reserve its memory first.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix=f"reasoning_tradeoff-{args.preset}-"))
        print(f"worker logs and per-run records: {run_dir}", flush=True)
        record = run_parallel(args.preset, seeds, workers=args.workers, run_dir=run_dir,
                              train_budget_s=args.train_budget_s, deadline_s=args.deadline_s,
                              sra_selection=args.sra_selection)
    else:
        record = run_experiment(args.preset, seeds=seeds, sra_selection=args.sra_selection)
    device = jax.devices()[0].platform
    stem = f"reasoning_tradeoff-{args.preset}-{device}-{record['date'][:10]}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {out / stem}.json and .md")
    return 0 if not record.get("failed_runs") else 1


if __name__ == "__main__":
    raise SystemExit(main())
