# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Local window and global tokens
#
# Besides its critical tokens, every SRA query sees a local **window** (the `window` most recent positions, itself
# included) and the first `num_global` positions (attention sinks). Both cost attention FLOPs whatever the router
# does, so at short lengths they decide how sparse SRA can be at all.
#
# 1. **Trained sweep.** The same small SRA Llama (2 layers, direct answers, `loss.kind="sl+rl"`, critical fraction
#    0.25) trained from scratch at several windows (1 global token) and several `num_global` (window 8): accuracy on
#    the held-out split and on fresh problems of the seen templates, and attention FLOPs counted from the masks used.
# 2. **Inference-time sweep.** The window-8 / 1-global model from (1) evaluated, without retraining, under other
#    windows and global counts: how much of its accuracy depends on the local context it was trained with, and the
#    FLOPs curve at a finer grid.
#
# `SRA_JAX_NOTEBOOK_TINY=1` (or `TINY = True`) gives a smoke run; the committed outputs say which setting made them.

# %% tags=["parameters"]
import os

TINY = os.environ.get("SRA_JAX_NOTEBOOK_TINY", "0") == "1"
SEED = 0
STEPS = 100  # full setting only; TINY uses the "tiny" preset's 8 steps
WINDOWS = (8,) if TINY else (2, 4, 8, 32)  # trained, with 1 global token
GLOBALS = (1,) if TINY else (0, 1, 4)  # trained, with window 8
EVAL_WINDOWS = (2, 8) if TINY else (1, 2, 4, 8, 16, 32)  # inference-time sweep of the window-8 model
EVAL_GLOBALS = (0, 1) if TINY else (0, 1, 2, 4, 8)

# %%
import dataclasses

import matplotlib.pyplot as plt
from flax import nnx

import _ablation as ab
from sra_jax.nn import Llama
from sra_jax.train.evaluate import evaluate_synthetic

preset = ab.preset(TINY, steps=STEPS, layers=2)
evals = ab.eval_set(ab.sra_config(preset), preset.eval_size)
seq_len = ab.sra_config(preset).data.seq_len
print(f"TINY={TINY}: {preset.layers} layers x {preset.hidden_size} wide, {preset.steps} steps, seed {SEED}; "
      f"sequences up to {seq_len} tokens; SRA {preset.sra}")
print(f"{preset.eval_size} held-out + {preset.eval_size} seen-template problems "
      f"({evals.seen_overlap:.1%} of the seen-template questions also occurred in training)")

# %%
settings = sorted({(w, 1) for w in WINDOWS} | {(8, g) for g in GLOBALS})
trained = {}
for window, num_global in settings:
    row = ab.train_and_score(ab.sra_config(preset, SEED, window=window, num_global=num_global), evals,
                             window=window, num_global=num_global)
    trained[window, num_global] = row
    print(ab.table([row], ["window", "num_global", "accuracy", "seen_accuracy", "selected_fraction",
                           "attention_flops_ratio", "final_train_ce", "train_s"]))

# %%
base = trained[8, 1]["model"]


def with_mask(model, **changes):
    """The same trained weights under another SRA mask rule (window / num_global are not parameters)."""
    other = Llama(model.config, dataclasses.replace(model.sra, **changes), rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model))
    return other


inference = []
for window, num_global in sorted({(w, 1) for w in EVAL_WINDOWS} | {(8, g) for g in EVAL_GLOBALS}):
    model = with_mask(base, window=window, num_global=num_global)
    held, seen = evaluate_synthetic(model, evals.held_out), evaluate_synthetic(model, evals.seen)
    inference.append({"window": window, "num_global": num_global, "accuracy": held["accuracy"],
                      "seen_accuracy": seen["accuracy"], "attention_flops_ratio": held["attention_flops_ratio"]})
print("window-8 / 1-global model under other masks (no retraining):")
print(ab.table(inference, ["window", "num_global", "accuracy", "seen_accuracy", "attention_flops_ratio"]))

# %%
fig, axes = plt.subplots(2, 2, figsize=(11, 7))
chance = 1 / preset.task.value_range
sweeps = (("window", [r for r in inference if r["num_global"] == 1], [trained[w, 1] for w in sorted(WINDOWS)]),
          ("num_global", [r for r in inference if r["window"] == 8], [trained[8, g] for g in sorted(GLOBALS)]))
