"""``memtrain rl train|tune|eval``: train a controller with PPO, sweep its settings, and compare it with fixed
baselines. Every command checks its env_config against the env's config class before Ray starts."""

from __future__ import annotations

import dataclasses
import importlib

from orchestration.cli.common import add_address_arg
from rl.errors import RLError


def _cmd_train(args) -> int:
    from orchestration.config import load_config
    from rl.train import RLTrainConfig, train_ppo

    flags = {"env": args.env}
    if args.iterations is not None:
        flags["iterations"] = args.iterations
    if args.output is not None:
        flags["output"] = args.output
    if args.env_runners is not None:
        flags["num_env_runners"] = args.env_runners
    if args.trust_checkpoint:
        flags["trust_checkpoint"] = True
    summary = train_ppo(load_config(RLTrainConfig, args.config, args.overrides, **flags))
    first, final = summary["first_return"], summary["final_return"]
    returns = (f"training return (mean over the iteration's episodes) {first:.3f} -> {final:.3f}"
               if first is not None and final is not None else "no episode finished")
    print(f"[memtrain rl] done: {summary['iterations']} iterations, {returns}; policy {summary['policy']}")
    return 0


def baseline_policies(env: str, env_config: dict) -> dict:
    """The fixed policies an env module offers (``baseline_policies(env_config)``), by name."""
    from rl.envs import ENVS

    if env not in ENVS:
        raise RLError(f"no baselines for env {env!r}; memtrain envs: {', '.join(ENVS)}")
    module = importlib.import_module(ENVS[env][0])
    return module.baseline_policies(env_config)


def _cmd_eval(args) -> int:
    if args.seeds < 1 or args.episodes < 1:
        raise RLError(f"--seeds and --episodes must be >= 1 (a mean and its interval need episodes), got "
                      f"{args.seeds} and {args.episodes}")
    from orchestration.config import load_config
    from orchestration.runtime import ensure_ray
    from orchestration.storage import Location
    from rl.evaluate import evaluate, write_report
    from rl.policy import POLICY_SPEC, LearnedPolicy
    from rl.train import RLTrainConfig

    others = [item for item in args.overrides if not item.startswith("env_config.")]
    if others:
        raise RLError(f"rl eval takes env_config.key=value overrides only (the env's settings), got {others}")
    policy_dir = Location(args.policy)
    if (policy_dir / "policy" / POLICY_SPEC).is_file():  # a run folder
        policy_dir = policy_dir / "policy"
    run_config = policy_dir.parent / "config.yaml"
    env_config = (run_config.read_yaml() or {}).get("env_config", {}) if run_config.is_file() else {}
    if env_config.get("entities") == "train":  # a meta policy trained on the train entities meets the held-out ones
        env_config["entities"] = "heldout"
    # the run's env_config with the overrides, checked against the env's config class
    env_config = load_config(RLTrainConfig, overrides=args.overrides, env=args.env, env_config=env_config).env_config
    learned = LearnedPolicy.load(policy_dir)
    if learned.env_name != args.env:
        raise RLError(f"the policy in {policy_dir} was trained on env {learned.env_name!r}, not {args.env!r}")
    policies = {"learned": learned}
    baselines = baseline_policies(args.env, env_config)
    wanted = list(baselines) if args.baselines == "all" else args.baselines.split(",")
    unknown = sorted(set(wanted) - set(baselines))
    if unknown:
        raise RLError(f"unknown baseline(s) {unknown} for {args.env}; available: {', '.join(baselines)}")
    policies.update({name: baselines[name] for name in wanted})
    seeds = list(range(1000, 1000 + args.seeds))  # held out: training uses seeds below 1000
    if args.env == "meta" and env_config.get("memory", "actor") == "actor":
        ensure_ray()  # the env reaches the shared memory actor
    # thermo: every seed is a held-out task stream of its own (task_seed = seed; training streams count from 0)
    seed_config = (lambda seed: {"task_seeds": [seed]}) if args.env == "thermo" else None
    rows = evaluate(args.env, env_config, policies, seeds, args.episodes, seed_config)
    out = write_report(rows, args.output or policy_dir.parent / "eval", f"{args.env} controller: learned vs fixed")
    print((out / "results.md").read_text())
    return 0


