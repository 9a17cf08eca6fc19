"""tests/kernel_mutations.py's planted bugs still match the kernels: a bug whose source text is gone plants nothing
(the full run reports it as stale only after hours), so each text is checked here, in seconds."""
from pathlib import Path

import pytest

import kernel_mutations

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mutation", kernel_mutations.MUTATIONS, ids=lambda mutation: mutation.name)
def test_planted_bug_text_is_in_its_file(mutation):
    text = (ROOT / mutation.path).read_text()
    assert mutation.original in text, f"stale: {mutation.path} no longer holds the text this bug replaces"
    assert mutation.planted != mutation.original


def test_planted_bug_names_are_unique():
    names = [mutation.name for mutation in kernel_mutations.MUTATIONS]
    assert len(names) == len(set(names))
