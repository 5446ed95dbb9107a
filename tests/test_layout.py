"""The package layout has no import knots: the preference side loads without the model package, each subpackage
imports on its own, and the public API is what it was before the re-layout."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_prefalign


PACKAGE_DIR = Path(hf_prefalign.__file__).parent
MODEL_MODULE = "hf_prefalign.models.prefalign.modeling_prefalign"


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_preference_package_does_not_import_the_model_package():
    # `import hf_prefalign` registers the model with transformers, so it loads everything by design. The parent
    # package is stubbed here (its folder without its `__init__`) to see what `hf_prefalign.preference` itself loads.
    _run(
        f"""
        import sys, types
        parent = types.ModuleType("hf_prefalign")
        parent.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["hf_prefalign"] = parent
        import hf_prefalign.preference
        import hf_prefalign.preference.personalisation
        loaded = sorted(name for name in sys.modules if name.startswith("hf_prefalign.models"))
        assert {MODEL_MODULE!r} not in sys.modules, loaded
        assert not loaded, loaded
        """
    )


def test_data_package_does_not_import_the_model_package():
    _run(
        f"""
        import sys, types
        parent = types.ModuleType("hf_prefalign")
        parent.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["hf_prefalign"] = parent
        import hf_prefalign.data, hf_prefalign.data.latent_cache
        assert {MODEL_MODULE!r} not in sys.modules
        """
    )


@pytest.mark.parametrize(
    "module",
    ["hf_prefalign.preference", "hf_prefalign.data", "hf_prefalign.trainer", "hf_prefalign.models"],
)
def test_each_subpackage_imports_alone(module: str):
    _run(f"import {module}")


def test_public_api_and_auto_registration():
    expected = {
        "CLaPConfig", "CLaPTrainer", "DataCollatorForResponseGroups", "DiagonalGaussian", "LATENT_MODULES_PATTERN",
        "LatentCache", "LatentDPOConfig", "LatentDPOTrainer", "LatentAdapter", "LatentEncoder",
        "MultiUserLatentDPOTrainer", "PrefAlignConfig", "PrefAlignForCausalLM", "PrefAlignPreTrainedModel",
        "PreferenceBank", "PreferenceEmbedding", "PreferenceEmbeddingConfig", "ResponsePoolConfig",
        "StackedPreferenceEmbedding", "__version__", "align_users", "as_response_pool", "build_response_pool",
        "default_cache_dir", "load_base_model", "load_default_backbone", "load_bundled_prompts", "load_default_base",
        "load_response_pool", "save_response_pool", "update_user",
    }  # fmt: skip
    assert set(hf_prefalign.__all__) == expected
    for name in expected:
        assert getattr(hf_prefalign, name) is not None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    assert type(AutoConfig.for_model("prefalign")) is hf_prefalign.PrefAlignConfig
    assert MODEL_FOR_CAUSAL_LM_MAPPING[hf_prefalign.PrefAlignConfig] is hf_prefalign.PrefAlignForCausalLM


def test_version_has_one_home():
    from hf_prefalign.version import __version__

    assert hf_prefalign.__version__ == __version__
    assert "noqa: E402" not in (PACKAGE_DIR / "__init__.py").read_text()
