"""The source codebases' training steps, re-implemented so that benchmarks can time them in the same run as ours.

Benchmark code only: nothing outside ``bench/`` imports this package, and it is not a model of this project.
Each module rebuilds one source's model and training step from its spec (``../shared/specs/<family>.md``,
checked against the source files the spec names) at the shape the spec measured it, with the source's
algorithm and its slow paths kept on purpose: they are what our code is compared with. A "Nx the source"
figure is then the ratio of two steps timed side by side in one process, never a number copied from the spec.

- ``tgsmn``: the sparse and dense TG-SMN language models and their AdamW step (spec tgsmn.md §1, §4);
- ``thl``: the THL model's per-token Python loop and its training step (spec thl.md §2, §4);
- ``hmst``: HMST's MoE base model with its per-expert Python dispatch and the Stage-1 step (spec hmst.md §1.1, §3.1).

Each module exposes ``trainer(...) -> (model, step)``: ``step()`` runs one full training step (forward, loss,
backward, optimizer) as the source's training loop does.
"""
