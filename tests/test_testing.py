"""`hf_prefalign.testing`: the tiny models and tokenizers the tests and examples share."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import pytest
import torch

import hf_prefalign.testing
from hf_prefalign.testing import TINY_FAMILIES, TINY_VOCAB_SIZE, make_tiny_base, make_tiny_tokenizer


def test_the_module_docstring_example_holds():
    assert doctest.testmod(hf_prefalign.testing, verbose=False).failed == 0


def test_imports_only_transformers_tokenizers_and_torch():
    tree = ast.parse(Path(hf_prefalign.testing.__file__).read_text(encoding="utf-8"))
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "collections", "torch", "tokenizers", "transformers"}, imported


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_bases_are_seeded_and_match_the_tokenizer(family):
    first, again, other = make_tiny_base(family), make_tiny_base(family), make_tiny_base(family, seed=1)
    weights = first.get_input_embeddings().weight
    assert torch.equal(weights, again.get_input_embeddings().weight)
    assert not torch.equal(weights, other.get_input_embeddings().weight)
    assert weights.shape[0] == TINY_VOCAB_SIZE == len(make_tiny_tokenizer()) and not first.training


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="Unknown tiny model family 'opt'; choose from gpt2, llama, qwen2"):
        make_tiny_base("opt")
