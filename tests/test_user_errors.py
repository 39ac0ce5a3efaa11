"""Every user mistake ends in one clear line: config loading checks each field's type with the dotted key (fuzzed),
the `sra-jax` commands exit non-zero with one line and no traceback (unless --debug), and the library refuses inputs
that would otherwise give a silent wrong result."""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from sra_jax import cli
from sra_jax.config import LlamaConfig, SRAConfig
from sra_jax.generate import generate
from sra_jax.nn import Llama
from sra_jax.train.config import TrainConfig


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        sections = [t for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)]
        keys.append(prefix + field.name)
        for section in sections:
            keys += _dotted_keys(section, f"{prefix}{field.name}.")
    return keys


KEYS = _dotted_keys(TrainConfig)
RAW_VALUES = st.one_of(
    st.text(max_size=12), st.integers().map(str), st.floats().map(str),
    st.sampled_from(["true", "no", "null", "[1, 2]", "[a]", "{a: 1}", "{}", "[", "{", "'x'", "- 1", "1e999", ".nan",
                     "'3e-3'", "0", "-1", "64", "2.5"]),
)


@given(key=st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z_.]{1,12}", fullmatch=True)),
       raw=RAW_VALUES)
def test_any_override_loads_or_raises_one_valueerror_naming_the_key(key, raw):
    try:
        config = TrainConfig.load(None, [f"{key}={raw}"])
    except ValueError as error:
        message = str(error)
        assert "\n" not in message.strip()
        parts = key.strip().split(".")
        assert any(part in message for part in parts if part) or "override" in message, message
    else:
        assert isinstance(config, TrainConfig)


@pytest.mark.parametrize("override, expected", [
    ("steps=abc", "steps='abc' must be an integer"),
    ("data=5", "data=5 must be a section"),
    ("log.tensorboard=3", "log.tensorboard=3 must be true or false"),
    ("optim.learning_rate=fast", "optim.learning_rate='fast' must be a finite number"),
    ("sra.layers=[0, a]", "sra.layers=[0, 'a'] must be"),
    ("model.hidden_size=null", "model.hidden_size=None must be an integer"),
    ("checkpoint.dir=", "write checkpoint.dir=null to unset it"),
    ("checkpoint.dir=' '", "checkpoint.dir=' ' is empty"),
    ("stepz=3", "unknown config key(s) ['stepz']"),
])
def test_typed_overrides_name_the_dotted_key(override, expected):
    with pytest.raises(ValueError) as error:
        TrainConfig.load(None, [override])
    assert expected in str(error.value)


def _one_line_error(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0 and "Traceback (most recent call last)" not in err, err
    last = err.splitlines()[-1]  # train prints the resolved config first when the mistake is found later
    assert last.startswith(f"sra-jax {argv[0]}: "), err
    return last


def test_cli_user_mistakes_end_in_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [1\nmodel: {")
    assert str(bad_yaml) in _one_line_error(capsys, ["train", "--config", str(bad_yaml)])
    assert "does not exist" in _one_line_error(capsys, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert "steps='abc'" in _one_line_error(capsys, ["train", "--set", "steps=abc"])
    assert "data=5" in _one_line_error(capsys, ["train", "--set", "data=5"])
    mesh = _one_line_error(capsys, ["train", "--set", f"mesh.data={jax.device_count() + 1}", "--set", "steps=1",
                                    "--set", "log.progress=false"])
    assert f"needs {jax.device_count() + 1} devices" in mesh


def test_cli_debug_lets_the_exception_through():
    with pytest.raises(ValueError, match="devices but"):
        cli.main(["train", "--debug", "--set", f"mesh.data={jax.device_count() + 1}", "--set", "steps=1",
                  "--set", "log.progress=false"])


@pytest.fixture(scope="module")
def tiny_model():
    config = LlamaConfig.tiny(vocab_size=64, max_position_embeddings=32)
    return Llama(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad_id", [64, 1000, -1])
def test_token_ids_outside_the_vocabulary_raise_eagerly_and_give_nan_under_jit(tiny_model, bad_id):
    tokens = jnp.array([[1, 2, bad_id, 3], [1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"must lie in \[0, vocab_size=64\)"):
        tiny_model(tokens)
    logits, _ = nnx.jit(lambda m, t: m(t))(tiny_model, tokens)
    assert bool(jnp.isnan(logits[0, 2:]).all())  # the bad id and what attends to it: NaN, never a real row
    assert bool(jnp.isfinite(logits[1]).all())  # other rows are untouched


@given(ids=st.lists(st.integers(-3, 70), min_size=4, max_size=4))  # one shape: no recompiles
def test_token_id_check_accepts_exactly_the_vocabulary(tiny_model, ids):
    tokens = jnp.array([ids])
    if all(0 <= i < 64 for i in ids):
        tiny_model(tokens)
    else:
        with pytest.raises(ValueError, match="vocab_size=64"):
            tiny_model(tokens)


def test_generate_refuses_to_run_past_max_position_embeddings(tiny_model):
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        generate(tiny_model, [[1, 2, 3]], max_new_tokens=30)
    with pytest.raises(ValueError, match="vocab_size=64"):
        generate(tiny_model, [[1, 99]], max_new_tokens=2)


def test_sra_layers_the_model_does_not_have_are_refused():
    with pytest.raises(ValueError, match=r"sra.layers=\[0, 7\] names layers \[7\]"):
        Llama(LlamaConfig.tiny(vocab_size=64), SRAConfig(layers=[0, 7]), rngs=nnx.Rngs(0))


def test_from_hf_names_the_missing_shape_keys():
    with pytest.raises(ValueError, match=r"lacks required keys \['vocab_size', 'hidden_size'"):
        LlamaConfig.from_hf({})


@pytest.mark.parametrize("damage", ["empty_metadata", "truncated_data"])
def test_convert_of_a_damaged_orbax_model_ends_in_one_line(tiny_model, tmp_path, capsys, damage):
    from sra_jax.convert import save_orbax

    src = tmp_path / "model"
    save_orbax(tiny_model, src)
    if damage == "empty_metadata":
        (src / "params" / "embed" / "_METADATA").write_bytes(b"")
    else:
        data = max((src / "params" / "embed").rglob("d/*"), key=lambda p: p.stat().st_size)
        data.write_bytes(data.read_bytes()[:10])
    line = _one_line_error(capsys, ["convert", "orbax-to-hf", str(src), str(tmp_path / "out")])
    assert str(src) in line


def test_generate_refuses_a_tokenizer_of_another_vocabulary(tiny_model, tmp_path, capsys, data_dir):
    from sra_jax.convert import save_orbax

    save_orbax(tiny_model, tmp_path / "model")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "hi", "--tokenizer",
                  str(data_dir / "llama3" / "tokenizer.model")])
    assert exit_.value.code == 2
    assert "has 128256 tokens but the model's vocab_size is 64" in capsys.readouterr().err
