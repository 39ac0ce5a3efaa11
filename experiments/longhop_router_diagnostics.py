"""Why does a learned router not find the longhop answer key? Two measurements on a dense base export:

  attention   does the dense model's own attention single out the oracle tokens? Per SRA layer (and summed), the
              prompt keys ranked by the attention mass they receive outside each query's window and the global
              tokens (`longhop_eval.attention_oracle_overlap`), from the answer queries ("target") and from every
              query ("all"): precision / recall against the oracle of the top ceil(alpha * tokens) keys; and the
              accuracy with each layer's critical set forced to those keys (what a perfectly distilled router
              would score).
  gradient    what each training signal tells a fresh router about each token: the gradient of the loss with
              respect to every router logit (a probe added to the router's output), for the straight-through
              Gumbel top-k with answer cross-entropy and with KL to the dense teacher, for REINFORCE with the
              group advantages of `loss.kind="rl"` (reward correct - token_penalty * selected; one group and the
              mean of `--rl-repeats` groups per row), the same with the answer's log-likelihood in place of
              correctness ("reinforce_logp", a continuous reward: not a training option), and for the router
              distillation term. Reported per layer over
              the prompt tokens outside the answer query's window and the globals: AUROC of the descent direction
              (-gradient) for oracle membership (0.5 = no information), the share of oracle tokens the step would
              raise, and the fraction of tokens with an exactly zero gradient.
  saliency    the dense model's answer cross-entropy gradient with respect to scaling each key's value (what a
              straight-through gate reports for a key that every query sees): the same summary, and precision /
              recall of its top-|gradient| keys.

    python experiments/longhop_router_diagnostics.py --base runs/longhop-cpu/base-direct-seed0/hf --scale cpu \
        --out experiments/results/longhop-router-diagnostics-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import longhop as experiment  # noqa: E402  (experiments/longhop.py: the scales and configs)

from sra_jax.convert.source import load_source  # noqa: E402
from sra_jax.evals.stats import wilson_interval  # noqa: E402
from sra_jax.train import longhop_eval, losses, rl  # noqa: E402
from sra_jax.train.data import LonghopStream  # noqa: E402
from sra_jax.train.router_distill import router_distill_loss  # noqa: E402


class Probe(nnx.Variable):
    """An additive offset on a router's output: its gradient is the loss's gradient per router logit."""


class ProbedRouter(nnx.Module):
    def __init__(self, router: nnx.Module, shape: tuple[int, int]):
        self.router = router
        self.offset = Probe(jnp.zeros(shape, jnp.float32))

    def __call__(self, x):
        return self.router(x) + self.offset[...]


class ScaledValues(nnx.Linear):
    """A layer's value projection (its own kernel and bias) times (1 + offset) per token: the offset's gradient is the
    loss's sensitivity to scaling each key's value, what a straight-through gate would report for a key every query
    sees. A Linear itself, since `project_qkv` takes one."""

    def __init__(self, v_proj: nnx.Linear, shape: tuple[int, int]):
        super().__init__(v_proj.in_features, v_proj.out_features, use_bias=v_proj.use_bias, dtype=v_proj.dtype,
                         param_dtype=v_proj.param_dtype, rngs=nnx.Rngs(0))
        self.kernel, self.bias = v_proj.kernel, v_proj.bias
        self.offset = Probe(jnp.zeros(shape, jnp.float32))

    def __call__(self, x):
        return super().__call__(x) * (1 + self.offset[...])[..., None].astype(x.dtype)


def dense_value_saliency(model, tokens, positions, loss_mask):
    """[layers, b, s]: d answer cross-entropy / d (value scale of key j) in the dense model (every token critical)."""
    originals = [layer.attn.v_proj for layer in model.layers]
    for layer in model.layers:
        layer.attn.v_proj = ScaledValues(layer.attn.v_proj, tokens.shape)
    everything = jnp.ones((model.config.num_hidden_layers, *tokens.shape), bool)

    def loss(model):
        logits, _ = model(tokens, positions, critical=everything)
        return losses.cross_entropy(logits, tokens, loss_mask)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, Probe))(model)
    out = jnp.stack([grads.layers[i].attn.v_proj.offset[...] for i in range(len(model.layers))])
    for layer, v_proj in zip(model.layers, originals, strict=True):
        layer.attn.v_proj = v_proj
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def signal_summary(grad: np.ndarray, batch, window: int, num_global: int) -> dict[str, float]:
    """`grad` [b, s] of one layer: what a descent step tells the router about the oracle tokens."""
    s = grad.shape[1]
    pos = np.arange(s)[None]
    region = (pos >= num_global) & (pos < (batch.prompt_lengths[:, None] - window))
    step = -grad[region]
    oracle = batch.oracle[region]
    nonzero = np.abs(step) > 0
    return {"auroc": auroc(step, oracle),
            "oracle_raised": float((step[oracle] > 0).mean()),
            "others_raised": float((step[~oracle] > 0).mean()),
            "mean_abs_oracle": float(np.abs(step[oracle]).mean()),
            "mean_abs_others": float(np.abs(step[~oracle]).mean()),
            "zero_fraction": float(1 - nonzero.mean())}


def probe(model, batch_size: int, seq: int):
    for i in model.sra_layers:
        attn = model.layers[i].attn
        attn.router = ProbedRouter(attn.router, (batch_size, seq))


def unprobe(model):
    for i in model.sra_layers:
        attn = model.layers[i].attn
        attn.router = attn.router.router


def gradients(model, tokens, positions, loss_mask, key, *, signal: str, group: int, token_penalty: float):
    """[layers, b * group, s] gradient of `signal`'s loss per router logit."""
    everything = jnp.ones((model.config.num_hidden_layers, *tokens.shape), bool)
    if signal.startswith("reinforce"):
        tokens, positions, loss_mask = (jnp.repeat(x, group, axis=0) for x in (tokens, positions, loss_mask))
    probe(model, *tokens.shape)

    def loss(model):
        if signal == "distill":
            return router_distill_loss(model, tokens, positions, loss_mask, queries="target")
        logits, aux = model(tokens, positions, key=key)
        if signal == "st_ce":
            return losses.cross_entropy(logits, tokens, loss_mask)
        if signal == "st_teacher_kl":
            teacher, _ = model(tokens, positions, critical=everything)
            return losses.teacher_kl(logits, jax.lax.stop_gradient(teacher), loss_mask)
        selected = aux.selected_fraction[jnp.asarray(aux.sra_layers)].mean(0)
        if signal == "reinforce_logp":  # a continuous reward: the answer's log-likelihood under the selection
            log_probs = losses.shifted_token_log_probs(logits, tokens)
            outcome = jax.lax.stop_gradient(jnp.sum(jnp.where(loss_mask[:, 1:], log_probs, 0.0), axis=-1))
        else:
            outcome = losses.answer_correct(logits, tokens, loss_mask)
        rewards = rl.reward(outcome, selected, loss_mask.sum(-1), token_penalty=token_penalty, length_penalty=0.0)
        return rl.policy_gradient_loss(aux.selection_log_prob, rl.group_advantages(rewards, group))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, Probe))(model)
    out = jnp.stack([grads.layers[i].attn.router.offset[...] for i in model.sra_layers])
    unprobe(model)
    return out


