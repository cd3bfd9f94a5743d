"""Run storage: every path a run writes or reads, on a local disk, a shared mount or a URI (``s3://``, ``gs://``,
``abfs://``, or any scheme an installed fsspec package knows). It is the only code that touches run paths.

- ``Location``: a file or folder; durable atomic writes, listing, upload and download (``location.py``);
- run files: checkpoints with manifests (listed by step number, pruned), ``metrics.jsonl``, TensorBoard events,
  local copies and staging folders (``runfiles.py``);
- data bundles: token shards and task streams published once to shared storage and cached once per node
  (``bundles.py``);
- ``require_shared``: a node-local path on a multi-node cluster is refused before any work starts (``cluster.py``).

Example::

    >>> import tempfile
    >>> from orchestration.storage import Location, MetricsLog
    >>> tmp = tempfile.TemporaryDirectory()
    >>> run = Location(f"{tmp.name}/runs/a")       # or "s3://my-bucket/runs/a", or "/mnt/shared/runs/a": same calls
    >>> (run / "config.yaml").write_text("lr: 0.001\\n")
    >>> (run / "config.yaml").read_yaml()
    {'lr': 0.001}
    >>> MetricsLog(run / "metrics.jsonl").rows()
    []
    >>> tmp.cleanup()
"""

from orchestration.errors import StorageError
from orchestration.storage.bundles import BundleRef, build_bundle, fetch_bundle, publish_bundle
from orchestration.storage.cluster import require_shared
from orchestration.storage.location import Location, is_uri, ray_storage
from orchestration.storage.runfiles import (CHECKPOINTS, MANIFEST, METRICS_FILE, MetricsLog, StoredCheckpoint,
                                            TensorBoardLog, copy_folder, damaged_in_storage, latest_checkpoint,
                                            list_checkpoints, local_copy, newest_intact_checkpoint, prune_checkpoints,
                                            read_manifest, read_metrics, staged, write_manifest)

__all__ = ["BundleRef", "CHECKPOINTS", "Location", "MANIFEST", "METRICS_FILE", "MetricsLog", "StorageError",
           "StoredCheckpoint", "TensorBoardLog", "build_bundle", "copy_folder", "damaged_in_storage", "fetch_bundle",
           "is_uri", "latest_checkpoint", "list_checkpoints", "local_copy", "newest_intact_checkpoint",
           "prune_checkpoints", "publish_bundle", "ray_storage", "read_manifest", "read_metrics", "require_shared",
           "staged", "write_manifest"]
