"""The source codebases' training steps, re-implemented so that benchmarks can time them in the same run as ours.

Benchmark code only: nothing outside ``bench/`` imports this package, and it is not a model of this project.
Each module rebuilds one source's model and training step from the original code (each module names the files and
commit) at the shape the original benchmarks used, with the source's algorithm and its slow paths kept on
purpose: they are what our code is compared with. A "Nx the source" figure is then the ratio of two steps timed
side by side in one process, never a number measured on another day or machine.

- ``tgsmn``: the sparse and dense TG-SMN language models and their AdamW step;
- ``thl``: the THL model's per-token Python loop and its training step;
- ``hmst``: HMST's MoE base model with its per-expert Python dispatch and the Stage-1 step.

Each module exposes ``trainer(...) -> (model, step)``: ``step()`` runs one full training step (forward, loss,
backward, optimizer) as the source's training loop does.
"""
