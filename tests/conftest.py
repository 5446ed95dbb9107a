"""Fixtures over the tiny models of `hf_prefalign.testing` (built in code, no download), one per supported family.

Constants and plain helpers the tests import (`LATENT_DIM`, `make_tiny_pool`, ...) are in helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import LATENT_DIM, PAPER_DESIGN
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.testing import TINY_FAMILIES, make_tiny_base, make_tiny_tokenizer


# Tiny models run fastest on one thread, and a second OpenMP thread spinning on a busy core slows every small op by
# orders of magnitude when anything else runs on the machine.
torch.set_num_threads(1)


FAMILIES = list(TINY_FAMILIES)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def base(family: str) -> PreTrainedModel:
    return make_tiny_base(family)


@pytest.fixture
def backbone(base: PreTrainedModel) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM).eval()


@pytest.fixture
def paper_backbone(base: PreTrainedModel) -> PrefAlignForCausalLM:
    return PrefAlignForCausalLM.from_base(base, latent_dim=LATENT_DIM, **PAPER_DESIGN).eval()


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()
