"""`hf-prefalign generate`: generate with a backbone, optionally for a user (`--preference_id`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hf_prefalign.cli import common
from hf_prefalign.cli.common import UsageError


@dataclass
class GenerateArguments:
    backbone: str = field(metadata={"help": "A backbone folder or Hub repo."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "One or more prompts (chat messages)."})
    preference_id: str | None = field(default=None, metadata={"help": "The user to generate for."})
    preference: str | None = field(
        default=None, metadata={"help": "Where that user's embedding is (folder or Hub repo); or a bank folder."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling threshold (with --do_sample)."})
    num_return_sequences: int = field(default=1, metadata={"help": "Responses per prompt."})
    seed: int | None = field(default=None, metadata={"help": "Random seed (transformers' set_seed), for sampling."})
    dtype: str = common._dtype_field("the backbone's base")
    use_cpu: bool = common._use_cpu_field()

    def __post_init__(self):
        common._check_dtype(self.dtype)


def _arguments() -> tuple[type, ...]:
    """`generate`'s flags: `GenerateArguments`."""
    return (GenerateArguments,)


def _generate(argv: list[str]) -> int:
    import torch

    from hf_prefalign.data.prompts import tokenize_prompt

    (args,) = common._parse("generate", _arguments(), argv)
    if not args.prompt:
        raise UsageError("give at least one --prompt")
    sampling = {name: getattr(args, name) for name in ("temperature", "top_p") if getattr(args, name) is not None}
    if sampling and not args.do_sample:
        raise UsageError(f"--{' / --'.join(sampling)} only apply when sampling: add --do_sample")
    if args.num_return_sequences < 1:
        raise UsageError(f"--num_return_sequences must be at least 1, got {args.num_return_sequences}")
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    device = common._device(args.use_cpu)
    model, tokenizer = common._load_backbone(args.backbone, args.dtype, device)
    if args.preference_id is not None:
        if args.preference is None:
            raise UsageError("--preference_id needs --preference (the user's embedding, or a bank folder)")
        if (Path(args.preference) / "bank.json").is_file():
            model.preferences.load(args.preference)
        else:
            model.load_preference(args.preference, preference_id=args.preference_id)
    for prompt in args.prompt:
        ids = torch.tensor([tokenize_prompt(tokenizer, [{"role": "user", "content": prompt}])], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            preference_id=args.preference_id,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            num_return_sequences=args.num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        for index, row in enumerate(out):
            label = f" ({index + 1}/{len(out)})" if len(out) > 1 else ""
            print(f"### {prompt}{label}\n{tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip()}\n")
    return 0