def _cmd_tune(args) -> int:
    from orchestration.config import load_config
    from rl.train import RLTrainConfig
    from rl.tune import PPOTuneConfig, tune_ppo

    # the base run: a `memtrain rl train` config file (--base; it takes the place of a base: section in the --config
    # file), under the base.key=value overrides
    base = dataclasses.asdict(load_config(RLTrainConfig, args.base, env=args.env)) if args.base else {"env": args.env}
    flags: dict = {"base": base}
    if args.iterations is not None:
        flags["iterations"] = args.iterations
    if args.output is not None:
        flags["output"] = args.output
    cfg = load_config(PPOTuneConfig, args.config, args.overrides, **flags)
    rows = tune_ppo(cfg)
    best = ", ".join(f"{key} {rows[0][key]}" for key in cfg.search)
    print(f"[memtrain rl] best of {len(rows)} trials: {best}: return {rows[0]['return_mean']}; "
          f"{cfg.output}/results.md, {cfg.output}/best.yaml")
    return 0


def register(subparsers) -> None:
    rl = subparsers.add_parser("rl", help="RLlib PPO controllers: train, evaluate against fixed baselines")
    sub = rl.add_subparsers(dest="rl_command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="train a controller with PPO (resumes from --output)")
    train.add_argument("env", help="meta (HMST meta-controller) or thermo (TG-SMN thermodynamic controller)")
    train.add_argument("--iterations", type=int)
    train.add_argument("--output")
    train.add_argument("--env-runners", dest="env_runners", type=int, help="remote env runners (0 = in the driver)")
    train.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                       help="resume from the --output folder's RLlib checkpoints: they are pickles, which run code "
                            "when loaded; only for run folders you wrote")
    train.add_argument("--config", help="YAML config (see configs/rl/)")
    add_address_arg(train)
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="e.g. ppo.lr=1e-4 env_config.continual.stream.n_tasks=3")
    train.set_defaults(func=_cmd_train)
    tn = sub.add_parser("tune", help="sweep PPO settings with Ray Tune (the search: syntax of memtrain sweep)")
    tn.add_argument("env", help="meta, thermo, or a gymnasium id")
    tn.add_argument("--iterations", type=int, help="PPO iterations per trial")
    tn.add_argument("--output")
    tn.add_argument("--base", help="the run every trial starts from: a `memtrain rl train` config (configs/rl/)")
    tn.add_argument("--config", help="YAML config (fields of rl.tune.PPOTuneConfig: search, num_samples, ...)")
    add_address_arg(tn)
    tn.add_argument("overrides", nargs="*", metavar="key=value",
                    help="e.g. search.ppo.lr.grid=[1e-4,1e-3] search.ppo.entropy_coeff.grid=[0.0,0.01] "
                         "base.env_config.reward=tiur")
    tn.set_defaults(func=_cmd_tune)
    ev = sub.add_parser("eval", help="a learned policy against fixed baselines on held-out seeds (thermo: held-out "
                                     "task streams; meta: held-out entities when trained on entities=train), 95%% "
                                     "intervals over seeds")
    ev.add_argument("env")
    ev.add_argument("--policy", required=True,
                    help="run folder of `memtrain rl train` (or its policy/): a path or a URI (s3://...)")
    ev.add_argument("--baselines", default="all", help="comma-separated baseline names, or all")
    ev.add_argument("--seeds", type=int, default=3)
    ev.add_argument("--episodes", type=int, default=5, help="episodes per seed")
    ev.add_argument("--output", help="where results.md/json and returns.png go (default <run>/eval)")
    add_address_arg(ev)
    ev.add_argument("overrides", nargs="*", metavar="env_config.key=value")
    ev.set_defaults(func=_cmd_eval)
