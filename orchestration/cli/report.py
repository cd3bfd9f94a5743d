"""``memtrain report RUN_DIR``: regenerate plots and markdown tables of a pretraining run or a sweep.

Example::

    memtrain report runs/tgsmn-dense-tiny          # -> runs/tgsmn-dense-tiny/report.md, plots/loss.png
    memtrain report runs/sweeps/pretrain-lr        # -> ranked trials, plots/eval_loss.png (one curve per trial)
"""

from __future__ import annotations


def _cmd_report(args) -> None:
    from orchestration.report import write_report

    for run_dir in args.run_dirs:
        print(f"[memtrain] report: {write_report(run_dir)}", flush=True)


def register(subparsers) -> None:
    """Add ``memtrain report RUN_DIR...`` to the CLI's sub-commands."""
    p = subparsers.add_parser("report", help="regenerate report.md and plots from run or sweep directories",
                              description="Regenerate report.md (markdown tables) and plots/ of a pretraining run or a "
                                          "sweep from its metrics, e.g. memtrain report runs/tgsmn-dense-tiny "
                                          "(a sweep's report ranks its trials and plots one curve per trial).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="the --output of `memtrain pretrain` or `memtrain sweep`")
    p.set_defaults(func=_cmd_report)
