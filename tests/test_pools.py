"""Response pools: sampling from a model (seeded, plain or chat prompts), reading TRL preference datasets, saving."""

from __future__ import annotations

import pytest
from datasets import Dataset
from helpers import LATENT_DIM, make_tiny_pool

from hf_prefalign import PrefAlignForCausalLM
from hf_prefalign.data import (
    ResponsePoolConfig,
    as_response_pool,
    build_response_pool,
    load_response_pool,
    save_response_pool,
)
from hf_prefalign.testing import make_tiny_base, make_tiny_tokenizer


# Short responses keep sampling fast; batch_size=2 over 3 prompts also covers a last, smaller batch.
SAMPLING = {"num_responses": 3, "max_new_tokens": 5, "batch_size": 2}


def _plain_prompts() -> Dataset:
    return Dataset.from_dict({"prompt": ["w5 w6 w7", "w8 w9", "w10 w11 w12 w13"], "topic": ["a", "b", "c"]})


def _chat_prompts() -> Dataset:
    messages = [[{"role": "user", "content": text}] for text in ("w5 w6", "w7", "w8 w9 w10")]
    return Dataset.from_dict({"prompt": messages, "topic": ["a", "b", "c"]})


@pytest.fixture(scope="module")
def llama():
    return make_tiny_base("llama")


@pytest.mark.parametrize("prompts_fn", [_plain_prompts, _chat_prompts], ids=["plain", "chat"])
def test_pool_has_one_row_per_prompt_with_k_responses(llama, prompts_fn):
    prompts = prompts_fn()
    pool = build_response_pool(llama, make_tiny_tokenizer(), prompts, seed=0, **SAMPLING)
    assert len(pool) == len(prompts)
    assert set(pool.column_names) == {"prompt", "topic", "responses", "instructions"}
    assert pool["prompt"] == prompts["prompt"], "prompts must stay in order and unchanged"
    assert pool["topic"] == prompts["topic"], "other columns must be kept"
    for responses in pool["responses"]:
        assert len(responses) == SAMPLING["num_responses"]
        assert all(isinstance(text, str) for text in responses)
    assert any(text for responses in pool["responses"] for text in responses), "every response is empty"


def test_pool_accepts_a_list_of_prompts_and_a_config(llama):
    config = ResponsePoolConfig(num_responses=2, max_new_tokens=4, batch_size=4, seed=3)
    pool = build_response_pool(llama, make_tiny_tokenizer(), ["w5 w6", "w7"], config)
    assert pool["prompt"] == ["w5 w6", "w7"]
    assert [len(r) for r in pool["responses"]] == [2, 2]
    # Keyword overrides replace single fields of the config.
    bigger = build_response_pool(llama, make_tiny_tokenizer(), ["w5 w6", "w7"], config, num_responses=3)
    assert [len(r) for r in bigger["responses"]] == [3, 3]


def test_pool_reads_another_prompt_column(llama):
    prompts = Dataset.from_dict({"question": ["w5 w6", "w7 w8"]})
    pool = build_response_pool(llama, make_tiny_tokenizer(), prompts, prompt_column="question", **SAMPLING)
    assert "prompt" in pool.column_names and "question" not in pool.column_names
    assert pool["prompt"] == ["w5 w6", "w7 w8"]


def test_pool_sampling_is_seeded(llama):
    tokenizer = make_tiny_tokenizer()
    first = build_response_pool(llama, tokenizer, _plain_prompts(), seed=0, **SAMPLING)
    again = build_response_pool(llama, tokenizer, _plain_prompts(), seed=0, **SAMPLING)
    other = build_response_pool(llama, tokenizer, _plain_prompts(), seed=1, **SAMPLING)
    assert first.to_list() == again.to_list()
    assert first["responses"] != other["responses"]


def test_backbone_pool_is_sampled_from_its_base_without_latent():
    tokenizer = make_tiny_tokenizer()
    base_pool = build_response_pool(make_tiny_base("llama"), tokenizer, _plain_prompts(), seed=0, **SAMPLING)
    model = PrefAlignForCausalLM.from_base(make_tiny_base("llama"), latent_dim=LATENT_DIM).train()
    model_pool = build_response_pool(model, tokenizer, _plain_prompts(), seed=0, **SAMPLING)
    assert model_pool["responses"] == base_pool["responses"]
    assert model.training, "the model's training mode must be restored"


