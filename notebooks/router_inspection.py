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
# # What does the router pick?
#
# 1. **Synthetic problems.** A small SRA Llama trained on the multi-hop task (direct answers, router trained with
#    the project's `loss.kind="sl+rl"`: CE + Plackett-Luce policy gradient with a token penalty). We know which
#    characters form the answer chain (`Problem.critical_spans`), so we can score the router's deterministic top-k
#    selection (`key=None`, as at inference) against them: precision and recall over the question tokens, next to a
#    random selection of the same size.
# 2. **Real GSM8K questions**, tokenised with the Llama 3 tokenizer from `../shared/data`, through a tiny
#    **randomly initialised** SRA Llama with the full Llama 3 vocabulary: no trained router of that vocabulary exists
#    in this project, so this part shows the plumbing and what an untrained router does (nothing meaningful), not
#    what a trained one would select.

# %% tags=["parameters"]
import os

TINY = os.environ.get("SRA_JAX_NOTEBOOK_TINY", "0") == "1"

# %%
import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from flax import nnx  # noqa: E402
from IPython.display import Image, display  # noqa: E402

ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
sys.path.insert(0, str(ROOT / "experiments"))
import reasoning_tradeoff as rt  # noqa: E402
from sra_jax.config import LlamaConfig  # noqa: E402
from sra_jax.data import synthetic  # noqa: E402
from sra_jax.data.tokenizer import Llama3Tokenizer  # noqa: E402
from sra_jax.nn import Llama  # noqa: E402
from sra_jax.train.loop import run  # noqa: E402

DATA = Path(os.environ.get("SRA_JAX_DATA", ROOT / ".." / "shared" / "data")).resolve()
preset = rt.PRESETS["tiny" if TINY else "cpu"]
if not TINY:
    preset = dataclasses.replace(preset, steps=200)
config = rt.train_config(preset, "sra", seed=0)
print(f"TINY={TINY}: SRA {config.sra}\n{preset.layers} layers x {preset.hidden_size}, {preset.steps} steps")


def show(fig, name):
    """Inline PNG (the notebook keeps the image; no file is left behind)."""
    path = Path(f"{name}.png").resolve()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(filename=str(path)))
    path.unlink()


# %% [markdown]
# ## 1. A trained router on synthetic problems

# %%
result = run(config)
model = result.trainer.model(result.state.params)
tokenizer = synthetic.SyntheticTokenizer()
problems = synthetic.generate(preset.task, preset.eval_size, split="test", seed=rt.EVAL_SEED)
batch = synthetic.make_batch(problems, tokenizer, config.data.seq_len, form="direct")
_, aux = model(jnp.asarray(batch.tokens), jnp.asarray(batch.positions))
logits = np.asarray(aux.router_logits)  # [L, b, s]
selected = np.asarray(aux.critical)  # [L, b, s]
print(f"final train CE {result.history[-1]['ce']:.3f}; SRA layers {aux.sra_layers}")

# %%
# Score over the question characters only (bos, separator, answer and padding are not candidates for the chain).
question = np.zeros_like(batch.critical)
for row, problem in enumerate(problems):
    question[row, 1 : 1 + len(problem.question)] = True
chain = batch.critical & question
rng = np.random.default_rng(0)
print(f"chain tokens are {chain.sum() / question.sum():.1%} of question tokens")
print(f"{'layer':>5} {'selected':>9} {'precision':>10} {'recall':>8} {'random precision':>17} {'random recall':>14}")
scores = {}
for layer in aux.sra_layers:
    picked = selected[layer] & question
    precision = (picked & chain).sum() / max(picked.sum(), 1)
    recall = (picked & chain).sum() / max(chain.sum(), 1)
    # A random selection of the same size in each row: the baseline a useless router would reach.
    random_pick = np.zeros_like(picked)
    for row in range(picked.shape[0]):
        candidates = np.flatnonzero(question[row])
        random_pick[row, rng.choice(candidates, min(picked[row].sum(), len(candidates)), replace=False)] = True
    r_precision = (random_pick & chain).sum() / max(random_pick.sum(), 1)
    r_recall = (random_pick & chain).sum() / max(chain.sum(), 1)
    scores[layer] = (precision, recall)
    print(f"{layer:5d} {picked.sum() / question.sum():9.1%} {precision:10.1%} {recall:8.1%} {r_precision:17.1%} "
          f"{r_recall:14.1%}")

