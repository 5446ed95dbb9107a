"""The Hub: pushing and pulling backbones and preference embeddings, with generated model cards."""

from .model_card import backbone_card, preference_card
from .transfer import pull_folder, push_folder


__all__ = ["backbone_card", "preference_card", "pull_folder", "push_folder"]
