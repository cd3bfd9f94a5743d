"""TG-SMN family: the dense Transformer LM (baseline) and the hierarchical sparse-expert memory LM."""