# %%
def heatmap(ax, text_tokens, scores_row, picked_row, chain_row, title):
    """Router scores as colour; selected tokens boxed in black; chain tokens underlined in red."""
    n = len(text_tokens)
    ax.imshow(scores_row[None, :n], aspect="auto", cmap="viridis")
    for i, token in enumerate(text_tokens):
        ax.text(i, 0, token, ha="center", va="center", fontsize=7, color="white" if not picked_row[i] else "black",
                bbox=dict(facecolor="yellow", edgecolor="black", pad=1) if picked_row[i] else None)
        if chain_row[i]:
            ax.plot([i - 0.45, i + 0.45], [0.42, 0.42], color="red", lw=3)
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title(title, fontsize=8, loc="left")


layer = aux.sra_layers[0]
shown = 6
fig, axes = plt.subplots(shown, 1, figsize=(13, 1.0 * shown))
for row, ax in enumerate(axes):
    length = int((batch.positions[row] >= 0).sum())
    text_tokens = [tokenizer.decode([t]) or "·" for t in batch.tokens[row, :length]]
    z = logits[layer, row, :length]
    heatmap(ax, text_tokens, (z - z.mean()) / (z.std() + 1e-6), selected[layer, row, :length],
            chain[row, :length], f"{problems[row].question}  answer {problems[row].answer}")
fig.suptitle(f"layer {layer} router scores (colour), selected (yellow boxes), answer chain (red bars)", y=1.0)
show(fig, "router_synthetic")

# %% [markdown]
# ## 2. Real GSM8K questions, Llama 3 tokenizer, randomly initialised router

# %%
llama_tokenizer = Llama3Tokenizer(DATA / "llama3" / "tokenizer.model")
with open(DATA / "gsm8k" / "test.jsonl") as handle:
    questions = [json.loads(line)["question"] for _, line in zip(range(3), handle)]
random_config = LlamaConfig.tiny(vocab_size=llama_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=256)
random_model = Llama(random_config, dataclasses.replace(config.sra, critical_fraction=0.2), rngs=nnx.Rngs(0))
fig, axes = plt.subplots(len(questions), 1, figsize=(14, 1.3 * len(questions)))
for ax, text in zip(axes, questions):
    ids = llama_tokenizer.encode(text, bos=True)[:60]  # the first 60 tokens keep the labels legible
    _, gsm_aux = random_model(jnp.asarray([ids]), None)
    z = np.asarray(gsm_aux.router_logits[0, 0])
    labels = [llama_tokenizer.decode([t]).strip() or "·" for t in ids]
    heatmap(ax, labels, (z - z.mean()) / (z.std() + 1e-6), np.asarray(gsm_aux.critical[0, 0]),
            np.zeros(len(ids), bool), text[:110] + "...")
    numbers = [i for i, label in enumerate(labels) if any(c.isdigit() for c in label)]
    picked = np.flatnonzero(np.asarray(gsm_aux.critical[0, 0]))
    print(f"{len(ids)} tokens, {len(picked)} selected; number tokens selected: "
          f"{len(set(numbers) & set(picked))}/{len(numbers)}")
fig.suptitle("GSM8K, randomly initialised router (critical fraction 0.2): selection is arbitrary", y=1.0)
show(fig, "router_gsm8k")

# %% [markdown]
# **What this shows (committed run: 200 CPU steps).** Chain statements are 57.5% of question tokens here (few
# distractors), so a random pick of the same size is right ~60% of the time. Layer 1's router beats that: precision
# 75% vs 60% at recall 39% vs 31% — it has learned to prefer chain tokens. Layer 0's router does not (precision
# 47%): the heatmap shows it mostly picks structural tokens (`;`, `=`) and the answer marker rather than the
# chain's contents; whether that helps the answer is not measured here. On GSM8K the router is untrained
# (random weights), so its picks carry no meaning (0 of 2, 0 of 1 and 1 of 5 number tokens selected); a
# GSM8K-trained router was not available here.
