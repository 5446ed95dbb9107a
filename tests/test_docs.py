"""The docs: every ```python block of README.md and docs/*.md runs, on a tiny model; links, API and config tables.

How the snippet runner works
----------------------------
- Blocks are the top-level fenced blocks that open with exactly ```` ```python ````. The blocks of one page run in
  order, in one namespace, like cells of a notebook: a page may use what an earlier block of the same page defined.
- The namespace starts with the names the pages take as given (the objects of the README's "Usage" section):
  `base` and `tokenizer` (from `load_default_base()`), `model` (a backbone around `base`, its latent modules
  perturbed as if trained), `pool` (a response pool from the bundled prompts), `pairs` (preference pairs of the
  `positive` user from `pool`) and `inputs` (two prompts tokenized with left padding). docs/index.md says so too.
- The working directory is a fresh tmp folder that holds what pages load by path: `clap/backbone` (`model` saved with
  its tokenizer) and `alice/embedding`, `bob/embedding` (two preference embeddings of that backbone).
- Heavy entry points are replaced by tiny stand-ins (tests/snippet_env.py): `load_default_base()` returns a tiny
  random Llama and a word-level English tokenizer with a chat template, pools are sampled from at most 4 prompts,
  and every `CLaPConfig` / `LatentDPOConfig` is forced to `max_steps=2`, `report_to="none"`, `use_cpu=True`.
- The Hub is the local test double of tests/hub_server.py, with a token in `$HF_TOKEN`: pushes and pulls in the
  snippets really go through `huggingface_hub`, to 127.0.0.1 only.
- A block preceded (on the line before its fence) by `<!-- snippet: skip: <reason> -->` is not run; the reason is
  required. Tracebacks point at the Markdown file and line.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hub_server import hub_server_fixture  # noqa: F401  (provides the `hub_server` fixture)
from snippet_env import patch_tiny_world
from transformers import TrainingArguments
from trl import DPOConfig

import hf_prefalign
from hf_prefalign import (
    CLaPConfig,
    LatentDPOConfig,
    PrefAlignForCausalLM,
    PreferenceEmbedding,
    PreferenceEmbeddingConfig,
    load_bundled_prompts,
)
from hf_prefalign.data.pairs import preference_pairs_from_pool
from hf_prefalign.scorers import get_scorer


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SKIP_MARKER = re.compile(r"^<!--\s*snippet:\s*skip:\s*(?P<reason>\S.*?)\s*-->$")


@dataclass
class Snippet:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    skip_reason: str | None


def python_snippets(path: Path) -> list[Snippet]:
    """The top-level ```python blocks of a Markdown file, with the skip marker of the line before each fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets, index = [], 0
    while index < len(lines):
        if lines[index].strip() == "```python" and not lines[index].startswith((" ", "\t")):
            start = index + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"{path}:{index + 1}: unclosed ```python block")
            previous = lines[index - 1].strip() if index > 0 else ""
            if previous.startswith("<!-- snippet"):
                match = SKIP_MARKER.match(previous)
                assert match, f"{path}:{index}: malformed marker {previous!r}; use <!-- snippet: skip: <reason> -->"
                reason = match["reason"]
            else:
                reason = None
            snippets.append(Snippet(path, start + 1, "\n".join(lines[start:end]), reason))
            index = end
        index += 1
    return snippets


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


PAGES_WITH_SNIPPETS = [page for page in PAGES if python_snippets(page)]


# ----------------------------------------------------------------------
# The snippet runner
# ----------------------------------------------------------------------
def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture
def docs_namespace(tmp_path, monkeypatch, hub_server):  # noqa: F811  (hub_server: the Hub test double)
    """The namespace and working directory every page starts from (see the module docstring)."""
    patch_tiny_world(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    base, tokenizer = hf_prefalign.load_default_base()
    model = PrefAlignForCausalLM.from_base(base, tokenizer=tokenizer)
    _perturb(model, seed=0)
    model.eval()
    pool = hf_prefalign.build_response_pool(base, tokenizer, load_bundled_prompts())
    pairs = preference_pairs_from_pool(pool, get_scorer("positive"))
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Tell me about cats.", "Plan a picnic."], return_tensors="pt", padding=True)

    model.save_pretrained("clap/backbone")
    tokenizer.save_pretrained("clap/backbone")
    for seed, user in enumerate(("alice", "bob"), start=1):
        embedding = PreferenceEmbedding(
            PreferenceEmbeddingConfig(
                latent_dim=model.config.latent_dim,
                feature_dim=model.config.text_config.hidden_size,
                backbone_fingerprint=model.fingerprint(),
                base_model=model.config.base_model_name_or_path,
            )
        )
        _perturb(embedding, seed=seed, scale=0.5)
        embedding.save_pretrained(f"{user}/embedding")
    return {
        "__name__": "__docs__",
        "base": base,
        "tokenizer": tokenizer,
        "model": model,
        "pool": pool,
        "pairs": pairs,
        "inputs": inputs,
    }


@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS, ids=_relative)
def test_python_snippets_run(page, docs_namespace):
    ran = 0
    for snippet in python_snippets(page):
        if snippet.skip_reason is not None:
            continue
        # Leading newlines make tracebacks give the Markdown line numbers.
        code = compile("\n" * (snippet.line - 1) + snippet.code, str(page), "exec")
        exec(code, docs_namespace)
        ran += 1
    assert ran, f"{_relative(page)}: every python block is skipped"


