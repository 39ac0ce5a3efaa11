"""LM GRPO as a loss kind of `sra-jax train` (`loss.kind: grpo`).

Each step: the prompts of the step's batch (each row's tokens before its first loss-masked token; the loss-masked
tokens are the reference answer) are sampled `group_size` times with `sra_jax.generate` (KV cache, deterministic
router selection, stop at eos), graded by a `Grader`, and laid out as a fixed-width right-padded rollout batch. One
jitted update then scores the rollout teacher-forced and applies the loss terms of `loss.kind: grpo`
(`sra_jax.train.objectives`)

    loss = grpo_loss(LM token log-probs, old, A)  +  router_rl.weight * (policy_gradient_loss(router log-prob, A) - ent)

with rewards `rl.reward(correct, selected_fraction, completion length)` and group advantages `rl.group_advantages`
(the code router RL uses). The scoring pass samples the router's selection (key, annealed tau), so the LM log-probs
are those of the policy being trained; the old log-probs come from a second pass with the deterministic selection
generation used (key=None), so the clipped ratio corrects for the difference (for a dense model the ratio is 1 at the
update: one update per rollout). The KL term (`loss.grpo.kl_weight`, k3 estimator) is to the initial parameters,
built again as the run built them (from the seed, or loaded from `init.from`; they are not part of the checkpoint);
with `init.trainable: router` only the initial routers are held, the frozen Llama is the state's. With SRA on the router learns from the policy
gradient on its selection log-prob (token penalty) and from the LM loss through its straight-through value gate.
Rollouts are generated on the host of one process: multi-process GRPO is refused with a clear error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, struct
from jaxtyping import Bool, Int

from sra_jax.train import rollout, sharding
from sra_jax.train.config import RECORD_TASKS, TrainConfig
from sra_jax.train.objectives import grpo_loss_fn
from sra_jax.train.update import apply_step, frozen_part, trainable_part

# (completion token ids, reference token ids) -> reward for correctness (1.0 right, 0.0 wrong)
Grader = Callable[[Sequence[int], Sequence[int]], float]


def answer_grader(task: str, tokenizer: Any, *, grader: str = "exact") -> Grader:
    """Exact-answer grading of decoded text: synthetic `#n` answers, GSM8K final numbers, MATH boxed answers
    (`sra_jax.data.grading.is_equivalent`), and for the user's records (data.task "jsonl" / "datasets") the grader
    named `grader` (`sra_jax.data.grading.GRADERS`: exact, numeric, math). The reference is the dataset's target
    (the loss-masked tokens); stop ids (eos, end of turn) are not part of either text."""
    from sra_jax.data import grading, synthetic

    vocab = getattr(tokenizer, "vocab_size", None)
    stop = set(getattr(tokenizer, "stop_ids", ()) or ())

    def text(ids: Sequence[int]) -> str:
        # a model whose vocabulary is wider than the tokenizer's may sample ids the tokenizer has no text for
        return tokenizer.decode([int(t) for t in ids if (vocab is None or int(t) < vocab) and int(t) not in stop])

    if task == "synthetic":
        def grade(completion: Sequence[int], reference: Sequence[int]) -> float:
            want = synthetic.extract_synthetic_answer(text(reference))
            return float(want is not None and synthetic.extract_synthetic_answer(text(completion)) == want)
    elif task in ("gsm8k", "math"):
        extract = grading.extract_gsm8k_answer if task == "gsm8k" else grading.extract_math_answer

        def grade(completion: Sequence[int], reference: Sequence[int]) -> float:
            gold = extract(text(reference))
            return float(gold is not None and grading.is_equivalent(extract(text(completion)), gold))
    elif task in RECORD_TASKS:
        if grader not in grading.GRADERS:
            raise ValueError(f"data.grader={grader!r} must be one of {sorted(grading.GRADERS)}")

        def grade(completion: Sequence[int], reference: Sequence[int]) -> float:
            return float(grading.grade_answer(grader, text(completion), text(reference))[1])
    else:
        raise ValueError(f"no answer grader for data.task={task!r}")
    return grade


def split_prompts(
    tokens: Int[np.ndarray, "n s"], positions: Int[np.ndarray, "n s"], loss_mask: Bool[np.ndarray, "n s"]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, references) of a supervised batch: a row's prompt is its valid tokens before the first loss-masked
    token, its reference the loss-masked tokens."""
    prompts, references = [], []
    for row in range(tokens.shape[0]):
        target = np.flatnonzero(loss_mask[row])
        if target.size == 0:
            raise ValueError(f"batch row {row} has no loss-masked (reference answer) token to grade against")
        prompt = tokens[row, : target[0]][positions[row, : target[0]] >= 0]
        if prompt.size == 0:
            raise ValueError(f"batch row {row} has an empty prompt")
        prompts.append(prompt.tolist())
        references.append(tokens[row, target].tolist())
    return prompts, references


