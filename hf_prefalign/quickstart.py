"""The quickstart: the whole method end to end on the embedded default model, in resumable stages.

pool (bundled prompts -> K responses each) -> CLaP backbone -> two users with different tastes aligned with Latent DPO ->
neutral / user A / user B generations side by side for held-out prompts, with each user's reward.
Every stage writes its result under `output_dir`; a rerun skips the stages already done.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from .utils.serialization import write_json_atomic


logger = logging.get_logger(__name__)

STATE_FILE = "quickstart.json"


@dataclass
class QuickstartConfig:
    r"""
    Settings of `hf-prefalign quickstart`.

    Args:
        output_dir (`str`, *optional*, defaults to `"prefalign-quickstart"`): where pool, backbone and users are saved.
        fast (`bool`, *optional*, defaults to `False`): a smaller run (under 5 minutes on 2 cores) to see it work.
        users (`list[str]`, *optional*, defaults to `["concise", "negative"]`): two scorers that define the users
            (short answers, and a critical tone: both directions the pool's responses show; a `detailed` user cannot
            lengthen answers beyond the pool's own length cap, docs/quickstart.md).
        num_prompts (`int`, *optional*): bundled prompts used (the last `num_heldout` are held out); default 44
            (fast: 20).
        num_heldout (`int`, *optional*, defaults to 4): held-out prompts shown side by side.
        num_responses (`int`, *optional*): responses per prompt in the pool; default 8 (fast: 6).
        max_new_tokens (`int`, *optional*): length cap of the side-by-side answers; default 256 (fast: 160), so
            they end on their own rather than at the cap (the pool uses `ResponsePoolConfig`'s own cap).
        overwrite (`bool`, *optional*, defaults to `False`): allow an output folder that holds something else.
        seed (`int`, *optional*, defaults to 0): random seed.
    """

    output_dir: str = field(default="prefalign-quickstart", metadata={"help": "Where everything is saved."})
    fast: bool = field(default=False, metadata={"help": "A smaller run (under 5 minutes on 2 cores)."})
    users: list[str] = field(
        default_factory=lambda: ["concise", "negative"], metadata={"help": "Two scorers defining the users."}
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Bundled prompts used (default 44, fast 20)."})
    num_heldout: int = field(default=4, metadata={"help": "Held-out prompts shown side by side."})
    num_responses: int | None = field(default=None, metadata={"help": "Responses per prompt (default 8, fast 6)."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap of the side-by-side answers (default 256, fast 160)."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Allow an output folder that holds something else."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        self.num_prompts = self.num_prompts or (20 if self.fast else 44)
        self.num_responses = self.num_responses or (6 if self.fast else 8)
        self.max_new_tokens = self.max_new_tokens or (160 if self.fast else 256)
        if len(self.users) != 2:
            raise ValueError(f"The quickstart aligns exactly two users, got {self.users}.")
        if self.num_responses < 4:
            raise ValueError(
                f"`num_responses` must be at least 4 to build preference pairs, got {self.num_responses}."
            )
        if not 0 < self.num_heldout < self.num_prompts:
            raise ValueError(f"`num_heldout` must be between 1 and num_prompts - 1, got {self.num_heldout}.")


def _prepare_output(config: QuickstartConfig) -> tuple[Path, dict[str, Any]]:
    """The output folder and its recorded state; refuses a folder that holds something else (unless overwrite)."""
    output = Path(config.output_dir)
    state_file = output / STATE_FILE
    settings = {k: v for k, v in asdict(config).items() if k not in ("output_dir", "overwrite")}
    if state_file.is_file():
        state = json.loads(state_file.read_text(encoding="utf-8"))
        if state.get("settings") == settings:
            return output, state
        if not config.overwrite:
            raise FileExistsError(
                f"{output} holds a quickstart run with other settings; pass --overwrite to start over there."
            )
    elif output.exists() and any(output.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{output} is not empty and holds no quickstart run; pass --overwrite to use it anyway.")
    if config.overwrite and output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    state = {"settings": settings, "stages": {}}
    write_json_atomic(state, state_file)
    return output, state


def _done(output: Path, state: dict[str, Any], stage: str, **info: Any) -> None:
    state["stages"][stage] = info
    write_json_atomic(state, output / STATE_FILE)


def _stop_token_ids(model, tokenizer) -> torch.Tensor:
    """The ids that end an answer: the generation config's EOS ids and the tokenizer's EOS (finished rows of a
    batch are padded with the pad token, which only follows one of them)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def run_quickstart(config: QuickstartConfig, echo=print) -> dict[str, Any]:
    """Run (or resume) the quickstart; returns the recorded state with timings and the rewards table."""
    from transformers import AutoTokenizer

    from .data.pairs import preference_pairs_from_pool
    from .data.pools import ResponsePoolConfig, build_response_pool, load_response_pool, save_response_pool
    from .data.prompts import load_bundled_prompts, tokenize_prompt
    from .integrations import load_default_base
    from .models.prefalign.modeling_prefalign import PrefAlignForCausalLM
    from .scorers import get_scorer
    from .trainer import CLaPConfig, CLaPTrainer, LatentDPOConfig, LatentDPOTrainer

    run_start = time.perf_counter()
    scorers = {name: get_scorer(name) for name in config.users}  # fail early on an unknown scorer
    output, state = _prepare_output(config)
    torch.manual_seed(config.seed)
    prompts = load_bundled_prompts().select(range(config.num_prompts))
    num_train = config.num_prompts - config.num_heldout

    # 1. Response pool
    pool_dir = output / "pool"
    if "pool" in state["stages"]:
        echo(f"[1/4] pool: reusing {pool_dir}")
        pool = load_response_pool(pool_dir)
        base = tokenizer = None
    else:
        echo(f"[1/4] pool: sampling {config.num_responses} responses for each of {num_train} prompts")
        base, tokenizer = load_default_base()
        start = time.perf_counter()
        pool = build_response_pool(
            base,
            tokenizer,
            prompts.select(range(num_train)),
            ResponsePoolConfig(num_responses=config.num_responses, seed=config.seed),
        )
        save_response_pool(pool, pool_dir)
        _done(output, state, "pool", seconds=round(time.perf_counter() - start, 1), prompts=len(pool))

    # 2. CLaP backbone
    backbone_dir = output / "backbone"
    if "clap" in state["stages"]:
        echo(f"[2/4] CLaP: reusing {backbone_dir}")
    else:
        echo(f"[2/4] CLaP: training the backbone on {len(pool)} prompts")
        # The frozen base in bf16 where the hardware has it (~1.7x faster CLaP); the latent modules stay fp32.
        base, tokenizer = load_default_base(dtype="auto")
        # The library's defaults are the recipe (docs/preference_space.md measures them).
        model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer)
        args = CLaPConfig(
            output_dir=str(output / "clap-trainer"),
            save_strategy="no",
            logging_steps=5,
            report_to=[],
            seed=config.seed,
            use_cpu=not torch.cuda.is_available(),
        )
        start = time.perf_counter()
        trainer = CLaPTrainer(model=model, args=args, train_dataset=pool, processing_class=tokenizer)
        trainer.train()
        model.save_pretrained(backbone_dir)
        tokenizer.save_pretrained(backbone_dir)
        shutil.rmtree(output / "clap-trainer", ignore_errors=True)
        _done(output, state, "clap", seconds=round(time.perf_counter() - start, 1))

    # Generation where the hardware is: the trainers above place themselves, a loaded model stays on the CPU.
    model = PrefAlignForCausalLM.from_pretrained(backbone_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)

    # 3. Two users
    if "users" in state["stages"]:
        echo(f"[3/4] users: reusing {output / 'users'}")
    else:
        timings = {}
        for name, scorer in scorers.items():
            pairs = preference_pairs_from_pool(pool, scorer)
            echo(f"[3/4] user '{name}': Latent DPO on {len(pairs)} preference pairs")
            args = LatentDPOConfig(
                output_dir=str(output / "users" / name),
                latent_cache_dir="none",
                report_to=[],
                seed=config.seed,
                use_cpu=not torch.cuda.is_available(),
            )
            trainer = LatentDPOTrainer(model, args, train_dataset=pairs, processing_class=tokenizer)
            start = time.perf_counter()
            trainer.train()
            timings[name] = round(time.perf_counter() - start, 2)
            trainer.save_preference(output / "users" / name)
        _done(output, state, "users", train_seconds=timings)
    for name in config.users:
        model.load_preference(output / "users" / name, preference_id=name, overwrite=True)

    # 4. Side by side on held-out prompts, every column in one batch
    echo("[4/4] generating: neutral / " + " / ".join(config.users))
    start = time.perf_counter()
    columns = [None, *config.users]
    texts: dict[str | None, list[str]] = {c: [] for c in columns}
    ended = dict.fromkeys(columns, 0)  # answers that stopped on their own, before `max_new_tokens`
    stop_ids = _stop_token_ids(model, tokenizer)
    heldout = prompts.select(range(num_train, config.num_prompts))
    # Every prompt x column in one left-padded batch: one decoding loop instead of one per prompt.
    encoded = [tokenize_prompt(tokenizer, row["prompt"]) for row in heldout]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded) * len(columns), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, prompt_ids in enumerate(encoded):
        rows = slice(index * len(columns), (index + 1) * len(columns))
        ids[rows, width - len(prompt_ids) :] = torch.tensor(prompt_ids)
        mask[rows, width - len(prompt_ids) :] = 1
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        preference_id=columns * len(encoded),
        do_sample=False,
        no_repeat_ngram_size=4,  # greedy decoding of a 135M model loops otherwise; the same for every column
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    new_tokens = out[:, width:]
    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    stopped = torch.isin(new_tokens, stop_ids.to(new_tokens.device)).any(dim=1).tolist()
    for index, row in enumerate(heldout):
        echo(f"\n### {row['prompt'][-1]['content']}")
        rows = slice(index * len(columns), (index + 1) * len(columns))
        for column, text, stop in zip(columns, decoded[rows], stopped[rows], strict=True):
            texts[column].append(text.strip())
            ended[column] += int(stop)
            echo(f"  [{column or 'neutral'}] {text.strip()}")
    table = {
        scorer_name: {str(c or "neutral"): round(float(scorer(texts[c]).mean()), 3) for c in columns}
        for scorer_name, scorer in scorers.items()
    }
    words = {str(c or "neutral"): round(sum(len(t.split()) for t in texts[c]) / len(texts[c]), 1) for c in columns}
    natural_endings = {str(c or "neutral"): ended[c] for c in columns}
    echo("\nmean reward of each user's scorer (rows) over each column's generations:")
    echo("scorer      " + "".join(f"{str(c or 'neutral'):>12}" for c in columns))
    for scorer_name, row in table.items():
        echo(f"{scorer_name:<12}" + "".join(f"{value:>12.3f}" for value in row.values()))
    echo("words       " + "".join(f"{value:>12.1f}" for value in words.values()))
    echo("ended       " + "".join(f"{f'{n}/{len(heldout)}':>12}" for n in natural_endings.values()))
    echo(f"(ended: answers that stopped on their own before max_new_tokens={config.max_new_tokens})")
    _done(
        output,
        state,
        "generate",
        seconds=round(time.perf_counter() - start, 1),
        rewards=table,
        words=words,
        natural_endings=natural_endings,
        prompts=len(heldout),
    )
    # Wall clock of this invocation, loading included (a rerun that reuses stages records its own, shorter, time).
    state["seconds"] = round(time.perf_counter() - run_start, 1)
    write_json_atomic(state, output / STATE_FILE)
    echo(f"\nsaved under {output}: pool/, backbone/, users/{config.users[0]}/, users/{config.users[1]}/")
    return state


__all__ = ["QuickstartConfig", "run_quickstart"]
