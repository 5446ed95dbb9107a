"""Figures derived from a run: the ratios, the sample-efficiency curves and the targets met or missed."""

from __future__ import annotations

import math
from typing import Any

from benchmarking.methods import METHODS


def ratios(users: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per user and budget: Latent DPO's training time and artefact size over the baselines'."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for user, record in users.items():
        out[user] = {}
        for budget, entry in record["budgets"].items():
            methods = entry["methods"]
            ours = methods["latent_dpo"]
            out[user][budget] = {
                "time_ours_over_lora": ours["train_seconds"] / methods["lora_dpo"]["train_seconds"],
                "time_ours_over_prefix": ours["train_seconds"] / methods["prefix_dpo"]["train_seconds"],
                "time_ours_over_caa": ours["train_seconds"] / methods["caa"]["train_seconds"],
                "size_ours_over_lora": ours["artefact_bytes"] / methods["lora_dpo"]["artefact_bytes"],
                "weights_ours_over_lora": ours["weights_bytes"] / methods["lora_dpo"]["weights_bytes"],
            }
    return out


def sample_efficiency(users: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per user and method, one point per budget: pairs used, reward (mean, se), gain over the base, time."""
    curves: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for user, record in users.items():
        curves[user] = {method: [] for method in METHODS}
        for budget, entry in record["budgets"].items():
            for method, figures in entry["methods"].items():
                curves[user][method].append(
                    {
                        "budget": int(budget),
                        "pairs": entry["pairs"],
                        "reward_mean": figures["reward"]["mean"],
                        "reward_se": figures["reward"]["se"],
                        "gain": figures.get("gain"),
                        "train_seconds": figures["train_seconds"],
                    }
                )
    return curves


def _reward_vs(ours: dict[str, float], other: dict[str, float]) -> tuple[float, float]:
    """Difference of means and its standard error."""
    return ours["mean"] - other["mean"], math.sqrt(ours["se"] ** 2 + other["se"] ** 2)


def _users_needed(count: int, of: int, users: int) -> int:
    """'k of 6 users' for any number of users: the same share, rounded up."""
    return math.ceil(count * users / of)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets (benchmark v2), each with the measured value and whether it was met.

    Reads `results["users"]` (per user: `budgets` -> budget -> `methods`), `results["neutral"]["base"]` and
    `results["serving"]`. The oracle is in no target. Latent DPO's gain over the base is compared with LoRA-DPO's
    and CAA's at the largest budget (the base cancels: gains differ as rewards do).
    """
    users, neutral, serving = results["users"], results["neutral"]["base"], results["serving"]
    num_users = len(users)
    largest = str(max(int(b) for record in users.values() for b in record["budgets"]))
    rows = []

    time_ratios = {
        (user, budget): entry["methods"]["latent_dpo"]["train_seconds"] / entry["methods"]["lora_dpo"]["train_seconds"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst_key = max(time_ratios, key=time_ratios.get)
    rows.append(
        {
            "id": "time",
            "target": "per-user training time, Latent DPO / LoRA-DPO <= 0.01, every user and budget",
            "measured": f"worst {time_ratios[worst_key]:.4f} ({worst_key[0]}, {worst_key[1]} pairs)",
            "met": max(time_ratios.values()) <= 0.01,
        }
    )
    for other, label, count, with_se in (("lora_dpo", "LoRA-DPO's - 1 SE", 5, True), ("caa", "CAA's", 4, False)):
        parts, hits = [], 0
        for user, record in users.items():
            methods = record["budgets"][largest]["methods"]
            diff, se = _reward_vs(methods["latent_dpo"]["reward"], methods[other]["reward"])
            ok = diff >= (-se if with_se else 0.0)
            hits += ok
            parts.append(f"{user} {diff:+.3f} +- {se:.3f}{'' if ok else ' (no)'}")
        needed = _users_needed(count, 6, num_users)
        rows.append(
            {
                "id": f"gain_vs_{other}",
                "target": f"Latent DPO gain >= {label}, >= {count} of 6 users, at the largest budget ({largest} pairs)",
                "measured": f"{hits} of {num_users} (needed {needed}): " + "; ".join(parts),
                "met": hits >= needed,
                "users_met": hits,
                "users_needed": needed,
            }
        )
    ppl = {
        (user, budget): entry["methods"]["latent_dpo"]["perplexity"] / neutral["perplexity"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst_key = max(ppl, key=ppl.get)
    rows.append(
        {
            "id": "perplexity",
            "target": "Latent DPO perplexity (under the base) within +15% of the base's, every user and budget",
            "measured": f"worst {100 * (ppl[worst_key] - 1):+.1f}% ({worst_key[0]}, {worst_key[1]} pairs)",
            "met": max(ppl.values()) <= 1.15,
        }
    )
    sizes = {
        (user, budget): entry["methods"]["latent_dpo"]["artefact_bytes"]
        / entry["methods"]["lora_dpo"]["artefact_bytes"]
        for user, record in users.items()
        for budget, entry in record["budgets"].items()
    }
    worst = max(sizes.values())
    rows.append(
        {
            "id": "artefact",
            "target": "per-user artefact <= 1/100 of the LoRA adapter (whole saved folders)",
            "measured": f"largest 1/{1 / worst:.0f}",
            "met": worst <= 1 / 100,
        }
    )
    ours, base = serving["ours_mixed_batch"]["tokens_per_second"], serving["base_batch"]["tokens_per_second"]
    lora = serving["lora_mixed_batch"]["tokens_per_second"]
    rows_served = serving.get("rows")
    rows.append(
        {
            "id": "throughput_vs_base",
            "target": f"mixed-user batch throughput ({rows_served} users) >= 0.9x the base alone",
            "measured": f"{ours:.1f} vs {base:.1f} tokens/s ({ours / base:.2f}x)",
            "met": ours >= 0.9 * base,
        }
    )
    rows.append(
        {
            "id": "throughput_vs_lora",
            "target": f"mixed-user batch throughput ({rows_served} users) >= PEFT mixed-adapter LoRA",
            "measured": f"{ours:.1f} vs {lora:.1f} tokens/s ({ours / lora:.2f}x)",
            "met": ours >= lora,
        }
    )
    return rows
