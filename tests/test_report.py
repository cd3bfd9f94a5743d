"""`memtrain report RUN_DIR`: plots and tables regenerated from the files a pretraining run or a sweep leaves."""

import argparse
import json

import pytest
import yaml

from orchestration.errors import MemtrainError
from orchestration.report import write_report
from orchestration.cli.report import register


def fake_run(run_dir, lr, eval_losses):
    """The files `memtrain pretrain` writes that a report reads: config.yaml and metrics.jsonl."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": "tgsmn-dense-tiny", "workers": 1, "lr": lr,
                                                         "data": {"source": "builtin", "seq_len": 64}}))
    rows = []
    for i, loss in enumerate(eval_losses):
        rows.append({"step": 10 * i, "tokens": 640 * i, "eval_loss": loss, "eval_perplexity": 2.718 ** loss})
        if i:
            rows.append({"step": 10 * i, "tokens": 640 * i, "loss": loss + 0.1, "lr": lr, "tokens_per_s": 1000.0,
                         "mfu": 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pretraining_run_report(tmp_path):
    fake_run(tmp_path / "run", 1e-3, [8.0, 7.0, 6.5])
    report = write_report(tmp_path / "run").read_text()
    assert (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 1000
    figures = report.splitlines()[6]  # first_eval_loss, final_eval_loss, best_eval_loss columns
    assert "| 20 | 1280 | 8 | 6.5 | 6.5 |" in figures
    assert "| 10 | 7 |" in report  # the held-out evaluations table


def test_sweep_report_ranks_trials_from_their_directories(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "trials" / "a_00000", 3e-4, [8.0, 7.5])
    fake_run(sweep / "trials" / "a_00001", 1e-3, [8.0, 6.0, 5.5])
    fake_run(sweep / "trials" / "a_00002", 1e-2, [8.0, 6.8])
    (sweep / "sweep.yaml").write_text(yaml.safe_dump({"kind": "pretrain", "metric": "eval_loss", "mode": "min",
                                                      "search": {"lr": {"grid": [3e-4, 1e-3, 1e-2]},
                                                                 "data.seq_len": {"grid": [64]}}},
                                                     sort_keys=False))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["report", str(sweep)])
    args.func(args)
    assert str(sweep / "report.md") in capsys.readouterr().out
    table = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[1] for row in table] == ["a_00001", "a_00002", "a_00000"]
    assert table[0].startswith("| 1 | a_00001 | 0.001 | 64 | 5.5 |")
    assert (sweep / "plots" / "eval_loss.png").stat().st_size > 1000


def test_report_of_a_directory_without_runs_says_what_to_pass(tmp_path):
    with pytest.raises(MemtrainError, match="neither a pretraining run directory .* pass the --output"):
        write_report(tmp_path)
