"""Every use memtrain makes of Ray's private modules, in one place.

Private modules change without notice between Ray releases; each function here names what it reaches and what
breaks if it moves. Checked against Ray 2.60.0 (the version pyproject pins): a Ray upgrade re-checks this file.
"""

from __future__ import annotations

import logging


def quiet_train_report_logs() -> None:
    """Silence Ray Train's INFO line per ``ray.train.report``.

    Ray Train logs it under a logger named by the file path of ``ray.train.v2._internal.execution.context``,
    which ``ray.train.LoggingConfig`` does not reach. If the module moves, the lines come back (nothing breaks).
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def autoscaler_prepare_and_validate(raw: dict) -> dict:
    """A cluster YAML as ``ray up`` sees it: provider defaults merged in, then checked against Ray's schema.

    ``ray.autoscaler._private.util.prepare_config`` and ``validate_config`` are what ``ray up`` itself runs; there is
    no public API for it. Raises ``jsonschema.ValidationError`` for a schema violation, and Ray's own exceptions for
    the rest (e.g. node types on an on-prem cluster).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config logs "setting max workers for head node type to 0" for every file: not news
    logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)
    full = prepare_config(raw)
    validate_config(full)
    return full
