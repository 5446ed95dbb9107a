"""Trainers: CLaP (stage 1, the backbone, once per base model) and Latent DPO (stage 2, per user or many at once)."""

from .clap_config import CLaPConfig
from .clap_trainer import CLaPTrainer, estimate_latent_metric
from .latent_dpo_config import LatentDPOConfig
from .latent_dpo_trainer import LatentDPOTrainer
from .many_users import MultiUserLatentDPOTrainer, StackedPreferenceEmbedding, align_users, update_user


__all__ = [
    "CLaPConfig",
    "CLaPTrainer",
    "LatentDPOConfig",
    "LatentDPOTrainer",
    "MultiUserLatentDPOTrainer",
    "StackedPreferenceEmbedding",
    "align_users",
    "estimate_latent_metric",
    "update_user",
]