def _rows(batch, keep: np.ndarray):
    """The rows of `batch` where `keep` is True."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[keep] for f in dataclasses.fields(batch)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the dense base export (Hugging Face folder)")
    parser.add_argument("--scale", choices=sorted(experiment.SCALES), default="cpu")
    parser.add_argument("--alphas", default="0.05,0.1")
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--grad-rows", type=int, default=64)
    parser.add_argument("--rl-repeats", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    began = time.time()
    alphas = tuple(float(a) for a in args.alphas.split(","))
    with tempfile.TemporaryDirectory() as scratch:  # the experiment's configs; its folders stay unused
        settings = experiment.Experiment(args.scale, Path(scratch), Path(scratch), None, {})
    alpha_model = alphas[-1]
    config = settings.train_config("direct", args.seed, sra=settings.sra_config(alpha_model),
                                   loss=experiment.LossConfig(kind="sl"), steps=1)
    _, sra, model = load_source(args.base, sra=config.sra, router_seed=args.seed)
    stream = LonghopStream(config.data, config.batch_size)
    batch = stream.eval_batch(args.eval_size, "test")
    record = {"base": str(args.base), "scale": args.scale, "seed": args.seed, "alphas": list(alphas),
              "eval_size": args.eval_size, "sra": dataclasses.asdict(sra), "jax": jax.__version__}
    record["dense_accuracy"] = longhop_eval.score(model, batch, "dense", alpha=alpha_model)["accuracy"]
    record["attention"] = {q: longhop_eval.attention_oracle_overlap(model, batch, alphas=alphas, queries=q)
                           for q in ("target", "all")}
    # Accuracy when each SRA layer's critical set is forced to the teacher's own top-mass keys (answer queries): what a
    # router that distils the teacher perfectly would score.
    mass = longhop_eval.teacher_masses(model, batch, queries="target")
    forward = nnx.jit(lambda m, t, p, c: m(t, p, critical=c)[0])
    record["teacher_top_mass_sets"] = {}
    for alpha in alphas:
        sets = np.ones((model.config.num_hidden_layers, *batch.tokens.shape), bool)
        for n, i in enumerate(model.sra_layers):
            sets[i] = longhop_eval.top_mass_sets(mass[n], batch, alpha)
        correct = np.concatenate([np.asarray(losses.answer_correct(
            forward(model, *(jnp.asarray(x[r:r + 64]) for x in (batch.tokens, batch.positions)), jnp.asarray(sets[:, r:r + 64])),
            jnp.asarray(batch.tokens[r:r + 64]), jnp.asarray(batch.loss_mask[r:r + 64]))) for r in range(0, len(batch.tokens), 64)])
        low, high = wilson_interval(int(correct.sum()), len(correct))
        record["teacher_top_mass_sets"][str(alpha)] = {"accuracy": float(correct.mean()), "ci_low": low, "ci_high": high}
    print("teacher_top_mass_sets", json.dumps(record["teacher_top_mass_sets"]), flush=True)
    # The same from the answer queries, split by whether the dense model answers the row correctly.
    everything = jnp.ones((model.config.num_hidden_layers, *batch.tokens.shape), bool)
    logits, _ = nnx.jit(lambda m, t, p, c: m(t, p, critical=c))(model, jnp.asarray(batch.tokens),
                                                                jnp.asarray(batch.positions), everything)
    correct = np.asarray(losses.answer_correct(logits, jnp.asarray(batch.tokens), jnp.asarray(batch.loss_mask)))
    record["attention_target_by_dense_correct"] = {
        name: {"rows": int(rows.sum()), **longhop_eval.attention_oracle_overlap(
            model, _rows(batch, rows), alphas=alphas, queries="target")}
        for name, rows in (("correct", correct), ("wrong", ~correct)) if rows.any()}
    rows = _rows(batch, np.arange(len(batch.tokens)) < args.grad_rows)
    tokens, positions, loss_mask = (jnp.asarray(x) for x in (rows.tokens, rows.positions, rows.loss_mask))
    key = jax.random.key(args.seed)
    signals = {}
    for signal in ("st_ce", "st_teacher_kl", "distill", "reinforce", "reinforce_logp"):
        if signal.startswith("reinforce"):
            draws = []
            for r in range(args.rl_repeats):
                g = gradients(model, tokens, positions, loss_mask, jax.random.fold_in(key, r), signal=signal,
                              group=4, token_penalty=0.1)
                draws.append(np.asarray(g).reshape(g.shape[0], -1, 4, g.shape[-1]).sum(2))  # one group per row
            draws = np.stack(draws)  # [repeats, layers, b, s]
            per = {"one_group": draws[0], f"mean_of_{args.rl_repeats}_groups": draws.mean(0)}
        else:
            per = {"": np.asarray(gradients(model, tokens, positions, loss_mask, key, signal=signal, group=1,
                                            token_penalty=0.1))}
        for name, grad in per.items():
            signals[signal + (f"/{name}" if name else "")] = {
                f"layer{i}": signal_summary(grad[n], rows, sra.window, sra.num_global)
                for n, i in enumerate(model.sra_layers)}
        print(signal, json.dumps({k: v for k, v in signals.items() if k.startswith(signal)}), flush=True)
    saliency = np.asarray(dense_value_saliency(model, tokens, positions, loss_mask))
    record["dense_value_saliency"] = {
        f"layer{i}": {**signal_summary(saliency[i], rows, sra.window, sra.num_global),
                      **{f"top_abs_{alpha}": longhop_eval.top_mass_overlap(np.abs(saliency[i]), rows, alpha)
                         for alpha in alphas}}
        for i in range(len(model.layers))}
    print("dense_value_saliency", json.dumps(record["dense_value_saliency"]), flush=True)
    record["gradient"] = signals
    record["gradient_rows"] = args.grad_rows
    record["seconds"] = time.time() - began
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["attention"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