@struct.dataclass
class RolloutBatch:
    """Graded rollouts as micro-batches [accum, n, ...]: prompt + completion (right-padded), completion mask, and the
    grader's reward per row. Rows come in groups of `group_size` samples of one prompt."""

    tokens: Any  # int32 [a, n, s]
    positions: Any  # int32 [a, n, s], -1 on padding
    completion_mask: Any  # bool [a, n, s]
    correct: Any  # float32 [a, n]


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step`: a pure function of (run seed, step), so a resumed run samples the same."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


class GRPOStep:
    """`Trainer.step_fn` for `loss.kind == "grpo"`: `(state, batch) -> (state, metrics)` like the supervised step,
    with the rollout (generate + grade, on the host) in between. `grader` defaults to `answer_grader(data.task)`."""

    def __init__(self, trainer, *, grader: Grader | None = None, tokenizer: Any = None):
        config: TrainConfig = trainer.config
        if jax.process_count() > 1:
            raise ValueError("loss.kind='grpo' generates its rollouts on one host; multi-process GRPO is not "
                             "implemented (run it on one process, on any number of local devices)")
        self.trainer, self.config, self.loss = trainer, config, config.loss
        self.tokenizer = tokenizer if tokenizer is not None else task_tokenizer(config)
        self.grader = grader or answer_grader(config.data.task, self.tokenizer, grader=config.data.grader)
        self.width = config.data.seq_len + config.loss.grpo.max_new_tokens
        self._ref_params = None
        self.last_rollout: rollout.Rollout | None = None  # for inspection (tests, logging)

    @functools.cached_property
    def update(self):
        """jit(train step on a RolloutBatch [, reference params]), state donated; compiled once (fixed width)."""
        trainer, config = self.trainer, self.config
        objective = functools.partial(grpo_loss_fn, graphdef=trainer.graphdef, rest=trainer.rest, loss=self.loss,
                                      has_sra=config.sra is not None, mesh=trainer.mesh)
        router_only = config.init.trainable == "router"
        shardings = (trainer.state_shardings, self._batch_shardings())
        out = (trainer.state_shardings, sharding.replicated(trainer.mesh))
        if self.loss.grpo.kl_weight:
            def step(state, batch, ref_trainable):
                # the reference is the initial trainable part with the (unchanged) frozen part of the state
                frozen = frozen_part(config, state.params)
                ref_params = ref_trainable if frozen is None else nnx.merge_state(ref_trainable, frozen)
                return apply_step(state, batch, functools.partial(objective, ref_params=ref_params), tx=trainer.tx,
                                  router_only=router_only)

            shardings = (*shardings, trainable_part(config, trainer.state_shardings.params))
        else:
            def step(state, batch):
                return apply_step(state, batch, objective, tx=trainer.tx, router_only=router_only)

        return jax.jit(step, in_shardings=shardings, out_shardings=out, donate_argnums=0)

    def reference_params(self):
        """The KL reference: the trainable part of the run's initial parameters (`Trainer.initial_params`, fresh
        from the seed or loaded from init.from); with init.trainable='router' the routers only, the frozen Llama
        is read from the state instead of held twice."""
        if self._ref_params is None:
            self._ref_params = trainable_part(self.config, self.trainer.initial_params())
        return self._ref_params

    def rollout(self, state, batch) -> tuple[RolloutBatch, dict[str, float]]:
        """Sample and grade `group_size` completions of each prompt of `batch` with the parameters of `state`."""
        loss, accum = self.loss, batch.tokens.shape[0]
        arrays = [np.asarray(x).reshape(-1, x.shape[-1]) for x in (batch.tokens, batch.positions, batch.loss_mask)]
        prompts, references = split_prompts(*arrays)
        step = int(np.asarray(state.step))
        model = self.trainer.model(state.params)
        sampled = rollout.sample_group(
            model, prompts, group_size=loss.group_size, max_new_tokens=loss.grpo.max_new_tokens, seq_len=self.width,
            temperature=loss.grpo.sample_temperature, stop_tokens=list(self.tokenizer_stop_ids()),
            pad_id=self.tokenizer_pad_id(), seed=rollout_seed(self.config.seed, step))
        correct = np.array([self.grader(c, references[row // loss.group_size])
                            for row, c in enumerate(sampled.completions)], np.float32)
        self.last_rollout = sampled

        def micro(x):
            return np.asarray(x).reshape(accum, -1, *x.shape[1:])

        rb = RolloutBatch(tokens=micro(sampled.tokens), positions=micro(sampled.positions),
                          completion_mask=micro(sampled.completion_mask), correct=micro(correct))
        return rb, {"rollout_accuracy": float(correct.mean())}

    def tokenizer_stop_ids(self) -> list[int]:
        stop = getattr(self.tokenizer, "stop_ids", None)
        return list(stop) if stop is not None else [self.tokenizer.eos_id]

    def tokenizer_pad_id(self) -> int:
        return int(getattr(self.tokenizer, "pad_id", 0) or 0)

    def __call__(self, state, batch):
        rollout_batch, _ = self.rollout(state, batch)
        placed = jax.tree.map(jax.device_put, rollout_batch, self._batch_shardings())
        if self.loss.grpo.kl_weight:
            return self.update(state, placed, self.reference_params())
        return self.update(state, placed)

    def _batch_shardings(self) -> RolloutBatch:
        mesh = self.trainer.mesh
        rows = sharding.batch_sharding(mesh, 3, leading=1)
        return RolloutBatch(tokens=rows, positions=rows, completion_mask=rows,
                            correct=sharding.batch_sharding(mesh, 2, leading=1))


def task_tokenizer(config: TrainConfig):
    """The tokenizer of `data.task` (decodes completions for the grader; its stop ids end generation): the synthetic
    character tokenizer, for "jsonl" / "datasets" the run's (`sra_jax.train.data.train_tokenizer`), or for GSM8K / MATH the Llama 3 tokenizer at `<data.path or $SRA_JAX_DATA or
    ../shared/data>/llama3/tokenizer.model` (where the text-task training stream reads it)."""
    if config.data.task == "synthetic":
        from sra_jax.data.synthetic import SyntheticTokenizer

        return SyntheticTokenizer()
    if config.data.task in RECORD_TASKS:
        from sra_jax.train.data import train_tokenizer

        return train_tokenizer(config)
    from sra_jax.data.tokenizer import Llama3Tokenizer

    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    root = Path(config.data.path) if config.data.path else Path(os.environ.get("SRA_JAX_DATA", default))
    path = root / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"loss.kind='grpo' with data.task={config.data.task!r}: no tokenizer at {path}")
    return Llama3Tokenizer(path)