def test_save_and_load_round_trip(tmp_path):
    for chat in (False, True):
        pool = make_tiny_pool(num_prompts=4, num_responses=3, seed=2, chat=chat)
        path = tmp_path / f"pool-{chat}"
        save_response_pool(pool, path)
        loaded = load_response_pool(path)
        assert loaded.to_list() == pool.to_list()


def test_save_replaces_an_existing_pool(tmp_path):
    path = tmp_path / "pool"
    save_response_pool(make_tiny_pool(num_prompts=5, seed=0), path)
    newer = make_tiny_pool(num_prompts=2, seed=1)
    save_response_pool(newer, path)
    assert load_response_pool(path).to_list() == newer.to_list()
    assert [p.name for p in tmp_path.iterdir()] == ["pool"], "no temporary folder may be left behind"


def test_loading_a_missing_pool_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_response_pool(tmp_path / "nowhere")


def test_trl_standard_preference_dataset_becomes_a_pool():
    dataset = Dataset.from_list(
        [
            {"prompt": "w5 w6", "chosen": "w10 w11", "rejected": "w12"},
            {"prompt": "w5 w6", "chosen": "w13", "rejected": "w10 w11"},  # same prompt, one known response
            {"prompt": "w7", "chosen": "w14", "rejected": "w15"},
        ]
    )
    pool = as_response_pool(dataset)
    assert pool.to_list() == [
        {"prompt": "w5 w6", "responses": ["w10 w11", "w12", "w13"]},
        {"prompt": "w7", "responses": ["w14", "w15"]},
    ]


def test_trl_conversational_preference_dataset_becomes_a_pool():
    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    dataset = Dataset.from_list(
        [
            {"prompt": user("w5 w6"), "chosen": assistant("w10"), "rejected": assistant("w11 w12")},
            {"prompt": user("w5 w6"), "chosen": assistant("w13"), "rejected": assistant("w10")},
            {"prompt": user("w7"), "chosen": assistant("w14"), "rejected": assistant("w15")},
        ]
    )
    pool = as_response_pool(dataset)
    assert pool["prompt"] == [user("w5 w6"), user("w7")], "conversational prompts are kept as messages"
    assert pool["responses"] == [["w10", "w11 w12", "w13"], ["w14", "w15"]]


def test_multi_response_dataset_is_kept_and_its_responses_made_text():
    dataset = Dataset.from_dict(
        {
            "prompt": ["w5", "w6"],
            "responses": [
                [[{"role": "assistant", "content": "w10"}], [{"role": "assistant", "content": "w11"}]],
                [[{"role": "assistant", "content": "w12"}], [{"role": "assistant", "content": "w13"}]],
            ],
            "score": [1, 2],
        }
    )
    pool = as_response_pool(dataset)
    assert pool["responses"] == [["w10", "w11"], ["w12", "w13"]]
    assert pool["score"] == [1, 2]


def test_empty_dataset_is_rejected(llama):
    with pytest.raises(ValueError, match="empty"):
        as_response_pool(Dataset.from_dict({"prompt": [], "responses": []}))
    with pytest.raises(ValueError, match="empty"):
        build_response_pool(llama, make_tiny_tokenizer(), Dataset.from_dict({"prompt": []}), **SAMPLING)


def test_missing_columns_are_named():
    dataset = Dataset.from_dict({"question": ["w5"], "answers": [["w6", "w7"]]})
    with pytest.raises(ValueError, match="question") as error:
        as_response_pool(dataset)
    assert "answers" in str(error.value)


def test_prompts_dataset_without_the_prompt_column(llama):
    prompts = Dataset.from_dict({"instruction": ["w5 w6"]})
    with pytest.raises(ValueError, match="instruction"):
        build_response_pool(llama, make_tiny_tokenizer(), prompts, **SAMPLING)


def test_tokenizer_without_pad_token_is_rejected(llama):
    tokenizer = make_tiny_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        build_response_pool(llama, tokenizer, ["w5 w6"], **SAMPLING)


@pytest.mark.parametrize("field", ["num_responses", "max_new_tokens", "batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        ResponsePoolConfig(**{field: value})


def test_non_positive_num_responses_override_is_rejected(llama):
    with pytest.raises(ValueError, match="num_responses"):
        build_response_pool(llama, make_tiny_tokenizer(), ["w5"], num_responses=0)
