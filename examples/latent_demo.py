"""Wrap the embedded default model (SmolLM2-135M-Instruct) in a PrefAlign backbone and decode under several z.

The backbone is untrained here (CLaP training comes later): its prefix starts as copies of the BOS token's state,
so the base stays fluent and different z change the responses only a little, without meaning yet. The demo shows the machinery end to end - offline base loading, the latent prefix, batched per-row latents,
save/load - and records the parameter budget and load times in docs/foundation.json.

    python examples/latent_demo.py [--output-dir outputs/latent_demo]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import hf_prefalign
from hf_prefalign import PrefAlignForCausalLM, default_cache_dir, load_default_base


PROMPTS = [
    "Give me one tip for staying focused while studying.",
    "Describe a rainy afternoon in two sentences.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="outputs/latent_demo", help="where the backbone is saved")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument(
        "--latent-scale", type=float, default=3.0, help="the two demo latents are drawn from N(0, scale^2 I)"
    )
    parser.add_argument("--report", default="docs/foundation.json", help="JSON file for the measured figures")
    args = parser.parse_args()
    torch.manual_seed(0)

    # 1. Load the base twice: the first call may convert the GGUF, the second reads the cached safetensors copy.
    fresh_cache = not any((default_cache_dir() / "default_base").glob("*/hf_prefalign_converted.json"))
    start = time.perf_counter()
    load_default_base()
    first_load = time.perf_counter() - start
    start = time.perf_counter()
    base, tokenizer = load_default_base()
    cached_load = time.perf_counter() - start
    print(
        f"default base: first load {first_load:.1f}s ({'with' if fresh_cache else 'without'} GGUF conversion), "
        f"cached load {cached_load:.1f}s"
    )

    # 2. Wrap it. The base is frozen; only the latent encoder and adapter would train.
    model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer).eval()
    base_params = sum(p.numel() for p in model.get_base_model().parameters())
    latent_params = model.num_latent_parameters()
    encoder_params = sum(p.numel() for p in model.latent_encoder.parameters())
    adapter_params = sum(p.numel() for p in model.latent_adapter.parameters())
    print(
        f"base parameters {base_params:,}; latent encoder {encoder_params:,} + adapter {adapter_params:,} = "
        f"{latent_params:,} ({100 * latent_params / base_params:.2f}% of the base)"
    )

    # 3. One batch, one z per row: rows 0-1 under z_a, rows 2-3 under z_b (left padding, as generation needs).
    tokenizer.padding_side = "left"
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    inputs = tokenizer(chats * 2, return_tensors="pt", padding=True)
    z_a = args.latent_scale * torch.randn(model.config.latent_dim)
    z_b = args.latent_scale * torch.randn(model.config.latent_dim)
    latents = torch.stack([z_a, z_a, z_b, z_b])
    start = time.perf_counter()
    out = model.generate(**inputs, latents=latents, max_new_tokens=args.max_new_tokens, do_sample=False)
    gen_seconds = time.perf_counter() - start
    texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for i, prompt in enumerate(PROMPTS):
        print(f"\n### {prompt}\n[z_a] {texts[i].strip()}\n[z_b] {texts[i + 2].strip()}")

    # 4. Save (latent modules only: the base is frozen) and reload; greedy outputs must match.
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    saved_bytes = sum(f.stat().st_size for f in output_dir.rglob("*") if f.is_file())
    reloaded = PrefAlignForCausalLM.from_pretrained(output_dir)
    again = reloaded.generate(**inputs, latents=latents, max_new_tokens=args.max_new_tokens, do_sample=False)
    identical = torch.equal(out, again)
    print(f"\nsaved to {output_dir} ({saved_bytes / 1e6:.1f} MB, latent modules only); reload identical: {identical}")

    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "versions": {
            "hf_prefalign": hf_prefalign.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "base_parameters": base_params,
        "latent_encoder_parameters": encoder_params,
        "latent_adapter_parameters": adapter_params,
        "latent_parameters": latent_params,
        "latent_fraction_of_base": latent_params / base_params,
        "default_base_first_load_seconds": first_load,
        "default_base_first_load_included_conversion": fresh_cache,
        "default_base_cached_load_seconds": cached_load,
        f"generate_seconds_4x{args.max_new_tokens}_tokens": gen_seconds,
        "saved_backbone_bytes": saved_bytes,
        "reload_identical": identical,
    }
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"figures written to {args.report}")
    if not identical:
        raise SystemExit("reloaded backbone generated different tokens")


if __name__ == "__main__":
    main()
