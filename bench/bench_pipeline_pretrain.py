"""The pipeline's pretraining stage, this checkout against an earlier commit, side by side.

    python bench/bench_pipeline_pretrain.py                  # against 1abd610 (issue 18 as filed), 2 rounds
    python bench/bench_pipeline_pretrain.py --ref HEAD~3 --steps 300 --rounds 3
    python bench/bench_pipeline_pretrain.py --ceiling        # and this checkout without the gradient all-reduce

Runs ``memtrain pipeline``'s pretraining stage as the default profile sets it (hmst-micro, 2 Ray Train workers of
1 CPU, 8 x 128 tokens each, vocabulary 1,024, bf16; the builtin corpus stands in for the fact corpus, which gives
the same shapes) for ``--steps`` steps, alternately from this checkout and from ``git archive <ref>`` in a
temporary folder, each in its own process and Ray instance. Reports the median training tokens/s and MFU the
runs themselves logged after their first log window (each run measures its own matmul peak, which moves by 20%
from run to run on this kind of machine, so tokens/s is the steadier comparison), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

NO_DDP = ("model = ray.train.torch.prepare_model(model)",
          "model = ray.train.torch.prepare_model(model, parallel_strategy=None)")

ROOT = Path(__file__).resolve().parent.parent

# runs in the tree under test (its own orchestration package); prints the logged rows as one JSON line
RUN = """
import json, sys
from orchestration.config import load_config
from orchestration.pipeline import PipelinePretrainConfig
from orchestration.storage import Location, read_metrics
from orchestration.training.pretrain import pretrain
out, steps = sys.argv[1], int(sys.argv[2])
cfg = load_config(PipelinePretrainConfig, overrides=[f"output={out}", f"max_steps={steps}", "log_every=50",
                                                     f"eval_every={steps}", f"checkpoint_every={steps}"])
pretrain(cfg)
rows = [r for r in read_metrics(Location(out)) if "tokens_per_s" in r]
print("ROWS " + json.dumps([[r["step"], r["tokens_per_s"], r["mfu"]] for r in rows]))
print("TOKENS_PER_STEP", cfg.workers * cfg.batch_size * cfg.grad_accum * cfg.data.seq_len)
"""


def run(tree: Path, out: str, steps: int) -> tuple[float, float, float]:
    """Median tokens/s, MFU and ms per step of the stage run from ``tree``, after its first log window."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", RUN, out, str(steps)], cwd=tree, env=env, text=True,
                          capture_output=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROWS ")), None)
    if done.returncode or line is None:
        sys.exit(f"the run in {tree} failed:\n{done.stderr[-3000:]}")
    rows = json.loads(line[5:])[1:]  # the first window holds the warm-up steps
    tokens_per_step = next(int(ln.split()[1]) for ln in done.stdout.splitlines() if ln.startswith("TOKENS_PER_STEP"))
    tokens_per_s = statistics.median(r[1] for r in rows)
    return tokens_per_s, statistics.median(r[2] for r in rows), 1e3 * tokens_per_step / tokens_per_s


def copy_without_ddp(dst: Path) -> Path:
    """This checkout's files (tracked and untracked, not ignored) copied to ``dst``, pretraining without DDP."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    worker = dst / "orchestration" / "training" / "pretrain.py"
    text = worker.read_text()
    if text.count(NO_DDP[0]) != 1:
        sys.exit(f"--ceiling: {worker.relative_to(dst)} no longer has the line `{NO_DDP[0]}`; update NO_DDP")
    worker.write_text(text.replace(*NO_DDP))
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="1abd610", help="git commit to compare against")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ceiling", action="store_true",
                        help="also run this checkout without DDP's gradient all-reduce (an upper bound)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-pretrain-") as tmp:
        ref_tree = Path(tmp, "ref")
        ref_tree.mkdir()
        archive = subprocess.run(["git", "archive", args.ref], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref_tree)], input=archive, check=True)
        print(f"load average at start {os.getloadavg()[0]:.1f}; {args.steps} steps per run\n")
        print("| round | code | tokens/s | ms per step | MFU |")
        print("|---|---|---|---|---|")
        trees = {args.ref: ref_tree, "this checkout": ROOT}
        if args.ceiling:
            trees["this checkout, no all-reduce"] = copy_without_ddp(Path(tmp, "no-allreduce"))
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
        for i in range(args.rounds):
            for name, tree in trees.items():
                out = str(Path(tmp, f"run-{i}-{len(results[name])}-{tree.name}"))
                tokens_per_s, mfu, step_ms = run(tree, out, args.steps)
                results[name].append((tokens_per_s, mfu))
                print(f"| {i + 1} | {name} | {tokens_per_s:,.0f} | {step_ms:.0f} | {100 * mfu:.1f}% |", flush=True)
        ref = results[args.ref]
        print()
        for name, new in results.items():
            if name != args.ref:
                print(f"{name} against {args.ref}: tokens/s ratio (median of rounds) "
                      f"{statistics.median(n[0] / r[0] for n, r in zip(new, ref)):.2f}; "
                      f"MFU ratio {statistics.median(n[1] / r[1] for n, r in zip(new, ref)):.2f}")


if __name__ == "__main__":
    main()
