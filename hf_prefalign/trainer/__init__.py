"""Trainers: CLaP (stage 1, the backbone) and, later, Latent DPO (stage 2, one user)."""

from .clap_config import CLaPConfig
from .clap_trainer import CLaPTrainer


__all__ = ["CLaPConfig", "CLaPTrainer"]
