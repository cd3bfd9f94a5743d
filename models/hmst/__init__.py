"""HMST: a sparse MoE LM with an early-exit head, an episodic SSM memory, a critic and a meta-controller."""
