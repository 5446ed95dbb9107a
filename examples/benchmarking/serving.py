"""Serving: one batch mixing users, against PEFT mixed-adapter LoRA and users one after another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarking.arguments import BenchmarkArguments
from benchmarking.measuring import median_seconds
from benchmarking.setting_up import Setup


@torch.no_grad()
def serving_benchmark(
    setup: Setup,
    heldout_ids: list[list[int]],
    embedding_dirs: list[Path],
    lora_dirs: list[Path],
    args: BenchmarkArguments,
) -> dict[str, Any]:
    from peft import PeftModel

    tokenizer, backbone, rows = setup.tokenizer, setup.backbone, args.serving_users
    prompts = [heldout_ids[i % len(heldout_ids)] for i in range(rows)]
    width = max(map(len, prompts))
    input_ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):  # left padding: every row's next token sits in the same column
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    # Users beyond the trained ones reuse their weights under new names: throughput does not depend on the values.
    names = [f"serve-{i}" for i in range(rows)]
    for i, name in enumerate(names):
        backbone.load_preference(embedding_dirs[i % len(embedding_dirs)], preference_id=name, overwrite=True)
    lora = PeftModel.from_pretrained(setup.load_base(), lora_dirs[0], adapter_name=names[0])
    for i, name in enumerate(names[1:], start=1):
        lora.load_adapter(lora_dirs[i % len(lora_dirs)], adapter_name=name)
    lora.eval()
    new_tokens = args.serving_max_new_tokens
    settings = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def row(i: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor([prompts[i]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def ours_mixed() -> None:
        backbone.generate(input_ids=input_ids, attention_mask=attention_mask, preference_id=names, **settings)

    def ours_sequential() -> None:
        for i, name in enumerate(names):
            backbone.generate(**row(i), preference_id=name, **settings)

    def lora_mixed() -> None:
        lora.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=names, **settings)

    def lora_sequential() -> None:
        for i, name in enumerate(names):
            lora.set_adapter(name)
            lora.generate(**row(i), **settings)

    def base_batch() -> None:
        with backbone.disable_latent():
            backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)

    runs = {
        "ours_mixed_batch": ours_mixed,
        "ours_sequential": ours_sequential,
        "lora_mixed_batch": lora_mixed,
        "lora_sequential": lora_sequential,
        "base_batch": base_batch,
    }
    results: dict[str, Any] = {"rows": rows, "new_tokens_per_row": new_tokens, "repeats": args.serving_repeats}
    for name, fn in runs.items():
        seconds, all_times = median_seconds(fn, args.serving_repeats)
        results[name] = {
            "seconds": seconds,
            "seconds_all": all_times,
            "tokens_per_second": rows * new_tokens / seconds,
        }
    return results
