"""`TrainConfig`: one typed, frozen config for a training run, read from YAML with `key=value` overrides.

Sections mirror the code that consumes them (model, sra, mesh, optim, loss, data, checkpoint, log). Every field is
validated in `__post_init__` with an error that names the dotted key, and `TrainConfig.to_yaml()` is printed at
start-up so a run is reproducible from its log.
"""

from __future__ import annotations

import dataclasses
import keyword
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sra_jax import configs
from sra_jax.config import LlamaConfig, RopeScaling, SRAConfig  # noqa: F401  (SRAConfig: type hints)
from sra_jax.data.grading import GRADERS
from sra_jax.data.longhop import LonghopConfig, LonghopTokenizer
from sra_jax.data.synthetic import SyntheticConfig
from sra_jax.ops.selection_policy import check_segment_support


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes ("data", "fsdp", "tensor", "sequence"); -1 on one axis means "all remaining
    devices". `sequence` splits the positions of every row into contiguous chunks (long contexts, see docs/train.md);
    data.seq_len must then be divisible by it."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "sequence": self.sequence}
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{name}={size!r} must be a positive integer or -1")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")

    def resolve(self, num_devices: int) -> tuple[int, int, int, int]:
        """(data, fsdp, tensor, sequence) with the -1 axis filled so that the product is `num_devices`."""
        shape = [self.data, self.fsdp, self.tensor, self.sequence]
        known = abs(math.prod(shape))
        if -1 in shape:
            if num_devices % known:
                raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
            shape[shape.index(-1)] = num_devices // known
        if math.prod(shape) != num_devices:
            raise ValueError(f"mesh (data, fsdp, tensor, sequence)={tuple(shape)} needs {math.prod(shape)} "
                             f"devices but {num_devices} are available")
        return shape[0], shape[1], shape[2], shape[3]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax AdamW with linear warmup then cosine decay to `end_lr_fraction * learning_rate`, and global-norm clipping."""

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    decay_steps: int | None = None  # None: decay over the whole run (TrainConfig.steps)
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"optim.decay_steps={self.decay_steps} must be > 0 or null")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"optim.end_lr_fraction={self.end_lr_fraction} must be in [0, 1]")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm={self.clip_norm} must be > 0 or null")


LOSS_KINDS = ("sl", "rl", "sl+rl", "grpo")  # each one's loss terms: sra_jax.train.objectives.KIND_TERMS
# loss.router_distill_queries: whose attention the router distils (sra_jax.train.router_distill)
ROUTER_DISTILL_QUERIES = ("target", "all")


@dataclasses.dataclass(frozen=True)
class RouterRLConfig:
    """The router's policy-gradient term (loss.kind 'rl', 'sl+rl', and 'grpo' with SRA on):
    `weight * (REINFORCE on the selection log-prob - entropy_weight * router entropy)`.

    entropy_weight: bonus on the entropy of the router's first-draw distribution (keeps the policy exploring).
    """

    weight: float = 1.0
    entropy_weight: float = 0.0

    def __post_init__(self):
        for name in ("weight", "entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.router_rl.{name}={getattr(self, name)} must be >= 0")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """LM GRPO (loss.kind 'grpo', see sra_jax.train.lm_rl): rollouts of `max_new_tokens` sampled at
    `sample_temperature`; clipped ratio (`clip_eps`) and the k3 KL to the initial parameters (`kl_weight`)."""

    max_new_tokens: int = 16
    sample_temperature: float = 1.0
    clip_eps: float = 0.2
    kl_weight: float = 0.0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"loss.grpo.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.sample_temperature <= 0:
            raise ValueError(f"loss.grpo.sample_temperature={self.sample_temperature} must be > 0 (GRPO samples)")
        if self.clip_eps <= 0:
            raise ValueError(f"loss.grpo.clip_eps={self.clip_eps} must be > 0")
        if self.kl_weight < 0:
            raise ValueError(f"loss.grpo.kl_weight={self.kl_weight} must be >= 0")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which losses train the model and their weights (the terms of each kind: sra_jax.train.objectives).

    kind: "sl" next-token cross-entropy on loss-masked tokens; "rl" router policy gradient only; "sl+rl" both;
        "grpo" LM RL: sample `group_size` completions of each prompt, grade the answer, clipped policy-gradient
        update of the whole model (and the router's selection, when SRA is on); see sra_jax.train.lm_rl.
    teacher_kl_weight: KL(dense teacher || student) on loss-masked tokens ('sl', 'rl', 'sl+rl'); the teacher is the
        same weights with every token critical (so SRA attention is exactly dense), under stop_gradient.
    token_penalty (lambda) and length_penalty (mu): reward = correct - lambda * selected_fraction - mu * generated
        tokens (router RL and GRPO).
    group_size: samples per prompt for the GRPO-style group baseline (each sample draws its own router selection).
    temperature_start/end/steps: the router's selection temperature tau (Gumbel top-k relaxation, Bernoulli
        p = sigmoid(logit / tau), sparsemax(logit / tau); also the router-entropy temperature), annealed by a cosine
        from start to end over `temperature_steps` and passed to the model as a traced scalar each step (no
        recompilation); logged as `tau`. Null (the default): tau stays at sra.tau. `temperature_end` null = start.
    indexer_kl_weight: the DSA lightning indexers' KL to the dense attention distribution (summed over DSA layers,
        `ModelAux.indexer_loss`; it trains only the indexers, and is 0 in a model without DSA layers).
    router_rl: the router's policy-gradient term; grpo: LM GRPO's sampling and objective.
    router_distill_weight: KL from the dense teacher's attention mass on each key (outside the window and the global
        tokens, summed over heads) to the softmax of the router's scores, per SRA router (sra_jax.train.router_distill;
        only the routers get its gradient). 0 (the default) leaves it out.
    router_distill_queries: whose attention mass: "target" (the queries that predict loss-masked tokens, the answer)
        or "all" (every valid query).
    """

    kind: str = "sl"
    sl_weight: float = 1.0
    teacher_kl_weight: float = 0.0
    indexer_kl_weight: float = 1.0
    token_penalty: float = 0.1
    length_penalty: float = 0.0
    group_size: int = 4
    advantage_eps: float = 1e-6
    temperature_start: float | None = None
    temperature_end: float | None = None
    temperature_steps: int = 1
    router_rl: RouterRLConfig = dataclasses.field(default_factory=RouterRLConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    router_distill_weight: float = 0.0
    router_distill_queries: str = "target"

    def __post_init__(self):
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind={self.kind!r} must be one of {', '.join(map(repr, LOSS_KINDS))}")
        if self.router_distill_queries not in ROUTER_DISTILL_QUERIES:
            raise ValueError(f"loss.router_distill_queries={self.router_distill_queries!r} must be one of "
                             f"{', '.join(map(repr, ROUTER_DISTILL_QUERIES))}")
        for name in ("sl_weight", "teacher_kl_weight", "indexer_kl_weight", "token_penalty", "length_penalty",
                     "router_distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0")
        if self.group_size < 1:
            raise ValueError(f"loss.group_size={self.group_size} must be >= 1")
        if self.kind != "sl" and self.group_size < 2:
            raise ValueError(f"loss.group_size={self.group_size} must be >= 2 for a group baseline (loss.kind={self.kind!r})")
        if self.advantage_eps <= 0:
            raise ValueError(f"loss.advantage_eps={self.advantage_eps} must be > 0")
        for name in ("temperature_start", "temperature_end"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"loss.{name}={getattr(self, name)} must be > 0 or null")
        if self.temperature_start is None and self.temperature_end is not None:
            raise ValueError(f"loss.temperature_end={self.temperature_end} needs loss.temperature_start (the schedule "
                             f"starts there); set both or neither")
        if self.temperature_steps < 1:
            raise ValueError(f"loss.temperature_steps={self.temperature_steps} must be >= 1")

    @property
    def uses_sl(self) -> bool:
        return self.kind in ("sl", "sl+rl")

    @property
    def uses_rl(self) -> bool:
        return self.kind in ("rl", "sl+rl")


# the user's own prompt / answer examples (sra_jax.data.records)
RECORD_TASKS = ("jsonl", "datasets")
DATA_TASKS = ("synthetic", "longhop", "gsm8k", "math", *RECORD_TASKS)

# Keys that live in a sub-section of their section: an old flat key is refused naming its place.
MOVED_KEYS = {
    "loss.rl_weight": "loss.router_rl.weight",
    "loss.entropy_weight": "loss.router_rl.entropy_weight",
    **{f"loss.{name}": f"loss.grpo.{name}" for name in ("max_new_tokens", "sample_temperature", "clip_eps",
                                                         "kl_weight")},
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: the built-in synthetic task (no download), GSM8K / MATH jsonl through sra_jax.data, or the
    user's own prompt / answer examples (task "jsonl" or "datasets", see sra_jax.data.records).

    jsonl: `path` is a .jsonl file; each line a JSON object holding either `prompt_field` and `answer_field`, or
        `messages_field` (a chat: [{role, content}, ...] whose final assistant message is the target).
    datasets: `datasets.load_dataset(path, name, split=split, data_files=data_files)` (a local folder, a builder
        such as "json" / "parquet" with data_files, or a hub data set name), with the same fields per row.
    chat: prompt / answer examples go through the tokenizer's chat template as one user turn and the assistant's
        answer (chat examples always do); false: `bos prompt answer eos`.
    grader: how generated text is graded against the answer: "exact" (whitespace-normalised equality), "numeric"
        (the final number) or "math" (the boxed / final answer, math-verify); see sra_jax.data.grading.GRADERS.
    tokenizer: a tokenizer.json or tiktoken tokenizer.model, a folder holding one, or hf://org/name; null: the one
        beside init.from (see sra_jax.data.text_tokenizer).

    pack: several whole examples per row of seq_len (first-fit over each epoch's order; for the endless synthetic
        task over chunks of 1024 problems), told apart by segment ids: attention never crosses examples and
        positions restart at 0 in each. Supervised training only (loss.kind='sl': rewards are per row); with
        `sra` the router selects per example (a selection policy with supports_segments: 'topk', 'gumbel_topk'). False: one example per row,
        right-padded.
    max_segments: with pack, the most examples a packed row holds (an integer >= 1; default 64). The packer closes
        a row when it holds this many, and the train step passes it to the model as a static bound, so SRA attention
        gathers each row's critical keys (at most num_critical(seq_len) + max_segments) instead of visiting every
        causal block. Smaller is faster attention but fuller rows need fewer, longer examples.
    """

    task: str = "synthetic"
    form: str = "direct"  # synthetic: "direct" answers or "cot" chains of thought
    seq_len: int = 64
    seed: int = 0
    eval_size: int = 256
    path: str | None = None  # GSM8K / MATH: the folder holding gsm8k/, math/, llama3/; jsonl / datasets: see above
    pack: bool = False
    max_segments: int = 64
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    longhop: LonghopConfig = dataclasses.field(default_factory=LonghopConfig)  # data.task="longhop"
    name: str | None = None  # datasets: the data set's configuration name
    split: str = "train"  # datasets: the split to train on
    data_files: tuple[str, ...] = ()  # datasets: files for a builder such as "json" or "parquet"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    messages_field: str = "messages"
    chat: bool = False
    grader: str = "exact"
    tokenizer: str | None = None

    def __post_init__(self):
        if self.task not in DATA_TASKS:
            raise ValueError(f"data.task={self.task!r} must be one of {', '.join(map(repr, DATA_TASKS))}")
        if self.task in RECORD_TASKS and not self.path:
            raise ValueError(f"data.task={self.task!r} needs data.path ("
                             f"{'a .jsonl file' if self.task == 'jsonl' else 'the datasets.load_dataset path'})")
        if self.grader not in GRADERS:
            raise ValueError(f"data.grader={self.grader!r} must be one of {', '.join(map(repr, GRADERS))}")
        for name in ("prompt_field", "answer_field", "messages_field", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"data.{name}={getattr(self, name)!r} must be a non-empty string")
        if not isinstance(self.chat, bool):
            raise ValueError(f"data.chat={self.chat!r} must be true or false")
        if self.task == "longhop" and self.pack:
            raise ValueError("data.pack=true is not available for data.task='longhop' (one problem per row)")
        if self.form not in ("direct", "cot"):
            raise ValueError(f"data.form={self.form!r} must be 'direct' or 'cot'")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.eval_size < 1:
            raise ValueError(f"data.eval_size={self.eval_size} must be >= 1")
        if not isinstance(self.pack, bool):
            raise ValueError(f"data.pack={self.pack!r} must be true or false")
        if not isinstance(self.max_segments, int) or isinstance(self.max_segments, bool) or self.max_segments < 1:
            raise ValueError(f"data.max_segments={self.max_segments!r} must be an integer >= 1 (the most examples a "
                             f"packed row holds)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """orbax checkpoints: save every `every` steps (and at the end / on SIGTERM), keep the last `keep` verified ones.

    allow_config_change: resume from a checkpoint whose model / sra / schedule keys differ from this config's
        (refused by default, naming the keys; see sra_jax.train.checkpoint.RESUME_KEYS).
    frozen: with init.from and init.trainable router, "reference" stores only the routers' parameters and names the
        source and its fingerprint (a resume, export, generate and eval reload the frozen weights from it); "copy"
        stores every parameter (see sra_jax.train.frozen).
    """

    dir: str | None = None
    every: int = 100
    keep: int = 3
    async_save: bool = True
    allow_config_change: bool = False  # resume even if model / sra / schedule keys differ from the checkpoint's
    frozen: str = "reference"  # router-only runs from init.from: "reference" the frozen weights, or "copy" them

    def __post_init__(self):
        if self.frozen not in ("reference", "copy"):
            raise ValueError(f"checkpoint.frozen={self.frozen!r} must be 'reference' or 'copy'")
        if self.dir is not None and not self.dir.strip():
            raise ValueError(f"checkpoint.dir={self.dir!r} is empty; give a folder, or null for no checkpoints")
        if self.every < 1:
            raise ValueError(f"checkpoint.every={self.every} must be >= 1")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics to `dir/metrics.jsonl` and TensorBoard every `every` steps; a rich progress bar on the console."""

    dir: str | None = None
    every: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"log.every={self.every} must be >= 1")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the weights start. `from` (YAML key; `from_` in Python): null = random init from `seed`, else a Hugging
    Face Llama folder, an sra-jax orbax model folder, or an sra-jax training checkpoint folder (its newest step, or
    DIR/STEP); see `sra_jax.convert.source`. The model section then comes from that checkpoint (an explicit `model:`
    value that disagrees is an error) and `sra` from it too unless given; routers start fresh unless it holds them.

    trainable: "all" trains every parameter; "router" trains the SRA routers only (the Llama weights get no
        gradient and no optimizer state, and stay bit-identical).
    """

    from_: str | None = None
    trainable: str = "all"

    def __post_init__(self):
        if self.from_ is not None and (not isinstance(self.from_, str) or not self.from_):
            raise ValueError(f"init.from={self.from_!r} must be a path or null")
        if self.trainable not in ("all", "router"):
            raise ValueError(f"init.trainable={self.trainable!r} must be 'all' or 'router'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run. `batch_size` is global (all hosts), split into `grad_accum` micro-batches."""

    model: LlamaConfig = dataclasses.field(default_factory=lambda: LlamaConfig.tiny(vocab_size=128))
    sra: SRAConfig | None = None
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    steps: int = 100
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "reference"
    remat: str = "none"  # per decoder layer: "none", "full" (keep layer inputs only), "dots_saveable" (keep matmuls)
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size}")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16"):
                raise ValueError(f"{name}={getattr(self, name)!r} must be 'float32' or 'bfloat16'")
        if self.attention_impl not in ("reference", "gather", "xla", "cudnn", "pallas"):
            raise ValueError(f"attention_impl={self.attention_impl!r} must be one of reference, gather, xla, cudnn, pallas")
        if self.remat not in ("none", "full", "dots_saveable"):
            raise ValueError(f"remat={self.remat!r} must be one of 'none', 'full', 'dots_saveable'")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps={self.max_bad_steps} must be >= 1")
        if self.loss.uses_rl and self.sra is None:
            raise ValueError(f"loss.kind={self.loss.kind!r} trains the router, so `sra` must be set (it is null)")
        if self.data.task == "synthetic" and self.model.vocab_size < 99:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be >= 99 for the synthetic tokenizer")
        longhop_vocab = LonghopTokenizer(self.data.longhop).vocab_size
        if self.data.task == "longhop" and self.model.vocab_size < longhop_vocab:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be >= {longhop_vocab} for the longhop "
                             f"tokenizer (data.longhop)")
        if self.data.task in ("gsm8k", "math") and self.model.vocab_size < 128256:  # Llama 3: 128000 BPE + 256 special
            raise ValueError(f"model.vocab_size={self.model.vocab_size} must be >= 128256 for the Llama 3 tokenizer "
                             f"(data.task={self.data.task!r})")
        rollout_len = self.data.seq_len + self.loss.grpo.max_new_tokens
        if self.loss.kind == "grpo" and rollout_len > self.model.max_position_embeddings:
            raise ValueError(f"loss.kind='grpo': data.seq_len + loss.grpo.max_new_tokens = "
                             f"{rollout_len} exceeds model.max_position_embeddings="
                             f"{self.model.max_position_embeddings} (a rollout is prompt + completion)")
        if self.data.pack and self.loss.kind != "sl":
            raise ValueError(f"data.pack=true cannot train loss.kind={self.loss.kind!r}: the router's selection "
                             f"log-prob, the reward and its group advantage are one per row (GRPO also samples one "
                             f"prompt per row), so a packed row would give all its examples one shared reward; use "
                             f"loss.kind='sl' or data.pack=false")
        if self.sra is not None and self.sra.attention != "sra" and self.loss.teacher_kl_weight:
            raise ValueError(f"loss.teacher_kl_weight={self.loss.teacher_kl_weight} cannot train sra.attention="
                             f"{self.sra.attention!r}: its teacher makes every token critical, which leaves NSA / DSA "
                             f"layers sparse (not a dense teacher); set loss.teacher_kl_weight=0 (DSA's indexer learns "
                             f"from loss.indexer_kl_weight)")
        if self.loss.router_distill_weight and (self.sra is None or self.sra.attention != "sra"):
            raise ValueError(f"loss.router_distill_weight={self.loss.router_distill_weight} trains SRA routers, but "
                             f"sra.attention is {None if self.sra is None else repr(self.sra.attention)} (no router); "
                             f"set loss.router_distill_weight=0 or sra.attention='sra'")
        if self.data.pack and self.sra is not None:
            check_segment_support(self.sra.selection, f"data.pack=true cannot train with sra.selection={self.sra.selection!r}")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                             f"{self.model.max_position_embeddings}")
        if self.mesh.sequence > 1 and self.data.seq_len % self.mesh.sequence:
            raise ValueError(f"data.seq_len={self.data.seq_len} must be divisible by mesh.sequence="
                             f"{self.mesh.sequence} (each device holds an equal contiguous chunk of every row)")
        if self.mesh.sequence != 1 and self.loss.kind == "grpo":
            raise ValueError(f"mesh.sequence={self.mesh.sequence} cannot train loss.kind='grpo': its rollouts decode "
                             f"one token at a time (a sequence-sharded rollout is not built); use mesh.sequence=1")
        if self.init.trainable == "router" and self.sra is None:
            raise ValueError("init.trainable='router' trains the SRA routers, so `sra` must be set (it is null)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, _with_init_source(values), "")

    @classmethod
    def from_saved(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The run config a training checkpoint stored (its `to_dict()`), without its `init` (the weights are the
        checkpoint's); keys a checkpoint written before they moved holds flat (MOVED_KEYS) are read from there."""
        values = {k: v for k, v in values.items() if k != "init"}
        loss = values.get("loss")
        if isinstance(loss, Mapping):
            loss = dict(loss)
            for old, new in MOVED_KEYS.items():
                name = old.removeprefix("loss.")
                if name in loss:
                    section, field = new.removeprefix("loss.").split(".")
                    loss[section] = {**(loss.get(section) or {}), field: loss.pop(name)}
            values["loss"] = loss
        return cls.from_dict(values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
        """The YAML file at `path` or the packaged config of that name (see `sra_jax.configs`), or the defaults;
        then each `dotted.key=value` override in order."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                resolved = configs.resolve(path)
            except FileNotFoundError as error:
                raise ValueError(f"config file {str(path)!r} does not exist: {error}") from None
            loaded = _parse_yaml(resolved.read_text(), f"config file {str(path)!r}")
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"config file {str(path)!r}: the top level must be a mapping of config keys")
            values = loaded or {}
        for override in overrides:
            key, sep, raw = override.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"override {override!r} must look like dotted.key=value")
            if not raw.strip():
                raise ValueError(f"override {override!r} has no value; write {key}=null to unset it")
            _set_dotted(values, key, _parse_yaml(raw, f"override {override!r}"))
        return cls.from_dict(values)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML: {problem}{at}") from None


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = values
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _with_init_source(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """With init.from set: the model section from that checkpoint (an explicit `model:` value must agree with it)
    and its SRA settings unless `sra` is given."""
    init = values.get("init")
    source_path = init.get("from") if isinstance(init, Mapping) else None
    if not source_path:
        return values
    from sra_jax.convert.source import resolve_source  # reads config files only

    try:
        source = resolve_source(source_path)
    except FileNotFoundError as error:
        raise ValueError(f"init.from={source_path!r}: {error}") from None
    source_model = _to_plain(source.config)
    given = values.get("model") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"model must be a mapping, got {given!r}")
    for key, value in given.items():
        if key not in source_model:
            raise ValueError(f"unknown config key 'model.{key}'; model accepts {sorted(source_model)}")
        explicit = getattr(_build(LlamaConfig, {**source_model, key: value}, "model."), key)
        if explicit != getattr(source.config, key):
            raise ValueError(f"model.{key}={value!r} disagrees with init.from={source_path!r}, whose model.{key}="
                             f"{source_model[key]!r}; the model section comes from the checkpoint (drop "
                             f"model.{key} or give the checkpoint's value)")
    out = {**values, "model": source_model}
    if "sra" not in values and source.sra is not None:
        out["sra"] = _to_plain(source.sra)
    return out


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass type inside `X` or `X | None`, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _build(cls: type, values: Mapping[str, Any] | None, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    values = {(f"{k}_" if isinstance(k, str) and keyword.iskeyword(k) else k): v for k, v in values.items()}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    for key in unknown:
        if prefix + key in MOVED_KEYS:
            raise ValueError(f"config key '{prefix}{key}' is now '{MOVED_KEYS[prefix + key]}'")
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"{prefix.rstrip('.') or 'top level'} accepts {sorted(map(_yaml_key, fields))}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        sub = _dataclass_of(hints[name])
        if sub is RopeScaling and isinstance(value, Mapping):
            kwargs[name] = RopeScaling.from_hf(value)
        elif sub is not None and (value is None or isinstance(value, Mapping)):
            optional = type(None) in typing.get_args(hints[name])
            if value is None and optional:
                kwargs[name] = None
            else:
                merged = {**_section_defaults(fields[name]), **(value or {})}
                kwargs[name] = _build(sub, merged, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        message = str(error)
        if prefix and not message.startswith(prefix.rstrip(".")):
            message = f"{prefix.rstrip('.')}: {message}"
        raise ValueError(message) from None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """A YAML value checked against the field's annotation (int, float, bool, str, lists, sections, Optional), with
    the dotted key in the error: ints and "3e-3"-style strings (YAML 1.1 reads them as str) become floats, lists
    become tuples."""
    for option in _options(annotation):
        ok, converted = _convert(value, option)
        if ok:
            return converted
    raise ValueError(f"{key}={value!r} must be {_describe(annotation)}")


def _options(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _convert(value: Any, kind: Any) -> tuple[bool, Any]:
    """(whether `value` is a `kind`, the value as one)."""
    if kind is Any or (dataclasses.is_dataclass(kind) and isinstance(value, kind)):  # a section's default instance
        return True, value
    if kind is type(None) or value is None:
        return value is None and kind is type(None), None
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return False, None
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return False, None
        return math.isfinite(number), number
    if kind is str:
        return isinstance(value, str), value
    if typing.get_origin(kind) in (list, tuple, Sequence) and isinstance(value, (list, tuple)):
        element = (typing.get_args(kind) or (Any,))[0]
        items = [_convert(v, element) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return False, None


def _describe(annotation: Any) -> str:
    """What a field accepts, in words: `an integer or null`."""
    words = []
    for kind in _options(annotation):
        if dataclasses.is_dataclass(kind):
            words.append(f"a section (a mapping of {', '.join(f.name for f in dataclasses.fields(kind) if f.init)})")
        elif typing.get_origin(kind) in (list, tuple, Sequence):
            element = (typing.get_args(kind) or (Any,))[0]
            words.append(f"a list of {_describe(element).removeprefix('a ').removeprefix('an ')}s")
        else:
            words.append({bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
                          type(None): "null"}.get(kind, str(kind)))
    return " or ".join(words)


def _section_defaults(field: dataclasses.Field) -> dict[str, Any]:
    """The field values of a section's default instance, so an override changes one key and keeps the rest."""
    if field.default_factory is dataclasses.MISSING:
        return {}
    default = field.default_factory()
    values = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    if isinstance(default, LlamaConfig):
        values["head_dim"] = None  # resolved from hidden_size / heads again unless set explicitly
    return values


def _yaml_key(name: str) -> str:
    """A field named after a Python keyword (`from_`) is that keyword in YAML."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {_yaml_key(f.name): _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value
