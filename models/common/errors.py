class ModelError(ValueError):
    """A model was asked for something it cannot do (bad preset, bad shape, bad config value)."""
