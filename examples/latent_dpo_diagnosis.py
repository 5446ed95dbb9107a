"""Why do Latent DPO users barely move? A validation-split diagnosis on the embedded default model (2 CPU cores).

A backbone reading and steering at one layer (default 7 of 30) starts from the pool's PCA (no gradient step). For 4
users, on the same <= 256 pairs as the evidence run, it compares three ways to place a user in z:
`dpo8` (Latent DPO with the default rank-8 prompt-dependent prior), `dpo0` (the same prior with its prompt-dependent
part removed: the constant mean only) and `diff` (no training: `PreferenceEmbedding.from_examples` with the chosen
responses liked and the rejected ones disliked, i.e. their precision-weighted mean difference in z). Reports each z's
norm and spread over prompts, the cosines between them, and the reward gain over the base (in base SDs) and
perplexity ratio on the validation prompts (16 x 2 samples). Writes `docs/preference_space/diagnosis.json`.

    python examples/latent_dpo_diagnosis.py [LAYER]

Reuses the training pool of `examples/preference_space_evidence.py` (under outputs/preference_space).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from preference_space_evidence import get_pool, perplexity_under, sample_rows, split_prompts, stats

from hf_prefalign import (
    CLaPConfig,
    CLaPTrainer,
    LatentCache,
    LatentDPOConfig,
    LatentDPOTrainer,
    PrefAlignForCausalLM,
    PreferenceEmbedding,
    load_default_base,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.scorers import get_scorer


torch.set_num_threads(2)
args = argparse.Namespace(
    train_prompts=128, probe_prompts=24, val_prompts=16, test_prompts=48, num_responses=8, seed=0, max_new_tokens=96
)
LAYER = int(sys.argv[1]) if len(sys.argv) > 1 else 7
t0 = time.time()
work = Path("outputs/preference_space")
splits = split_prompts(args)
base, tok = load_default_base()
tok.padding_side = "left"
pool = get_pool("train", splits["train"], base, tok, work, args)
bf16, _ = load_default_base(dtype="auto")
bb = PrefAlignForCausalLM.from_base(bf16, tokenizer=tok, encoder_layer=LAYER, steering_layers=[LAYER])
CLaPTrainer(
    model=bb,
    args=CLaPConfig(
        output_dir="outputs/diag-pca", max_steps=0, latent_init_scale=1.0, save_strategy="no", report_to=[]
    ),
    train_dataset=pool,
    processing_class=tok,
)._init_latent_space(resuming=False)
bb.eval()
cache = LatentCache(bb, tok)
cache.encode_pool(pool)
gen = PrefAlignForCausalLM.from_base(base, tokenizer=tok, encoder_layer=LAYER, steering_layers=[LAYER]).eval()
gen.load_state_dict(bb.latent_state_dict(), strict=False)
users = ["positive", "concise", "questioning", "structured"]
print("setup", time.time() - t0, flush=True)
report = {}
for u in users:
    pairs = preference_pairs_from_pool(pool, get_scorer(u))
    pairs = pairs.shuffle(seed=0).select(range(min(256, len(pairs))))
    import copy

    cfg = LatentDPOConfig(output_dir=f"outputs/diag-users/{u}", report_to=[], seed=0, disable_tqdm=True)
    tr = LatentDPOTrainer(bb, cfg, train_dataset=pairs, processing_class=tok, latent_cache=cache)
    tr.train()
    gen.load_preference(tr.model, preference_id=f"{u}.dpo8", overwrite=True)
    glob = copy.deepcopy(tr.model)
    with torch.no_grad():
        glob.up.zero_()
    gen.load_preference(glob, preference_id=f"{u}.dpo0", overwrite=True)
    liked = [{"prompt": r["prompt"], "response": r["chosen"]} for r in pairs]
    disliked = [{"prompt": r["prompt"], "response": r["rejected"]} for r in pairs]
    emb = PreferenceEmbedding.from_examples(bb, tok, liked, disliked, latent_cache=cache)
    gen.load_preference(emb, preference_id=f"{u}.diff", overwrite=True)
    ids = torch.tensor([[1, 2, 3]])
    from hf_prefalign.data.prompts import tokenize_prompt

    vals = {}
    zs = {}
    for kind in ("dpo8", "dpo0", "diff"):
        z = torch.stack(
            [
                gen.preference_latents(torch.tensor([tokenize_prompt(tok, p)]), None, f"{u}.{kind}")[0]
                for p in splits["val"]["prompt"][:8]
            ]
        )
        zs[kind] = z
        vals[kind] = {"norm": float(z.norm(dim=1).mean()), "spread_over_prompts": float(z.std(0).norm())}
    for a, b in (("dpo8", "diff"), ("dpo0", "diff"), ("dpo8", "dpo0")):
        vals[f"cos_{a}_{b}"] = float(torch.nn.functional.cosine_similarity(zs[a].mean(0), zs[b].mean(0), dim=0))
    report[u] = vals
    print(u, json.dumps(vals), flush=True)
settings = [(None, 0.0)]
for u in users:
    settings += [(f"{u}.dpo8", 4.0), (f"{u}.dpo0", 4.0), (f"{u}.diff", 2.0), (f"{u}.diff", 4.0)]


def rows(ids, mask, c):
    pid, s = settings[c]
    if pid is None:
        return {"latents": torch.zeros(ids.shape[0], gen.config.latent_dim)}
    return {"latents": gen.preference_latents(ids, mask, pid, strength=s)}


val = list(splits["val"]["prompt"])
out = sample_rows(gen.generate, tok, val, len(settings), rows, 2, args, 10_000)
bppl = perplexity_under(bf16, tok, val, out[0], 2)
btexts = [tok.decode(r, skip_special_tokens=True) for r in out[0]]
for (pid, s), resp in zip(settings[1:], out[1:], strict=True):
    u = pid.split(".")[0]
    sc = get_scorer(u)
    texts = [tok.decode(r, skip_special_tokens=True) for r in resp]
    ref = stats(sc(btexts).tolist())
    rw = stats(sc(texts).tolist())
    ppl = perplexity_under(bf16, tok, val, resp, 2) / bppl
    line = {"id": pid, "strength": s, "gain_sd": (rw["mean"] - ref["mean"]) / (ref["std"] or 1), "ppl": ppl}
    report.setdefault("gen", []).append(line)
    print(json.dumps(line), flush=True)
Path("docs/preference_space/diagnosis.json").write_text(
    json.dumps({"layer": LAYER, "seconds": time.time() - t0, **report}, indent=1) + "\n"
)
print("total", time.time() - t0)