def test_snippet_parser_reads_blocks_and_skip_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\n<!-- snippet: skip: needs a GPU -->\n```python\ny = 2\n```\n"
        "\n```bash\nls\n```\n\n- item\n\n  ```python\n  nested = True\n  ```\n"
    )
    snippets = python_snippets(page)
    assert [(s.line, s.code, s.skip_reason) for s in snippets] == [(4, "x = 1", None), (9, "y = 2", "needs a GPU")]
    page.write_text("<!-- snippet: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(AssertionError, match="malformed marker"):
        python_snippets(page)


def test_skipped_snippets_are_few_and_give_a_reason():
    skipped = [s for page in PAGES for s in python_snippets(page) if s.skip_reason is not None]
    total = sum(len(python_snippets(page)) for page in PAGES)
    assert len(skipped) <= max(1, total // 10), [f"{_relative(s.path)}:{s.line}" for s in skipped]


def test_every_python_snippet_parses():
    for page in PAGES:
        for snippet in python_snippets(page):
            ast.parse(snippet.code, filename=f"{_relative(page)}:{snippet.line}")


# ----------------------------------------------------------------------
# Links and the index
# ----------------------------------------------------------------------
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for match in LINK.finditer(page.read_text(encoding="utf-8")):
            target = match["target"].split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{_relative(page)} -> {match['target']}")
    assert not broken, broken


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = {match["target"].split("#", 1)[0] for match in LINK.finditer(index)}
    missing = [page.name for page in DOCS.glob("*.md") if page.name != "index.md" and page.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/index.md" in readme


# ----------------------------------------------------------------------
# The API reference and the config tables
# ----------------------------------------------------------------------
def test_api_reference_documents_every_public_name():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    missing = [name for name in hf_prefalign.__all__ if f"`{name}" not in api]
    assert not missing, f"docs/api.md does not document {missing}"


def test_api_reference_names_only_real_objects():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    for dotted in sorted(set(re.findall(r"`(hf_prefalign(?:\.\w+)+)", api))):
        parts = dotted.split(".")
        obj = __import__(parts[0])
        for depth, part in enumerate(parts[1:], start=1):
            if not hasattr(obj, part):
                __import__(".".join(parts[: depth + 1]))  # a submodule not imported yet
            obj = getattr(obj, part)


def _field_table(page: Path, heading: str) -> dict[str, str]:
    """`field -> default` from the Markdown table under `heading` (first two columns, backticks removed)."""
    text = page.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def _same_default(documented: str, value: object) -> bool:
    if value is None or isinstance(value, bool):
        return documented == str(value)
    if isinstance(value, str):
        return documented.strip("\"'") == value
    try:
        return float(documented) == float(value)
    except ValueError:
        return False


@pytest.mark.parametrize(
    ("config_class", "parent", "page"),
    [(CLaPConfig, TrainingArguments, "clap.md"), (LatentDPOConfig, DPOConfig, "latent_dpo.md")],
    ids=["CLaPConfig", "LatentDPOConfig"],
)
def test_config_pages_list_every_field_with_its_default(config_class, parent, page):
    path = DOCS / page
    table = _field_table(path, f"## `{config_class.__name__}` fields")
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    parent_fields = {f.name for f in dataclasses.fields(parent)}
    own = [name for name in defaults if name not in parent_fields]
    missing = [name for name in own if name not in table]
    assert not missing, f"docs/{page} lists no row for {missing}"
    wrong = {
        name: (doc, defaults.get(name)) for name, doc in table.items() if not _same_default(doc, defaults.get(name))
    }
    assert not wrong, f"docs/{page}: documented vs actual defaults {wrong}"
    # Parent fields whose default the config re-declares are listed as `name=value` on the page.
    text = path.read_text(encoding="utf-8")
    for name in config_class.__annotations__:
        if name in parent_fields and name not in table:
            match = re.search(rf"`{name}=([^`]+)`", text)
            assert match, f"docs/{page} does not give the re-declared default of {name}"
            assert _same_default(match[1], defaults[name]), f"docs/{page}: {name}={match[1]}, actual {defaults[name]}"
