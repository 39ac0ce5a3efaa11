"""`sra-jax demo`: what attention selection buys on a task that needs it (CPU, no download, a few minutes).

The task is sra_jax.data.longhop: a value bound somewhere in a long prompt of look-alike statements must be found
(and carried through a hop) to answer, so a window alone cannot. A tiny dense Llama is trained on it with
`sra_jax.train.loop.run` (the loop of `sra-jax train`); the same weights then answer held-out problems with SRA
attention (window + global tokens + a critical set) whose critical set comes from: every token (dense), no token
(window only), random tokens, the answer key (oracle), or routers trained on the frozen base by policy gradient with a
token penalty (learned). One table: accuracy with its 95% CI, tokens selected, attention FLOPs vs dense and how much
of the answer key the critical set covered.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
from rich.console import Console
from rich.table import Table

from sra_jax import log
from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.data import longhop
from sra_jax.train import longhop_eval
from sra_jax.train.config import (CheckpointConfig, DataConfig, LogConfig, LossConfig, OptimConfig, RouterRLConfig,
                                  TrainConfig)
from sra_jax.train.data import LonghopStream
from sra_jax.train.loop import run

DEMO_TASK = longhop.LonghopConfig(context_len=128, longer_context_len=256, min_hops=1, max_hops=2, num_vars=64,
                                  value_range=16, operand_max=3)
DEMO_SRA = SRAConfig(critical_fraction=0.1, window=16, num_global=longhop.HEADER_LEN, queries="all",
                     router_hidden=32)
DEMO_STEPS, DEMO_ROUTER_STEPS = 800, 40  # dense base, then routers on the frozen base
# Routers learn on the frozen base: policy gradient with a token penalty and KL to the dense teacher.
DEMO_ROUTER_LOSS = LossConfig(kind="rl", token_penalty=0.1, group_size=4, teacher_kl_weight=1.0,
                              router_rl=RouterRLConfig(entropy_weight=0.01))
ROWS = (("dense", "dense"), ("window only", "window"), ("SRA random", "random"), ("SRA oracle", "oracle"),
        ("SRA learned", "learned"))


def demo_config(sra: SRAConfig | None, *, steps: int, seed: int = 0, loss: LossConfig | None = None,
                checkpoint_dir: str | None = None, task: longhop.LonghopConfig = DEMO_TASK) -> TrainConfig:
    """The demo's run: a 2-layer, 64-wide Llama on longhop problems, batch 32, AdamW at 3e-3."""
    return TrainConfig(
        model=LlamaConfig.tiny(vocab_size=longhop.LonghopTokenizer(task).vocab_size, hidden_size=64,
                               intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=longhop.sequence_length(task, "direct",
                                                                                                     "longer")),
        sra=sra,
        loss=loss or LossConfig(kind="sl"),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=min(20, steps)),
        data=DataConfig(task="longhop", form="direct", seq_len=longhop.sequence_length(task, "direct"), seed=seed,
                        longhop=task),
        checkpoint=CheckpointConfig(dir=checkpoint_dir, every=max(1, steps), keep=1),
        log=LogConfig(progress=False),
        steps=steps,
        batch_size=32,
        seed=seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sra-jax demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps of the dense base")
    parser.add_argument("--router-steps", type=int, default=DEMO_ROUTER_STEPS, help="router training steps (base frozen)")
    parser.add_argument("--eval-size", type=int, default=256, help="held-out problems per row")
    parser.add_argument("--context-len", type=int, default=DEMO_TASK.context_len, help="prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    task = dataclasses.replace(DEMO_TASK, context_len=args.context_len,
                               longer_context_len=max(DEMO_TASK.longer_context_len, 2 * args.context_len),
                               num_vars=max(DEMO_TASK.num_vars, longhop.max_statements(2 * args.context_len)))

    console = Console()
    console.print(f"sra-jax demo: which tokens does attention need? longhop, {task.context_len}-token prompts, "
                  f"{task.min_hops}-{task.max_hops} hops ({jax.device_count()} {jax.devices()[0].platform.upper()} "
                  f"device(s); base {args.steps} steps, router {args.router_steps} steps)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        base_config = demo_config(None, steps=args.steps, seed=args.seed, task=task)
        base = run(base_config, console=log.console(), description="dense base").state.params
        router_config = demo_config(
            DEMO_SRA, steps=args.router_steps, seed=args.seed, task=task, checkpoint_dir=f"{scratch}/router",
            loss=DEMO_ROUTER_LOSS)
        longhop_eval.start_from(router_config, base)
        learned = run(router_config, console=log.console(), description="router").state.params

    eval_config = dataclasses.replace(router_config, data=dataclasses.replace(router_config.data, eval_size=args.eval_size))
    batch = LonghopStream(eval_config.data, eval_config.batch_size).eval_batch(split="test")
    table = Table(title=f"longhop, {args.eval_size} held-out problems, {task.context_len}-token prompts, window "
                        f"{DEMO_SRA.window} + {DEMO_SRA.num_global} global tokens (uniform guess = "
                        f"{1 / task.value_range:.1%})")
    for column in ("attention", "accuracy", "95% CI", "tokens\nselected", "attention FLOPs\nvs dense",
                   "answer key\ncovered"):
        table.add_column(column, justify="left" if column == "attention" else "right")
    for name, source in ROWS:
        trainer, state = longhop_eval.with_weights(eval_config, learned if source == "learned" else base)
        m = longhop_eval.score(trainer.model(state.params), batch, source, alpha=DEMO_SRA.critical_fraction,
                               seed=args.seed)
        table.add_row(name, f"{m['accuracy']:.1%}", f"{m['ci_low']:.0%}-{m['ci_high']:.0%}",
                      f"{m['selected_fraction']:.1%}", f"{m['attention_flops_vs_dense']:.2f}x",
                      f"{m['router_recall']:.0%}")
    console.print(table)
    console.print(f"SRA rows reuse the dense base's weights; critical_fraction={DEMO_SRA.critical_fraction} for random "
                  f"and learned, the oracle takes exactly the chain's statements. FLOPs counted from the masks used "
                  f"(routers excluded). Total {time.perf_counter() - started:.0f} s.")
    return 0
