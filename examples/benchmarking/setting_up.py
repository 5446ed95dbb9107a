"""Setting up: the base model and tokenizer, the prompt splits, and the check that every method shares the base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from benchmarking.arguments import BenchmarkArguments
from benchmarking.quick_models import make_quick_base, make_quick_prompts, make_quick_tokenizer
from hf_prefalign import PrefAlignForCausalLM, load_base_model, load_bundled_prompts, load_response_pool
from hf_prefalign.utils.constants import EMBEDDED_DEFAULT_BASE


@dataclass
class Setup:
    base_reference: str
    tokenizer: Tokenizer
    dtype: torch.dtype = torch.float32
    train_pool: Dataset | None = None
    heldout_prompts: list[Any] = field(default_factory=list)
    backbone: PrefAlignForCausalLM | None = None
    one_time: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def load_base(self) -> PreTrainedModel:
        """A fresh copy of the base model in `dtype` (PEFT methods wrap it in place, so each run starts from its own
        copy)."""
        return load_base_model(self.base_reference, dtype=self.dtype).eval()


def _prompt_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True)


def resolve_base(args: BenchmarkArguments, work: Path) -> tuple[str, Tokenizer]:
    """The base model reference every method starts from, and its tokenizer."""
    if args.backbone is not None:
        config = json.loads((Path(args.backbone) / "config.json").read_text(encoding="utf-8"))
        if config.get("base_included"):
            raise ValueError(
                f"The backbone at {args.backbone} carries a fine-tuned copy of its base (CLaP with an unfrozen LM), so "
                "LoRA-DPO and prefix-tuning DPO would start from a different model than Latent DPO. Use a backbone "
                "trained with the base frozen (the default CLaP recipe), or leave --backbone out."
            )
        reference = config.get("base_model_name_or_path")
        if not reference:
            raise ValueError(f"The backbone at {args.backbone} does not name its base model.")
        if (Path(args.backbone) / "tokenizer_config.json").is_file():
            return reference, AutoTokenizer.from_pretrained(args.backbone)
    elif args.quick:
        reference = str(work / "tiny-base")
        tokenizer = make_quick_tokenizer()
        make_quick_base(len(tokenizer), seed=args.seed).save_pretrained(reference)
        tokenizer.save_pretrained(reference)
        return reference, tokenizer
    else:
        reference = EMBEDDED_DEFAULT_BASE
    if reference == EMBEDDED_DEFAULT_BASE:
        from hf_prefalign import load_default_base

        _, tokenizer = load_default_base()
        return reference, tokenizer
    return reference, AutoTokenizer.from_pretrained(reference)


def split_prompts(args: BenchmarkArguments) -> tuple[Dataset | None, list[Any], list[Any], list[Any], str]:
    """(reused pool or None, training prompts, validation prompts, held-out test prompts, where they come from).

    The last `num_heldout` prompts of the source (a reused pool, else the bundled prompt set) are the test prompts,
    the `num_validation` before them the validation prompts (selections only); the first `num_train_prompts` of the
    rest make the pairs. The three sets are checked to be disjoint.
    """
    if args.pool is not None:
        pool = load_response_pool(args.pool)
        prompts, source = list(pool["prompt"]), f"pool {args.pool}"
    else:
        pool = None
        if args.quick:
            prompts, source = list(make_quick_prompts(40, args.seed)["prompt"]), "random tiny-vocabulary prompts"
        else:
            prompts, source = list(load_bundled_prompts()["prompt"]), "bundled prompt set"
    held = args.num_heldout + args.num_validation
    if len(prompts) <= held:
        raise ValueError(
            f"The {source} has {len(prompts)} prompts; {args.num_heldout} test and {args.num_validation} validation "
            "prompts are held out, which leaves none to train on."
        )
    heldout = prompts[-args.num_heldout :]
    validation = prompts[-held : -args.num_heldout]
    train = prompts[: min(args.num_train_prompts, len(prompts) - held)]
    keys = {name: {_prompt_key(p) for p in part} for name, part in (("test", heldout), ("validation", validation))}
    keys["training"] = {_prompt_key(p) for p in train}
    for first, second in (("test", "training"), ("test", "validation"), ("validation", "training")):
        overlap = keys[first] & keys[second]
        if overlap:
            raise ValueError(
                f"{len(overlap)} {first} prompt(s) also appear among the {second} prompts of the {source}."
            )
    if pool is not None:
        pool = pool.select(range(len(train)))
    return pool, train, validation, heldout, source


def check_same_base(backbone: PrefAlignForCausalLM, base: PreTrainedModel) -> None:
    """The baselines start from `base`; the backbone's frozen base must hold exactly the same weights."""
    ours, theirs = backbone.get_base_model().state_dict(), base.state_dict()
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise ValueError(
            "The backbone's base model differs from the base the LoRA / prefix baselines start from; the comparison "
            "needs the same base model. Use a backbone trained on this base with the base frozen."
        )
