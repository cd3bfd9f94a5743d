"""THL: hierarchical recurrent LM with a fixed-slot memory, constant-memory streaming and layered inference."""

from models.thl.config import PRESETS, THLConfig
from models.thl.memory import THLState
from models.thl.model import THLForSequenceClassification, THLModel

__all__ = ["PRESETS", "THLConfig", "THLState", "THLModel", "THLForSequenceClassification"]
