"""A multi-node Ray cluster on this one machine, for integration tests that need real separate nodes.

``MultiNodeCluster`` starts, as subprocesses of the test process:

* an S3-compatible server (``moto_server``) on loopback, with one bucket: the cluster's object storage;
* a Ray **head node with 0 CPUs** and the ``memory_host`` resource, like the project's cluster YAMLs, with the
  dashboard (State API) on 127.0.0.1;
* **worker nodes** (2 logical CPUs each by default), each ``ray start --block`` inside its own private mount
  namespace (``unshare -m``) in which tmpfs mounts hide the head's node-local folders: the driver's working
  directory :attr:`MultiNodeCluster.head_dir` and the head's cache ``~/.cache/memtrain``. A file the driver writes
  there is missing on a worker node, as on a real cluster; :attr:`MultiNodeCluster.shared_dir` is seen by every
  node (it plays an NFS mount), and so is the repository (the code must stay importable everywhere).

Everything gets free ports and its own Ray ``--temp-dir`` under one base folder, so other Ray clusters on the
machine (and ``/tmp/ray``) are never touched. Nothing is ever stopped by name or with ``ray stop``: every
process is killed by pid, as a process tree collected with psutil (plus, for a worker node, every process in its
mount namespace). The children also get a parent-death signal, so a test process that dies without running
``shutdown()`` (SIGKILL, OOM) still takes its nodes and the S3 server down with it.

Typical use (see ``conftest.py`` for the pytest fixtures)::

    with MultiNodeCluster() as cluster:
        cluster.run("pretrain", "--workers", "2", "--output", cluster.s3_uri("runs/x"))
        proc = cluster.start("pretrain", ...)           # in the background
        cluster.kill_node(cluster.worker_nodes[0])      # a node fails mid-run
        cluster.add_worker_node()                       # and a fresh one joins
        out = cluster.wait(proc, timeout=300)
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

try:
    import psutil
except ImportError:  # Ray ships psutil in ray/thirdparty_files, which importing ray puts on sys.path
    importlib.import_module("ray")
    import psutil

from orchestration.storage.testing import LoopbackS3

log = logging.getLogger(__name__)

BASE_PREFIX = "memtrain-mn-"  # base folders are /tmp/memtrain-mn-*
OWNER_FILE = "owner"  # "<pid> <create time>" of the process that owns a base folder
# The head's default memtrain cache (orchestration/data/sources.py, continual_tasks.py, hmst_cli.py): node-local disk.
HEAD_CACHE_DIR = Path("~/.cache/memtrain").expanduser()
# Ports are picked below the kernel's ephemeral range (32768-60999 here), where outgoing connections and
# bind(port 0) - Ray's own random ports included - never land, and above Ray's default worker ports
# (10002-19999) and fixed defaults (6379, 8265, 10001), which another cluster on the machine may hold.
_PORT_RANGE = (20000, 32767)


class ClusterError(RuntimeError):
    """The test cluster could not be started, or a node did not reach the expected state in time."""


@dataclass
class Node:
    """One Ray node of the test cluster: the ``ray start --block`` process that owns it, and its Ray identity."""

    name: str  # "head", "w1", "w2", ...
    process: subprocess.Popen = field(repr=False)  # `ray start --block` (setpriv, unshare and bash exec into it)
    temp_dir: Path  # its own Ray --temp-dir; also how the harness finds its node id in the GCS
    log_path: Path  # stdout + stderr of `ray start`
    num_cpus: float
    ip: str  # its own loopback address: Ray Train tells nodes apart by IP (local_rank, node_rank)
    node_id: str | None = None  # hex Ray node id, known once the node registered with the GCS
    mount_ns: str | None = None  # "mnt:[4026532...]" of a worker node's private mount namespace

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def is_head(self) -> bool:
        return self.name == "head"


def _check_mount_namespaces() -> None:
    """Fail early and clearly where worker nodes cannot get a private mount namespace (needs root/CAP_SYS_ADMIN)."""
    try:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or b"").decode(errors="replace").strip()
        raise ClusterError(f"cannot create a mount namespace (`unshare --mount`), which the worker nodes need: "
                           f"run as root or with CAP_SYS_ADMIN ({e} {detail})") from e


def remove_stale_base_dirs() -> None:
    """Remove the base folders of clusters whose test process died without shutdown() (SIGKILL, OOM kill).

    Their processes are gone already (parent-death signal, see MultiNodeCluster._popen); only folders with an
    owner file whose process is gone are removed (a kept folder has none).
    """
    for owner in Path("/tmp").glob(f"{BASE_PREFIX}*/{OWNER_FILE}"):
        try:
            pid, created = owner.read_text().split()
            alive = psutil.pid_exists(int(pid)) and abs(psutil.Process(int(pid)).create_time() - float(created)) < 1
        except (OSError, ValueError, psutil.Error):
            continue
        if not alive:
            shutil.rmtree(owner.parent, ignore_errors=True)


def _console_script(name: str) -> str:
    """The entry point ``name`` of this interpreter's environment (so nodes run the same Ray), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"`{name}` is not installed in this environment or on PATH")
    return found


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, collected before anything is killed (a dead parent loses its children)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def processes_in_mount_namespace(mount_ns: str) -> list[psutil.Process]:
    """Every process whose mount namespace is ``mount_ns``: a worker node's processes, whoever their parent is."""
    found = []
    for pid in psutil.pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == mount_ns:
                found.append(psutil.Process(pid))
        except (OSError, psutil.Error):
            continue
    return found


