"""RLlib controllers: PPO training against memtrain's env wrappers, policies loaded without the Algorithm, evaluation."""
