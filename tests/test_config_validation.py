"""mplug.run.run_config / config_checks (issue 23 items 13, 14): every bad value is refused up front naming its key,
YAML aliases are refused naming the file, and a property test over random override lists."""
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mplug.run.run_config import allowed_keys, load_config


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=nan", "optimizer.lr"),
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("max_grad_norm=.nan", "max_grad_norm"),
    ("max_steps=true", "max_steps"),
    ("schedule.warmup_ratio=.nan", "schedule.warmup_ratio"),
    ("schedule.warmup_ratio=2", "schedule.warmup_ratio"),
    ("seed=12345678901234567890", "seed"),
    ("optimizer.betas=[a,b]", "optimizer.betas"),
    ("vocab=[a,b]", "vocab"),
    ("epochs=100000000000", "epochs"),
    ("grad_checkpointing=1", "grad_checkpointing"),
    ("skip_non_finite_steps=-1", "skip_non_finite_steps"),
    ("max_image_pixels=0", "max_image_pixels"),
    ("max_image_pixels=200000000", "max_image_pixels"),
    ("train_file=[]", "train_file"),
    ("optimizer.lr=[1", "optimizer.lr"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(repr(key)) if "[1" not in override else re.escape(key)):
        load_config("vqa_base", [override])


def test_yaml_aliases_are_refused_naming_the_file(tmp_path):
    """A 7-level alias bomb (each level 9 aliases of the one above) loaded in 98 s before; refused at once now."""
    lines = ["task: vqa", 'a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in "bcdefg":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{','.join(['*' + previous] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 400
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{re.escape(str(bomb))}: YAML aliases \(\*a, line 3\) are not allowed"):
        load_config(str(bomb))
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match=r"--set train_file: YAML aliases"):
        load_config("vqa_base", ["train_file=[&x a, *x]"])


SHIPPED_KEYS = [key for key in allowed_keys() if key != "task"]
BAD_VALUES = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "true", "false", "null", "'text'", "[1, 2]", "[a, b]", "{a: 1}",
                     "-1", "0", "1e400", "-0.5", "2"]),
    st.integers(min_value=-10**25, max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="ab01.-[]{}:, ", max_size=8),
)


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SHIPPED_KEYS), BAD_VALUES), min_size=1, max_size=4))
def test_every_refusal_names_its_key(overrides):
    """Random keys of the shipped config with random (mostly bad) values: load_config either accepts them or raises
    a ValueError that names one of the overridden keys (never another exception type)."""
    try:
        load_config("vqa_base", [f"{key}={value}" for key, value in overrides])
    except ValueError as error:
        message = str(error)
        assert any(key in message for key, _ in overrides), message