_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> None:
    """Make this process adopt its orphaned descendants, so that the node processes it kills get reaped at once.

    Killing a node's process tree orphans its processes; without this they are re-parented to init and linger
    as zombies (``[raylet] <defunct>``) until init reaps them: seconds on some machines, never in containers whose
    PID 1 does not reap.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed (errno %d): killed processes may linger as zombies",
                    ctypes.get_errno())


def is_gone(p: psutil.Process) -> bool:
    """Exited: no such process, or a zombie."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # psutil.Process checks its pid's start time: a reused pid is not ours
        return True


def kill_processes(processes: Iterable[psutil.Process], owner: subprocess.Popen | None = None,
                   timeout: float = 10.0) -> None:
    """SIGKILL these processes (all at once, so no parent can restart a child) and wait until they are gone.

    ``owner``: the Popen among them, which reaps its own process; the others that this process adopted (see
    become_subreaper) are reaped here.
    """
    procs = list({p.pid: p for p in processes if p.pid != os.getpid()}.values())
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ClusterError):
        wait_for(lambda: all(is_gone(p) for p in procs), timeout, "killed processes to exit", interval=0.05)
    if alive := [p.pid for p in procs if not is_gone(p)]:
        log.warning("still alive %.0f s after SIGKILL: %s", timeout, alive)
    if owner is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            owner.wait(timeout=timeout)
    # A dying process hands its children to us only once all its threads are gone, a little after it shows as a
    # zombie: reap each adopted one, and wait for those whose parent (one of these) is still exiting.
    pids = {p.pid for p in procs}
    pending = [p for p in procs if owner is None or p.pid != owner.pid]
    deadline = time.monotonic() + 5
    while pending and time.monotonic() < deadline:
        still = []
        for p in pending:
            try:
                ppid = p.ppid()
            except psutil.NoSuchProcess:
                continue
            if ppid == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(p.pid, os.WNOHANG) == (0, 0):  # not exited after all (e.g. stuck in the kernel)
                        still.append(p)
            elif ppid in pids:
                still.append(p)
            # else its parent is someone else (init, or a process we did not kill): they reap it
        pending = still
        if pending:
            time.sleep(0.02)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2,
             check: Callable[[], None] | None = None) -> object:
    """Poll ``condition`` until it returns a truthy value (returned), calling ``check`` (may raise) in between."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


class MultiNodeCluster:
    """A Ray head (0 CPUs), worker nodes in private mount namespaces, and an S3 server; see the module docstring.

    Start it with :meth:`up` (or ``with MultiNodeCluster() as cluster``) and stop it with :meth:`shutdown`.
    """

    def __init__(self, *, num_workers: int = 2, cpus_per_worker: float = 2, bucket: str = "memtrain-test",
                 base_dir: str | os.PathLike | None = None, object_store_mb: int = 256,
                 health_check_period_s: float = 1.0, keep_base_dir: bool | None = None):
        """
        Args:
            num_workers: worker nodes started by :meth:`up`.
            cpus_per_worker: logical CPUs of each of them.
            bucket: the S3 bucket created on the moto server.
            base_dir: the folder for everything (default: a new ``/tmp/memtrain-mn-*``, short because Ray's
                Unix sockets live under each node's temp dir and socket paths are limited to 107 bytes).
            object_store_mb: each node's object store (Ray's default, 30% of RAM per node, is far too much for
                three nodes on one machine).
            health_check_period_s: how often the GCS checks each raylet; a killed node is declared dead after 3
                failed checks (Ray's default is 3 s x 5, i.e. ~15 s before anybody notices a lost node).
            keep_base_dir: keep logs and temp dirs after shutdown (default: env MEMTRAIN_MULTINODE_KEEP=1).
        """
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.bucket = bucket
        self.object_store_bytes = object_store_mb * 1024**2
        self.health_check_period_ms = int(health_check_period_s * 1000)
        self.keep_base_dir = (os.environ.get("MEMTRAIN_MULTINODE_KEEP") == "1") if keep_base_dir is None \
            else keep_base_dir
        self._base_arg = base_dir

        self.base: Path | None = None
        self.head: Node | None = None
        self.worker_nodes: list[Node] = []  # the live worker nodes, in start order
        self.s3_env: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.address = ""
        self.dashboard_url = ""
        # seconds from the start of up() until each part was ready ("gcs", "head", "s3", "workers", "up"), and the
        # duration of shutdown()
        self.timings: dict[str, float] = {}

        self._moto: LoopbackS3 | None = None
        self._gcs = None  # ray._raylet.GcsClient
        self._drivers: list[subprocess.Popen] = []  # memtrain processes from run()/start(), killed at shutdown
        self._ports_given: set[int] = set()
        self._node_counter = 0
        self._run_counter = 0
        self._owner_pid = os.getpid()
        self._stopped = False
        self.log = logging.getLogger(__name__)  # a logger of its own (and harness.log) once up() made the base
        self._log_handler: logging.Handler | None = None

    # --- folders ------------------------------------------------------------------------------------------------

    @property
    def head_dir(self) -> Path:
        """The driver's working directory and the head's local disk: hidden from every worker node."""
        return self.base / "head"

    @property
    def shared_dir(self) -> Path:
        """A folder every node sees (plays an NFS mount)."""
        return self.base / "shared"

    @property
    def logs_dir(self) -> Path:
        """Logs of the nodes, the S3 server and every memtrain command the harness ran."""
        return self.base / "logs"

    @property
    def cache_dir(self) -> Path:
        """The head's memtrain cache (``~/.cache/memtrain``); each worker node has an empty one of its own."""
        return HEAD_CACHE_DIR

    @property
    def hidden_dirs(self) -> list[Path]:
        """The head's node-local folders that worker nodes must not see (tmpfs over them in their namespace)."""
        return [self.head_dir, self.cache_dir]

    def s3_uri(self, path: str = "") -> str:
        """``s3://<bucket>/<path>``: storage every node and the driver reach (e.g. Ray Train's storage_path)."""
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    # --- start-up -----------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def up(self) -> Self:
        """Start the S3 server, the head and the worker nodes; return once all of them are alive.

        The S3 server and the head start at the same time, the worker nodes as soon as the head's GCS listens.
        """
        t0 = time.monotonic()
        _check_mount_namespaces()
        remove_stale_base_dirs()
        become_subreaper()
        # /tmp rather than $TMPDIR or pytest's tmp_path: Unix socket paths under the Ray temp dirs must stay short.
        self.base = Path(self._base_arg) if self._base_arg else Path(tempfile.mkdtemp(prefix=BASE_PREFIX,
                                                                                      dir="/tmp"))
        for d in (self.head_dir, self.shared_dir, self.logs_dir, self.base / "ray", self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self._base_arg and not self.keep_base_dir:  # lets a later cluster remove it if we die unexpectedly
            me = psutil.Process()
            (self.base / OWNER_FILE).write_text(f"{me.pid} {me.create_time()}\n")
        atexit.register(self.shutdown)  # also after an exception in a test session; SIGKILL: see _popen
        self.log = logging.getLogger(f"{__name__}.{self.base.name}")
        self.log.setLevel(logging.INFO)
        self._log_handler = logging.FileHandler(self.logs_dir / "harness.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.log.addHandler(self._log_handler)
        try:
            self._start_moto()
            self._start_head()
            self._wait_gcs()
            self.timings["gcs"] = time.monotonic() - t0
            # Worker nodes only need the GCS: they start while the head brings up its raylet and dashboard.
            new = [self._spawn_worker(self.cpus_per_worker) for _ in range(self.num_workers)]
            self._wait_head()
            self.timings["head"] = time.monotonic() - t0
            self._wait_moto()
            self.timings["s3"] = time.monotonic() - t0
            for node in new:
                self._wait_worker(node)
            self.timings["workers"] = time.monotonic() - t0
        except BaseException:
            self.shutdown()
            raise
        self.timings["up"] = time.monotonic() - t0
        self.log.info("cluster up in %.1f s (%s); base %s", self.timings["up"], self.describe_timings(), self.base)
        return self

    def describe_timings(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())

    def free_port(self) -> int:
        """A port free on every interface, in a range no OS-assigned or Ray-default port uses; never twice."""
        for _ in range(1000):
            port = random.randint(*_PORT_RANGE)
            if port in self._ports_given:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("", port))  # all interfaces: the GCS and raylets listen on 0.0.0.0
                except OSError:
                    continue
            self._ports_given.add(port)
            return port
        raise ClusterError(f"no free port in {_PORT_RANGE}")

    def _popen(self, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path,
               new_session: bool = False) -> subprocess.Popen:
        """Start ``cmd`` with its output appended to ``log_path``.

        ``setpriv --pdeathsig TERM`` makes the kernel SIGTERM the child when the test process dies without
        shutdown() (SIGKILL, OOM kill); `ray start --block` then stops its node's processes. The setting survives
        exec (setpriv execs ``cmd`` in the same process), and unlike a preexec_fn it is safe in a process that
        runs threads (a Ray driver does). It fires when the forking *thread* exits: start nodes from the test's
        own thread, not from short-lived helper threads.
        """
        with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *cmd], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=new_session)
        return proc

    def _start_moto(self) -> None:
        self._moto = LoopbackS3(self.bucket, log_dir=self.logs_dir)
        # a parent-death signal, as for the nodes: a test process that dies takes the server with it
        self._moto.launch(prefix=("setpriv", "--pdeathsig", "TERM", "--"))
        self.s3_env = self._moto.env
        self.log.info("moto_server pid %d on %s", self._moto.pid, self._moto.endpoint)

    def _wait_moto(self) -> None:
        self._moto.wait_ready(timeout=30)

    def _base_env(self) -> dict[str, str]:
        """The environment of every node and driver: os.environ without any AWS/Ray address of the user's own."""
        # memtrain itself is importable everywhere through its (editable) install, as on the project's clusters.
        # PYTEST_*: nodes and drivers are not part of a test (libraries, Ray included, change behaviour under it).
        return {k: v for k, v in os.environ.items()
                if not k.startswith(("AWS_", "PYTEST_")) and k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}

    def _node_env(self) -> dict[str, str]:
        """A node's environment: the S3 credentials (as a real node's instance profile), no token auth, and the
        State API address of *this* cluster (Train's placement-group cleaner asks it; with several clusters on
        the machine, its own discovery fails with "Found multiple active Ray instances")."""
        return {**self._base_env(), **self.s3_env, "RAY_AUTH_MODE": "disabled",
                "RAY_API_SERVER_ADDRESS": self.dashboard_url,
                # memory actors keep their stores in a node-local folder (head_dir is hidden on the worker nodes)
                # that is removed with the cluster, not in the host's ~/.cache
                "MEMTRAIN_MEMORY_ROOT": str(self.head_dir / "memory"),
                # SIGTERM to `ray start --block` would otherwise "drain" the node for up to 30 s before stopping
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

    def _common_ray_args(self, node_name: str, ip: str) -> list[str]:
        temp_dir = self.base / "ray" / node_name
        return [
            f"--temp-dir={temp_dir}",
            f"--node-ip-address={ip}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}",
            # Every port a node listens on comes from free_port(): Ray's fixed defaults (52365 for the dashboard
            # agent) would collide between nodes of one machine, and its random ones come from the ephemeral range.
            f"--node-manager-port={self.free_port()}",
            f"--object-manager-port={self.free_port()}",
            f"--dashboard-agent-listen-port={self.free_port()}",
            f"--dashboard-agent-grpc-port={self.free_port()}",
            f"--runtime-env-agent-port={self.free_port()}",
            f"--metrics-export-port={self.free_port()}",
            # ... except the workers' (one port each, up to hundreds): OS-assigned, instead of every node's
            # default pool 10002-19999, which all nodes of one machine would share
            "--min-worker-port=0", "--max-worker-port=0",
            "--disable-usage-stats", "--log-color=false",
            "--block",  # `ray start` stays the parent of the node's processes; we kill that tree by pid
        ]

    def _start_head(self) -> None:
        gcs_port, dashboard_port, client_port = self.free_port(), self.free_port(), self.free_port()
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        env = self._node_env()
        cmd = [_console_script("ray"), "start", "--head", f"--port={gcs_port}",
               "--num-cpus=0", '--resources={"memory_host": 1}',
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={client_port}",
               (f'--system-config={{"health_check_period_ms": {self.health_check_period_ms}, '
                f'"health_check_failure_threshold": 3}}'),
               *self._common_ray_args("head", "127.0.0.1")]
        log_path = self.logs_dir / "head.log"
        # The head needs no namespace of its own: it sees the host's folders (it *is* the driver's machine).
        self.head = Node("head", self._popen(cmd, log_path, env, self.head_dir), self.base / "ray" / "head",
                         log_path, num_cpus=0, ip="127.0.0.1")
        self.log.info("head pid %d: %s", self.head.pid, " ".join(cmd))
        self.env = {**self._base_env(), **self.s3_env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled",
                    "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}

    def _wait_gcs(self) -> None:
        def accepts() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", int(self.address.rsplit(":", 1)[1]))) == 0

        wait_for(accepts, 60, "the head's GCS port", interval=0.05, check=lambda: self._check_running(self.head))

    def _wait_head(self) -> None:
        # `ray start` writes <temp-dir>/ray_current_cluster once the GCS and the head's raylet are up. With our own
        # temp dir it lands there, not in /tmp/ray where other clusters' `ray.init("auto")` would find it.
        marker = self.head.temp_dir / "ray_current_cluster"
        wait_for(marker.exists, 60, "the head node", interval=0.1, check=lambda: self._check_running(self.head))
        from ray._raylet import GcsClient

        self._gcs = GcsClient(address=self.address)
        self.head.node_id = wait_for(lambda: self._node_id(self.head), 30, "the head in the GCS")

    def _spawn_worker(self, num_cpus: float, resources: dict[str, float] | None = None) -> Node:
        """Start a worker node in a new private mount namespace (returns at once; see _wait_worker)."""
        self._node_counter += 1
        name = f"w{self._node_counter}"
        # Every node has its own IP, as on a real cluster: all of 127.0.0.0/8 reaches the loopback interface.
        ip = f"127.0.0.{1 + self._node_counter}"
        temp_dir = self.base / "ray" / name
        temp_dir.mkdir(parents=True)
        ray_cmd = [_console_script("ray"), "start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                   *([f"--resources={json.dumps(resources)}"] if resources else []), *self._common_ray_args(name, ip)]
        # `unshare -m` (no --fork) execs bash in a new mount namespace whose mounts do not propagate back to the
        # host; bash mounts an empty tmpfs over each hidden folder, then execs `ray start`, so the node's pid is
        # the one we spawned and every process the node starts inherits the namespace.
        script = 'while [ "$1" != -- ]; do mount -t tmpfs memtrain-hidden "$1" || exit 1; shift; done; shift; exec "$@"'
        cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "hide",
               *map(str, self.hidden_dirs), "--", *ray_cmd]
        log_path = self.logs_dir / f"{name}.log"
        node = Node(name, self._popen(cmd, log_path, self._node_env(), temp_dir), temp_dir, log_path, num_cpus, ip)
        self.worker_nodes.append(node)
        self.log.info("worker node %s pid %d: %s", name, node.pid, " ".join(ray_cmd))
        return node

    def _wait_worker(self, node: Node, timeout: float = 60) -> None:
        node.node_id = wait_for(lambda: self._node_id(node), timeout, f"worker node {node.name} to join",
                                check=lambda: self._check_running(node))
        node.mount_ns = os.readlink(f"/proc/{node.pid}/ns/mnt")
        if node.mount_ns == os.readlink("/proc/self/ns/mnt"):
            raise ClusterError(f"worker node {node.name} runs in the host's mount namespace")

    def _check_running(self, node: Node) -> None:
        if node.process.poll() is not None:
            raise ClusterError(f"`ray start` of node {node.name} exited with {node.process.returncode}:\n"
                               f"{tail(node.log_path.read_text(errors='replace'), 40)}")

    # --- node state ---------------------------------------------------------------------------------------------

    def node_infos(self) -> list:
        """Every node the GCS knows of (``GcsNodeInfo`` protobufs, dead ones included)."""
        return list(self._gcs.get_all_node_info(timeout=10).values())

    def alive_nodes(self) -> list[dict]:
        """The alive nodes as Ray reports them: ``{"node_id", "is_head", "resources", "temp_dir"}``."""
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        return [{"node_id": i.node_id.hex(), "is_head": i.is_head_node, "resources": dict(i.resources_total),
                 "temp_dir": i.temp_dir}
                for i in self.node_infos() if i.state == GcsNodeInfo.GcsNodeState.ALIVE]

    def _node_state(self, node_id: str) -> str | None:
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        for info in self.node_infos():
            if info.node_id.hex() == node_id:
                return GcsNodeInfo.GcsNodeState.Name(info.state)
        return None

    def _node_id(self, node: Node) -> str | None:
        """The id of the alive node whose temp dir is ``node.temp_dir`` (each node has its own), or None."""
        for info in self.alive_nodes():
            if info["temp_dir"] == str(node.temp_dir):
                return info["node_id"]
        return None

    # --- node control -------------------------------------------------------------------------------------------

    def kill_node(self, node: Node, timeout: float = 60) -> None:
        """SIGKILL every process of a worker node (a machine failing), then wait until Ray declares it dead."""
        if node.is_head:
            raise ValueError("kill_node is for worker nodes; the head goes down with shutdown()")
        t0 = time.monotonic()
        self._kill_node_processes(node)
        self.worker_nodes = [n for n in self.worker_nodes if n is not node]
        wait_for(lambda: self._node_state(node.node_id) == "DEAD", timeout, f"Ray to declare {node.name} dead",
                 interval=0.25)
        self.log.info("killed node %s (%s) in %.1f s", node.name, node.node_id, time.monotonic() - t0)

    def _kill_node_processes(self, node: Node) -> None:
        procs = process_tree(node.pid)
        if node.mount_ns:  # also whatever left the tree (orphans are re-parented to init)
            procs += processes_in_mount_namespace(node.mount_ns)
        kill_processes(procs, owner=node.process)

    def add_worker_node(self, num_cpus: float = 2, resources: dict[str, float] | None = None,
                        timeout: float = 60) -> Node:
        """Start a fresh worker node (fresh namespace, empty hidden folders; ``resources``: custom Ray resources it
        offers) and return it once it is alive."""
        t0 = time.monotonic()
        node = self._spawn_worker(num_cpus, resources)
        try:
            self._wait_worker(node, timeout)
        except BaseException:
            self._kill_node_processes(node)
            self.worker_nodes.remove(node)
            raise
        self.log.info("added node %s (%s) in %.1f s", node.name, node.node_id, time.monotonic() - t0)
        return node

    # --- running memtrain as a user would -----------------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        """The argv of ``memtrain *args`` run by this interpreter."""
        return [sys.executable, "-m", "orchestration.cli", *map(str, args)]

    def start(self, *args: str, name: str | None = None) -> subprocess.Popen:
        """Start ``memtrain *args`` in the background (cwd head_dir, env :attr:`env`) and return its Popen, with
        ``.command`` (the memtrain argv) and ``.log_path`` (its stdout and stderr, under logs_dir). Finish it with
        :meth:`wait`; shutdown() kills it if it still runs."""
        self._run_counter += 1
        name = name or f"{self._run_counter:03d}-{args[0] if args else 'memtrain'}"
        log_path = self.logs_dir / f"{name}.log"
        cmd = self.command(*args)
        with open(self.logs_dir / "commands.log", "a") as f:  # an index of what ran, also after a crash
            f.write(f"$ {subprocess.list2cmdline(cmd)}  # log {log_path.name}\n")
        # its own session: a timeout kills the whole process group (the driver and anything it forked)
        proc = self._popen(cmd, log_path, self.env, self.head_dir, new_session=True)
        proc.command, proc.log_path, proc.started_at = cmd, log_path, time.monotonic()
        self._drivers.append(proc)
        self.log.info("started pid %d: %s", proc.pid, subprocess.list2cmdline(cmd))
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for a :meth:`start`-ed process (killing it after ``timeout`` s); its output (stdout and stderr,
        interleaved) is ``.stdout`` of the result. ``check``: raise AssertionError unless it exited with 0."""
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            self._kill_driver(proc)
            timed_out = True
        output = proc.log_path.read_text(errors="replace")
        seconds = time.monotonic() - proc.started_at
        result = subprocess.CompletedProcess(proc.command, proc.returncode, stdout=output, stderr="")
        with open(self.logs_dir / "commands.log", "a") as f:
            f.write(f"# {proc.log_path.name}: rc {proc.returncode}, {seconds:.1f} s\n")
        if check and (timed_out or proc.returncode != 0):
            status = f"timed out after {timeout:.0f} s (killed)" if timed_out else f"exited with {proc.returncode}"
            raise AssertionError(
                f"`memtrain {subprocess.list2cmdline(proc.command[3:])}` {status} after {seconds:.1f} s "
                f"(cwd {self.head_dir}, log {proc.log_path}); last 80 lines of its output:\n{tail(output)}")
        return result

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``memtrain *args`` like a user on the head would (``python -m orchestration.cli``, cwd head_dir,
        env :attr:`env`) and return its output (stdout and stderr interleaved, as ``.stdout``); ``check``: raise
        AssertionError with the command, return code and the last 80 lines of output unless it exited with 0."""
        return self.wait(self.start(*args), timeout=timeout, check=check)

    def _kill_driver(self, proc: subprocess.Popen) -> None:
        tree = process_tree(proc.pid)  # before the kill: a dead parent loses its children
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its process group (start() gave it a session of its own)
        kill_processes(tree, owner=proc)  # and whatever left the group

    # --- shutdown -----------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill every process the harness started (by pid), then remove the base folder. Idempotent."""
        if self._stopped or os.getpid() != self._owner_pid:  # atexit in a forked child must not stop the cluster
            return
        self._stopped = True
        t0 = time.monotonic()
        for proc in self._drivers:
            if proc.poll() is None:
                self._kill_driver(proc)
        for node in list(self.worker_nodes):
            self._kill_node_processes(node)
        self.worker_nodes = []
        if self.head is not None:
            self._kill_node_processes(self.head)
        if self._moto is not None:
            self._moto.stop()
        self.timings["shutdown"] = time.monotonic() - t0
        self.log.info("cluster stopped in %.1f s", self.timings["shutdown"])
        if self._log_handler is not None:
            self.log.removeHandler(self._log_handler)
            self._log_handler.close()
        # Our temp dirs hold this cluster's ray_current_cluster files; /tmp/ray was never written.
        if self.base is not None and not self.keep_base_dir and not self._base_arg:
            shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.shutdown)

    def processes(self) -> Iterator[psutil.Process]:
        """Every live process of the cluster (nodes, S3 server, memtrain drivers): for leak checks in tests."""
        roots = [n.pid for n in ([self.head] if self.head else []) + self.worker_nodes]
        roots += [p.pid for p in self._drivers] + ([self._moto.pid] if self._moto and self._moto.pid else [])
        for pid in roots:
            yield from process_tree(pid)
