"""The preference side: users' priors p_user(z|x) over the backbone's latent space, and banks of them.

- `embedding.py`: `PreferenceEmbedding` (+ its config), one user's prior, saved as a kilobyte-sized folder.
- `bank.py`: `PreferenceBank`, many users by id attached to one backbone (`model.preferences`).
- `bank_shards.py`: the sharded bank layout (users stacked in safetensors shards) and its writer lock.
- `personalisation.py`: users without training (`PreferenceEmbedding.from_examples` / `.mix`).

None of these modules imports `hf_prefalign.models` at import time (the backbone is a type hint here, or is
imported inside the function that needs it): the preference side does not depend on the model package.
"""

from .bank import BANK_INDEX, BankLockedError, PreferenceBank, read_bank_index
from .embedding import PreferenceEmbedding, PreferenceEmbeddingConfig, prior_from_parameters


__all__ = [
    "BANK_INDEX",
    "BankLockedError",
    "PreferenceBank",
    "PreferenceEmbedding",
    "PreferenceEmbeddingConfig",
    "prior_from_parameters",
    "read_bank_index",
]
