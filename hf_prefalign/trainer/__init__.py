"""Trainers: CLaP (stage 1, the backbone, once per base model) and Latent DPO (stage 2, once per user)."""

from .clap_config import CLaPConfig
from .clap_trainer import CLaPTrainer
from .latent_dpo_config import LatentDPOConfig
from .latent_dpo_trainer import LatentDPOTrainer


__all__ = ["CLaPConfig", "CLaPTrainer", "LatentDPOConfig", "LatentDPOTrainer"]
