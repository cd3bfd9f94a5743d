"""THL benchmarks (one command, ~3-5 minutes on 2 CPU cores); prints a markdown report.

    python bench/bench_thl.py            # everything
    python bench/bench_thl.py --only train,jscale

Sections:
- train: tokens/s of a full training step (forward, backward, AdamW) at the source's "small" shape (thl-small:
  d=256, J=256, 4 heads x 64, kappa=4, V=512), batch 8, sequence 128, fresh state per step (the source harness).
  Acceptance (issue 8): >= 5,400 tokens/s on a quiet machine. Steps interleaved, at 1 and 2 threads: ``cpp``
  (the window loops in C++, models/thl/recurrence.cpp), ``python`` (the same code and weights with
  MEMTRAIN_THL_RECURRENCE=python: the PyTorch loops), ``old`` (the same weights in the THL code of git revision
  ``--baseline``, default 67071cb, before the window autograd node) and ``source`` (the source's model and
  harness step, re-implemented in bench/source_ref/thl.py: its "x the source" figures are ratios within this
  run); also CPU seconds per step and aten operator calls per step (torch.profiler), which the machine's load
  does not change.
- grads: the window node's hand-written gradients vs the autograd implementation of ``--baseline`` (float64, same
  weights, 40 tokens over 3 windows, with and without the straight-through option): max relative difference.
- gen: greedy generation tokens/s at B=1 (thl-small), through the shared generate().
- jscale: per-token generation time at J=128 vs J=1024 (thl-small otherwise), interleaved repeats, medians.
  Acceptance: ratio <= 2.
- rss: peak resident memory while streaming 1K, 8K and 64K tokens, each length in its own subprocess so the peaks
  are separate. To keep the run short this uses thl-tiny with a 512 vocabulary (the state is the same kind:
  J slots + tiers + local cache). Acceptance: < 5% growth from 1K to 64K.
- layered: LayeredEngine tokens/s with weights streamed from disk under a budget below the model size, vs the
  same engine with a budget that holds everything (weights in memory), vs the plain model.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import functools
import importlib
import json
import os
import resource
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from source_ref import thl as source

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.common.sampling import SamplingConfig, generate, sample_next  # noqa: E402
from models.io import save_model  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.thl.layered import UNITS, LayeredEngine  # noqa: E402
from models.thl.recurrence import RECURRENCE_ENV  # noqa: E402
from orchestration.allocator import keep_freed_memory  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def baseline_thl_model(rev: str):
    """THLModel class of models/thl at git revision ``rev``, imported as a separate package next to the current one."""
    package = f"thl_baseline_{rev}"
    # a folder of this process's own (removed at exit): nobody else can put modules where we import from
    root = tempfile.mkdtemp(prefix="thl-baseline-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = os.path.join(root, package)
    os.makedirs(target)
    for name in ("__init__", "config", "memory", "model", "recurrence"):
        shown = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:models/thl/{name}.py"], capture_output=True,
                               text=True)
        if shown.returncode and name == "recurrence":  # revisions before the window node have no recurrence.py
            continue
        if shown.returncode:
            raise RuntimeError(f"git show {rev}:models/thl/{name}.py failed: {shown.stderr.strip()}")
        with open(os.path.join(target, f"{name}.py"), "w") as f:
            f.write(shown.stdout.replace("models.thl.", f"{package}."))
    sys.path.insert(0, os.path.dirname(target))
    return importlib.import_module(f"{package}.model").THLModel


def train_step(model, opt, x_BT1, recurrence: str = "auto") -> float:
    os.environ[RECURRENCE_ENV] = recurrence  # read per window by models/thl/recurrence.py
    out = model(x_BT1[:, :-1], x_BT1[:, 1:])
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out.loss.item()


def aten_calls_per_step(step) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def bench_train(steps: int = 7, baseline: str = "67071cb") -> dict:
    torch.manual_seed(0)
    cpp = build_model("thl-small").train()
    models = {"cpp": cpp, "python": copy.deepcopy(cpp)}
    if baseline:
        models["old"] = baseline_thl_model(baseline)(cpp.cfg).train()
        models["old"].load_state_dict(cpp.state_dict())  # same parameter names: same weights
    recurrence = {"cpp": "cpp", "python": "python", "old": "auto"}  # cpp: fail rather than fall back
    previous = os.environ.get(RECURRENCE_ENV)
    x = torch.randint(0, cpp.cfg.vocab_size, (8, 129))
    step_fns = {name: functools.partial(train_step, m, torch.optim.AdamW(m.parameters(), lr=1e-3), x, recurrence[name])
                for name, m in models.items()}
    models["source"], step_fns["source"] = source.trainer(x)
    result = dict(params={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
                  load_before=os.getloadavg()[0])
    for name, step in step_fns.items():
        step()  # warm-up: allocators, caches, the C++ build
        result[f"{name}_aten_calls_per_step"] = aten_calls_per_step(step)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        wall = {name: [] for name in step_fns}
        cpu = {name: [] for name in step_fns}
        for _ in range(steps):  # interleaved, so load changes hit all alike
            for name, step in step_fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        for name in step_fns:
            # on a shared machine the median carries other jobs' load; the best step is the nearest to quiet
            result[f"{name}_{threads}t"] = dict(
                best_step_s=round(min(wall[name]), 4), median_step_s=round(statistics.median(wall[name]), 4),
                tokens_per_s_best=round(8 * 128 / min(wall[name]), 1),
                tokens_per_s_median=round(8 * 128 / statistics.median(wall[name]), 1),
                cpu_s_per_step_median=round(statistics.median(cpu[name]), 4), steps=[round(t, 3) for t in wall[name]])
    torch.set_num_threads(2)
    result["load_after"] = os.getloadavg()[0]
    for name in step_fns:
        result[f"{name}_tokens_per_s_best"] = max(result[f"{name}_{t}t"]["tokens_per_s_best"] for t in (1, 2))
    if previous is None:
        os.environ.pop(RECURRENCE_ENV)
    else:
        os.environ[RECURRENCE_ENV] = previous
    return result


def bench_grads(baseline: str = "67071cb") -> dict:
    import torch.nn.functional as F
    old_class = baseline_thl_model(baseline)
    old_config = importlib.import_module(old_class.__module__.rsplit(".", 1)[0] + ".config").THLConfig
    small = dict(vocab_size=64, d_embed=32, tier_dims=(32, 32, 32), tier_timescales=(1, 4, 16), local_window=8,
                 local_heads=2, memory_slots=16, memory_dim=32, read_heads=2, head_dim=16, value_dim=32, read_topk=3,
                 bptt_window=16)
    result = {}
    for straight_through in (False, True):
        torch.manual_seed(0)
        new = build_model("thl-tiny", **small, straight_through=straight_through).double().eval()
        old = old_class(old_config(**small, straight_through=straight_through)).double().eval()
        old.load_state_dict(new.state_dict())
        ids = torch.randint(0, 64, (2, 40))
        for model in (new, old):
            out = model(ids, ids)
            (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()
        result[f"straight_through={straight_through}"] = max(
            ((pn.grad - po.grad).abs().max() / po.grad.abs().max().clamp_min(1e-30)).item()
            for pn, po in zip(new.parameters(), old.parameters()))
    return result


@torch.inference_mode()
def per_token_seconds(model, n_tokens: int) -> float:
    """Seconds per generated token (B=1, greedy), streaming through step()."""
    state = model.new_state(1)
    logits = model.step(torch.tensor([[1, 2, 3, 4]]), state)
    greedy = SamplingConfig(temperature=0)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = model.step(sample_next(logits[:, -1], greedy)[:, None], state)
    return (time.perf_counter() - t0) / n_tokens


def bench_gen() -> dict:
    torch.manual_seed(0)
    model = build_model("thl-small").eval()
    per_token_seconds(model, 32)
    t0 = time.perf_counter()
    generate(model, torch.tensor([[1, 2, 3, 4]]), SamplingConfig(max_new_tokens=512, temperature=0))
    return dict(tokens_per_s=512 / (time.perf_counter() - t0))


def bench_jscale(repeats: int = 5, n_tokens: int = 200) -> dict:
    torch.manual_seed(0)
    models = {J: build_model("thl-small", memory_slots=J).eval() for J in (128, 1024)}
    for m in models.values():
        per_token_seconds(m, 32)
    samples = {J: [] for J in models}
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        for J, m in models.items():
            samples[J].append(per_token_seconds(m, n_tokens))
    med = {J: statistics.median(v) for J, v in samples.items()}
    return dict(ms_per_token_J128=med[128] * 1e3, ms_per_token_J1024=med[1024] * 1e3, ratio=med[1024] / med[128],
                state_bytes={J: m.new_state(1).nbytes() for J, m in models.items()})


def current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def rss_child(n_tokens: int) -> None:
    """Subprocess body: stream n_tokens through step(); print resident memory (KiB) before and after as JSON.

    ru_maxrss is the process-lifetime peak, which model building and imports can set before streaming starts, so
    the current RSS at the start and end of the stream is reported too.
    """
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build_model("thl-tiny", vocab_size=512).eval()
    per_token_seconds(model, 64)  # warm up: allocator pools, kernels
    before, rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, current_rss_kib()
    t0 = time.perf_counter()
    per_token_seconds(model, n_tokens)
    print(json.dumps(dict(n=n_tokens, peak_kib_before=before, rss_kib_before=rss_before,
                          seconds=time.perf_counter() - t0, rss_kib_after=current_rss_kib(),
                          peak_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          state_bytes=model.new_state(1).nbytes())))


def bench_rss() -> dict:
    rows = {}
    for n in (1024, 8192, 65536):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", str(n)], check=True,
                             capture_output=True, text=True).stdout
        rows[n] = json.loads(out.strip().splitlines()[-1])
    rows["growth_1k_to_64k"] = rows[65536]["peak_kib"] / rows[1024]["peak_kib"] - 1
    rows["rss_growth_within_64k_stream"] = rows[65536]["rss_kib_after"] / rows[65536]["rss_kib_before"] - 1
    return rows


def bench_layered(n_tokens: int = 48) -> dict:
    torch.manual_seed(0)
    model = build_model("thl-small", vocab_size=8192).eval()  # a real-size vocabulary makes the head the big unit
    with tempfile.TemporaryDirectory() as d:
        save_model(model, "thl-small", d)
        probe = LayeredEngine(d, budget_bytes=10**12)  # to read the unit sizes
        sizes, total = probe.unit_bytes, probe.total_bytes
        streaming = LayeredEngine(d, budget_bytes=max(sizes) + min(sizes))
        resident = LayeredEngine(d, budget_bytes=total)
        result = {}
        for name, engine in (("plain", model), ("in_memory", resident), ("disk", streaming)):
            per_token_seconds(engine, 4)
            result[name] = 1.0 / per_token_seconds(engine, n_tokens)
        result.update(total_weight_bytes=total, unit_bytes=dict(zip(UNITS, sizes)),
                      disk_budget=streaming.budget_bytes, disk_peak=streaming.peak_resident_bytes,
                      disk_loads=streaming.loads)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="train,grads,gen,jscale,rss,layered")
    parser.add_argument("--baseline", default="67071cb",
                        help="git revision whose models/thl the train and grads sections compare against")
    parser.add_argument("--steps", type=int, default=7, help="timed training steps per variant and thread count")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory()  # as every training process of memtrain does (orchestration/allocator.py)
    if args.rss_child:
        return rss_child(args.rss_child)
    torch.set_num_threads(2)
    print(f"# THL benchmark  (torch {torch.__version__}, threads 2, load average {os.getloadavg()[0]:.1f})\n")
    for section in args.only.split(","):
        t0 = time.perf_counter()
        result = dict(train=lambda: bench_train(args.steps, args.baseline), grads=lambda: bench_grads(args.baseline),
                      gen=bench_gen, jscale=bench_jscale, rss=bench_rss, layered=bench_layered)[section]()
        print(f"## {section}  ({time.perf_counter() - t0:.0f} s, load average {os.getloadavg()[0]:.1f})")
        print("```\n" + json.dumps(result, indent=1, default=str) + "\n```")
        if section == "train":
            best = result["cpp_tokens_per_s_best"]
            print(f"training tokens/s, best step: C++ loops {best:.0f} (acceptance >= 5,400 on a quiet machine), "
                  f"PyTorch loops {result['python_tokens_per_s_best']:.0f}, the source's step "
                  f"{result['source_tokens_per_s_best']:.0f}")
            for threads in (2, 1):
                ours, theirs = result[f"cpp_{threads}t"], result[f"source_{threads}t"]
                print(f"{threads} thread(s), same run: C++ loops / the source's step = "
                      f"{theirs['median_step_s'] / ours['median_step_s']:.1f}x by median step, "
                      f"{theirs['best_step_s'] / ours['best_step_s']:.1f}x by best step")
        elif section == "jscale":
            print(f"per-token time J=1024 / J=128 = {result['ratio']:.2f} (acceptance <= 2)")
        elif section == "rss":
            print(f"peak RSS growth 1K -> 64K tokens = {100 * result['growth_1k_to_64k']:.2f}% (acceptance < 5%)")
        print(flush=True)


if __name__ == "__main__":
    main()
