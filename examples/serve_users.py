"""Serving several users from one backbone: one batch, one preference id per row, and the text-generation pipeline.

Needs a backbone and users, e.g. from `hf-prefalign quickstart` (default folder prefalign-quickstart):

    python examples/serve_users.py --run prefalign-quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, pipeline

from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.data.prompts import tokenize_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="prefalign-quickstart", help="a quickstart output folder")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    run = Path(args.run)

    model = PrefAlignForCausalLM.from_pretrained(run / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(run / "backbone")
    users = sorted(p.name for p in (run / "users").iterdir() if (p / "config.json").is_file())
    for user in users:  # each is read and checked against the backbone's fingerprint
        model.load_preference(run / "users" / user, preference_id=user)

    # One batch: every row its own prompt and its own user (None = neutral). Left padding for generation.
    requests = [
        ("Review a cheap hotel you stayed in.", users[0]),
        ("Describe a rainy Monday.", None),
        ("Review a cheap hotel you stayed in.", users[-1]),
        ("Describe a rainy Monday.", users[0]),
    ]
    encoded = [tokenize_prompt(tokenizer, [{"role": "user", "content": text}]) for text, _ in requests]
    width = max(map(len, encoded))
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        preference_id=[user for _, user in requests],
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    for (text, user), row in zip(requests, out[:, width:], strict=True):
        print(f"[{user or 'neutral'}] {text}\n    {tokenizer.decode(row, skip_special_tokens=True).strip()}")

    # The standard pipeline, one user per call, chat input.
    tokenizer.padding_side = "left"
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    chat = [{"role": "user", "content": "What do you think of rainy Mondays?"}]
    for user in users:
        reply = pipe(chat, preference_id=user, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"[pipeline, {user}] {reply[0]['generated_text'][-1]['content'].strip()}")


if __name__ == "__main__":
    main()