for column, (name, evaluated, trained_rows) in enumerate(sweeps):
    top, bottom = axes[0, column], axes[1, column]
    top.plot([r[name] for r in trained_rows], [r["accuracy"] for r in trained_rows], "o-", label="trained: held-out")
    top.plot([r[name] for r in trained_rows], [r["seen_accuracy"] for r in trained_rows], "s-",
             label="trained: seen templates")
    top.plot([r[name] for r in evaluated], [r["seen_accuracy"] for r in evaluated], "x:",
             label="window-8/1-global model, seen templates")
    top.axhline(chance, color="gray", ls="--", lw=0.8, label="uniform guess")
    top.set(xlabel=name, ylabel="accuracy", xscale="linear" if name == "num_global" else "log")
    bottom.plot([r[name] for r in trained_rows], [r["attention_flops_ratio"] for r in trained_rows], "o-",
                label="trained models")
    bottom.plot([r[name] for r in evaluated], [r["attention_flops_ratio"] for r in evaluated], "x:",
                label="window-8/1-global model")
    bottom.set(xlabel=name, ylabel="attention FLOPs / dense", xscale="linear" if name == "num_global" else "log",
               ylim=(0, 1.05))
    for ax in (top, bottom):
        ax.set_xticks(sorted({r[name] for r in evaluated + trained_rows}))
        ax.xaxis.set_major_formatter(plt.ScalarFormatter())
        ax.xaxis.set_minor_locator(plt.NullLocator())
    bottom.legend(fontsize=7)
axes[0, 0].legend(fontsize=7)
axes[0, 0].set_title("window sweep (1 global token)")
axes[0, 1].set_title("global-token sweep (window 8)")
fig.suptitle(f"window and global tokens ({'TINY smoke run' if TINY else f'{preset.steps} steps'}, seed {SEED}, "
             f"sequences <= {seq_len} tokens, critical fraction {preset.sra.critical_fraction})")
fig.tight_layout()
ab.show(fig, "window_and_globals")

# %%
low, high = ab.binomial_ci(0.1, preset.eval_size)
print(f"Evaluation noise: one run's 95% binomial interval at 10% accuracy on {preset.eval_size} problems is "
      f"[{low:.1%}, {high:.1%}]; one training seed per point.")
for (window, num_global), row in sorted(trained.items()):
    print(f"trained window {window:2d}, {num_global} global: held-out {row['accuracy']:.1%}, seen "
          f"{row['seen_accuracy']:.1%}, attention FLOPs {row['attention_flops_ratio']:.3f}x dense, selected "
          f"{row['selected_fraction']:.1%}")

# %% [markdown]
# **Conclusion (committed run: 100 CPU steps, seed 0 per point, 256 problems per split; one run's 95% binomial
# interval at 10% accuracy is [7.0%, 14.5%]).** *Cost:* attention FLOPs grow with the window, 0.479x dense at window 2,
# 0.535x at 4, 0.723x at 8 and 1.000x at 32 (window plus critical keys then cover every causal pair of these
# <= 37-token sequences); global tokens add little at window 8 (0.676x / 0.723x / 0.764x for 0 / 1 / 4 globals).
# *Accuracy:* on the held-out split every trained setting is at a uniform guess (10.9-12.1%) except window 32
# (14.8%, at the edge of the interval, one seed), so the held-out split does not rank them. On seen templates all
# trained settings land at 23.0-28.5%, within about two binomial standard errors (2.7 points) of each other: at this
# budget a 2-token window trains as well as a 32-token one, the critical tokens (37% of these sequences) carrying what
# the model learned. The inference-time sweep is clearer: the window-8 model loses seen-template accuracy when its
# window shrinks below the trained one (25.4% at 8, 21.9% at 4, 20.7% at 2, 15.2% at 1) and gains nothing from a wider
# one (25.8% at 16 and 32); extra global tokens move it by under 1 point. Dropping the single global token at inference
# changed neither its accuracy nor a single attended pair (0.723x in both): under the mask rule that means position 0
# (bos) was critical in every row and layer, i.e. the router had learned to keep the attention sink itself. All of
# this is a short-sequence regime (~27 valid tokens), where a window of 8 already covers much of the causal triangle;
# the `cost_vs_length` notebook shows the same rule at long lengths.
