"""Response pools: one-to-many data (a prompt and K responses), the input of CLaP and of simulated users.

A pool is a `datasets.Dataset` with one row per prompt: `prompt` (text or chat messages) and `responses` (a list of
strings), plus any other columns the prompts had. It can be sampled from a model, built from a TRL preference
dataset (chosen and rejected become two responses of one prompt), or taken from an existing multi-response dataset.

The pool decides what z can learn: an instruct model's samples for one prompt differ in content far more than in
tone, length or register. So by default each response is sampled under a different *hidden style instruction* from
a bundled bank (`resources/style_instructions.jsonl`): the instruction is appended to the prompt for sampling only,
recorded in the `instructions` column for diagnostics, and never shown to CLaP, which reads the bare prompt and the
response.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging
from trl.trainer.utils import pad

from ..utils.serialization import atomic_directory, read_consistent, require_directory
from .prompts import Prompt, context_limit, response_text, tokenize_prompt


logger = logging.get_logger(__name__)

PROMPT_COLUMN = "prompt"
RESPONSES_COLUMN = "responses"
INSTRUCTIONS_COLUMN = "instructions"
BUNDLED_STYLE_INSTRUCTIONS = "bundled"


def load_style_instructions(source: str | os.PathLike | list[str] = BUNDLED_STYLE_INSTRUCTIONS) -> list[str]:
    """A bank of style instructions: `"bundled"` (40 instructions over 20 axes: length, sentiment, formality, lists,
    questions, ...; one empty instruction samples the plain prompt), a `.jsonl` file with an `instruction` field per
    line, a text file with one instruction per line, or a list. An empty string stands for "no instruction"."""
    if isinstance(source, list):
        instructions, where = source, "the list of style instructions"
    else:
        if str(source) == BUNDLED_STYLE_INSTRUCTIONS:
            text = resources.files("hf_prefalign.resources").joinpath("style_instructions.jsonl").read_text("utf-8")
            path = Path("style_instructions.jsonl")
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"No style instruction file at {path} (or pass 'bundled').")
            text = path.read_text(encoding="utf-8")
        where = str(path)
        if path.suffix == ".jsonl":
            instructions = []
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({err}).") from err
                if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
                    raise ValueError(f"{path}, line {number}: expected an object with a string `instruction` field.")
                instructions.append(row["instruction"])
        else:
            instructions = [line.strip() for line in text.splitlines() if line.strip()]
    if not all(isinstance(i, str) for i in instructions):
        raise TypeError(f"Style instructions must be strings ({where}).")
    if len(instructions) < 2:
        raise ValueError(
            f"{where} holds {len(instructions)} style instruction(s); a pool needs at least 2 to vary its responses. "
            "Pass style_instructions=None to sample the plain prompt only."
        )
    return [i.strip() for i in instructions]


def instructed_prompt(prompt: Prompt, instruction: str) -> Prompt:
    """`prompt` with a style instruction added to its last user turn (plain text: in front); `""` leaves it as is."""
    if not instruction:
        return prompt
    if isinstance(prompt, str):
        return f"{instruction}\n\n{prompt}"
    messages = [dict(message) for message in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = f"{message['content']}\n\n{instruction}"
            return messages
    return [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']}\n\n{instruction}"}]


@dataclass
class ResponsePoolConfig:
    r"""
    How a response pool is sampled.

    Args:
        num_responses (`int`, *optional*, defaults to 8): responses sampled per prompt (K).
        max_new_tokens (`int`, *optional*, defaults to 96): length cap of each response (a cut response still shows
            its style; longer caps cost sampling and CLaP time linearly).
        temperature (`float`, *optional*, defaults to 1.0): sampling temperature.
        top_k (`int`, *optional*, defaults to 50): top-k sampling (0 disables it).
        top_p (`float`, *optional*, defaults to 1.0): nucleus sampling.
        batch_size (`int`, *optional*, defaults to 8): prompts per `generate` call (each gives K rows).
        seed (`int`, *optional*, defaults to 0): random seed; batch i is sampled under seed + i.
        prompt_column (`str`, *optional*, defaults to `"prompt"`): column of the prompts dataset.
        style_instructions (`str` or `list[str]`, *optional*, defaults to `"bundled"`): a bank of hidden style
            instructions (see [`load_style_instructions`]); each of a prompt's K responses is sampled under a
            different one (drawn without replacement, seeded). `None` samples the plain prompt K times.
        max_prompt_length (`int`, *optional*, defaults to 512): longer (instructed) prompts keep their last tokens,
            with a counted warning.
    """

    num_responses: int = field(default=8, metadata={"help": "Responses sampled per prompt (K)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Length cap of each response, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling (0 disables it)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability mass."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (each yields K rows)."})
    seed: int = field(default=0, metadata={"help": "Random seed; batch i is sampled under seed + i."})
    prompt_column: str = field(default=PROMPT_COLUMN, metadata={"help": "Column of the prompts dataset."})
    # Annotated `str | None` for argument parsers; a list of instructions is accepted from Python as well.
    style_instructions: str | None = field(
        default=BUNDLED_STYLE_INSTRUCTIONS,
        metadata={"help": "Hidden style instructions: 'bundled', a .jsonl/.txt file, or None for plain sampling."},
    )
    max_prompt_length: int = field(default=512, metadata={"help": "Longer prompts keep their last tokens."})

    def __post_init__(self) -> None:
        if self.style_instructions in ("none", ""):
            self.style_instructions = None
        for name in ("num_responses", "max_new_tokens", "batch_size", "max_prompt_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")


def _prompts_dataset(prompts: Dataset | list[Prompt], column: str) -> Dataset:
    if isinstance(prompts, list):
        prompts = Dataset.from_dict({column: prompts})
    if len(prompts) == 0:
        raise ValueError("The prompts dataset is empty.")
    if column not in prompts.column_names:
        raise ValueError(f"The prompts dataset has no {column!r} column; found columns {prompts.column_names}.")
    return prompts


@torch.no_grad()
def build_response_pool(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Dataset | list[Prompt],
    config: ResponsePoolConfig | None = None,
    **overrides: Any,
) -> Dataset:
    """Sample `num_responses` responses per prompt from `model` (batched, seeded, with a progress bar).

    For a [`PrefAlignForCausalLM`], responses come from its base LM (the latent prefix is disabled).

    Args:
        model (`PreTrainedModel`): the causal LM to sample from.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (needs a pad token).
        prompts (`Dataset` or `list`): prompts as text or chat messages (in `config.prompt_column`).
        config (`ResponsePoolConfig`, *optional*): sampling settings; keyword `overrides` replace single fields.

    Returns:
        `Dataset`: the prompts dataset with a `responses` column (a list of K strings per prompt).
    """
    config = ResponsePoolConfig(**{**(config.__dict__ if config else {}), **overrides})
    prompts = _prompts_dataset(prompts, config.prompt_column)
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first.")
    instruction_bank = (
        load_style_instructions(config.style_instructions) if config.style_instructions is not None else None
    )
    disable = getattr(model, "disable_latent", None)
    context = disable() if disable is not None else torch.no_grad()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses: list[list[str]] = []
    instructions: list[list[str]] = []
    start = time.perf_counter()
    num_batches = (len(prompts) + config.batch_size - 1) // config.batch_size
    limit = context_limit(getattr(model.config, "text_config", None) or model.config)
    room = None if limit is None else limit - config.max_new_tokens
    if room is not None and room < 1:
        raise ValueError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the model's context of {limit} "
            "tokens; lower `max_new_tokens`."
        )
    # Longer prompts keep their end (the question and the generation prompt).
    keep = config.max_prompt_length if room is None else min(config.max_prompt_length, room)
    truncated = 0
    with context:
        for batch_index in tqdm(range(num_batches), desc="Sampling responses", unit="batch"):
            first = batch_index * config.batch_size
            rows = prompts[first : first + config.batch_size][config.prompt_column]
            if instruction_bank is None:
                chosen = [[""] for _ in rows]  # one plain prompt per row, K return sequences
            else:
                chosen = [_draw_instructions(instruction_bank, config, first + i) for i in range(len(rows))]
            encoded = []
            for prompt, group in zip(rows, chosen, strict=True):
                for instruction in group:
                    ids = tokenize_prompt(tokenizer, instructed_prompt(prompt, instruction))
                    if len(ids) > keep:
                        ids, truncated = ids[-keep:], truncated + 1
                    encoded.append(ids)
            # Left padding: every row's last prompt token sits at the same column, where generation starts.
            tensors = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
            input_ids = pad(tensors, padding_value=tokenizer.pad_token_id, padding_side="left")
            attention_mask = pad([torch.ones_like(ids) for ids in tensors], padding_value=0, padding_side="left")
            width = input_ids.shape[1]
            torch.manual_seed(config.seed + batch_index)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                do_sample=True,
                num_return_sequences=config.num_responses if instruction_bank is None else 1,
                max_new_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_k=config.top_k or None,
                top_p=config.top_p,
                pad_token_id=tokenizer.pad_token_id,
            )  # (rows * K, width + new), the K samples of a prompt are consecutive
            texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            for row in range(len(rows)):
                group = texts[row * config.num_responses : (row + 1) * config.num_responses]
                responses.append([text.strip() for text in group])
                instructions.append(chosen[row] * (config.num_responses // len(chosen[row])))
    model.train(was_training)
    if truncated:
        logger.warning(
            f"{truncated} prompt(s) exceeded {keep} tokens (max_prompt_length={config.max_prompt_length}, the "
            f"model's context of {limit} minus max_new_tokens={config.max_new_tokens}) and were truncated (their "
            "start was cut)."
        )
    seconds = time.perf_counter() - start
    total = len(prompts) * config.num_responses
    logger.info(f"Sampled {total} responses in {seconds:.1f}s ({total / seconds:.2f} responses/s).")
    if instruction_bank is not None:
        if INSTRUCTIONS_COLUMN in prompts.column_names:
            prompts = prompts.remove_columns(INSTRUCTIONS_COLUMN)
        prompts = prompts.add_column(INSTRUCTIONS_COLUMN, instructions)
    if RESPONSES_COLUMN in prompts.column_names:
        prompts = prompts.remove_columns(RESPONSES_COLUMN)
    pool = prompts.add_column(RESPONSES_COLUMN, responses)
    if config.prompt_column != PROMPT_COLUMN:
        pool = pool.rename_column(config.prompt_column, PROMPT_COLUMN)
    return pool


def _draw_instructions(bank: list[str], config: ResponsePoolConfig, prompt_index: int) -> list[str]:
    """K instructions for one prompt, without replacement while the bank allows, from a generator seeded by
    (seed, prompt index): the same pool is sampled again for the same settings."""
    generator = random.Random(config.seed * 1_000_003 + prompt_index)
    drawn: list[str] = []
    while len(drawn) < config.num_responses:
        drawn += generator.sample(bank, min(len(bank), config.num_responses - len(drawn)))
    return drawn


def _prompt_key(prompt: Prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def as_response_pool(dataset: Dataset) -> Dataset:
    """Normalise a dataset into a response pool (`prompt`, `responses`).

    Accepts a pool (or any multi-response dataset with `prompt` and `responses` columns) and TRL preference datasets
    in the standard or conversational format (`prompt`, `chosen`, `rejected`): chosen and rejected become two
    responses of their prompt, and rows that share a prompt are merged into one.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: a response pool needs at least one prompt with responses.")
    columns = dataset.column_names
    if PROMPT_COLUMN in columns and RESPONSES_COLUMN in columns:

        def to_text(row: dict[str, Any]) -> dict[str, Any]:
            if not isinstance(row[RESPONSES_COLUMN], list):
                raise ValueError(
                    f"`responses` must hold a list of responses per prompt, got {row[RESPONSES_COLUMN]!r:.80}"
                )
            return {RESPONSES_COLUMN: [response_text(r) for r in row[RESPONSES_COLUMN]]}

        return dataset.map(to_text, desc="Checking responses")
    if {PROMPT_COLUMN, "chosen", "rejected"} <= set(columns):
        groups: dict[str, dict[str, Any]] = {}
        for row in dataset:
            key = _prompt_key(row[PROMPT_COLUMN])
            group = groups.setdefault(key, {PROMPT_COLUMN: row[PROMPT_COLUMN], RESPONSES_COLUMN: []})
            for response in (response_text(row["chosen"]), response_text(row["rejected"])):
                if response not in group[RESPONSES_COLUMN]:
                    group[RESPONSES_COLUMN].append(response)
        return Dataset.from_list(list(groups.values()))
    raise ValueError(
        f"Cannot read a response pool from columns {columns}: expected `prompt` + `responses` (one-to-many), or a "
        "TRL preference dataset with `prompt`, `chosen` and `rejected`."
    )


def save_response_pool(pool: Dataset, path: str | os.PathLike) -> None:
    """`save_to_disk` into a staging folder that replaces `path` whole once complete ([`atomic_directory`]): after a
    kill -9 the folder holds the old pool or the new one, never a mix of their data files."""
    with atomic_directory(path) as tmp:
        pool.save_to_disk(str(tmp))


def load_response_pool(path: str | os.PathLike) -> Dataset:
    """Reload a pool saved with [`save_response_pool`] (no resampling), checking its columns."""
    path = Path(path)
    require_directory(path, "response pool")
    try:
        dataset = read_consistent(path, lambda folder: load_from_disk(str(folder)))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"No response pool at {path}: it is not a saved dataset ({err}).") from err
    return as_response_pool(dataset)


__all__ = [
    "BUNDLED_STYLE_INSTRUCTIONS",
    "INSTRUCTIONS_COLUMN",
    "ResponsePoolConfig",
    "instructed_prompt",
    "load_style_instructions",
    "as_response_pool",
    "build_response_pool",
    "load_response_pool",
    "save_response_pool",
]
