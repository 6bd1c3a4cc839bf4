"""A local Ray head on 127.0.0.1, started and stopped by ``factory up`` / ``factory down``.

``up`` is idempotent: a second call finds the running head and returns it. ``down`` stops only the
processes of the cluster this home started (found by its temp dir), never other Ray clusters on the
host (``ray stop`` would kill them all).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import BaseModel

from aifactory import ray_compat, telemetry
from aifactory.cluster.connect import LOOPBACK, auth_headers, ensure_token, ray_env, token_path
from aifactory.exceptions import ClusterError
from aifactory.home import FactoryHome


class ClusterState(BaseModel):
    """What ``factory up`` recorded about the head it started (``<home>/cluster/cluster.json``)."""

    gcs_address: str
    dashboard_url: str
    metrics_export_port: int
    temp_dir: str
    num_cpus: int
    num_gpus: int
    serve_ingress: str
    token_path: str
    started_at: float
    ray_version: str
    meter_cluster_id: str | None = None  # the collector's cursor name in the ledger; None: no meter started
    meter_sample_interval_s: float | None = None
    meter_window_s: float | None = None
    dispatcher: bool = False  # the queue's dispatcher actor was started on it


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed in this environment; run `make test` or pip install -e .")
    return found


class LocalCluster:
    """The local head of one factory home."""

    def __init__(self, home: FactoryHome):
        self.home = home
        self.state_path = home.cluster_dir / "cluster.json"

    @property
    def temp_dir(self) -> str:
        # Ray's unix socket paths must stay short (~107 bytes), so the temp dir lives in /tmp, keyed by home.
        key = hashlib.sha256(str(self.home.root).encode()).hexdigest()[:10]
        return os.path.join(os.environ.get("AIFACTORY_RAY_TMPDIR", "/tmp"), f"aifactory-{key}")

    def _headers(self) -> dict[str, str]:
        # This home's head always uses this home's token, whatever RAY_AUTH_TOKEN_PATH says.
        return auth_headers({"RAY_AUTH_TOKEN_PATH": str(token_path(self.home))})

    def state(self) -> ClusterState | None:
        try:
            return ClusterState.model_validate_json(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def is_alive(self, state: ClusterState, timeout_s: float = 2.0) -> bool:
        req = urllib.request.Request(f"{state.dashboard_url}/api/version", headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def up(
        self,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        gcs_port: int = 6379,
        dashboard_port: int = 8265,
        metrics_export_port: int = 8080,
        serve_ingress: str = "haproxy",
        object_store_memory: int | None = None,
        timeout_s: float = 90.0,
        meter: bool = True,
        meter_sample_interval_s: float | None = None,
        meter_window_s: float | None = None,
        dispatcher: bool = True,
    ) -> tuple[ClusterState, bool]:
        """Start the head if it is not running, and the cost meter on it (``meter``: the collector as a
        detached actor that outlives this process and restarts when killed). Returns ``(state, started)``."""
        existing = self.state()
        if existing is not None and self.is_alive(existing):
            return existing, False
        if existing is not None:  # stale: a crashed head or a reboot
            self._kill_processes(existing.temp_dir)
            self.state_path.unlink(missing_ok=True)
        if serve_ingress not in ("haproxy", "python"):
            raise ClusterError(f"serve_ingress must be 'haproxy' or 'python', got {serve_ingress!r}")
        busy = [p for p in (gcs_port, dashboard_port, metrics_export_port) if not _port_free(p)]
        if busy:
            raise ClusterError(
                f"port(s) {busy} on {LOOPBACK} are in use by another program or Ray cluster; "
                "pick others with --port / --dashboard-port / --metrics-port"
            )
        self.home.ensure()
        ensure_token(self.home)
        env = ray_env(self.home)
        # The control plane's signing key, created here and only here (never on first use by a worker); every
        # Ray process gets the public half to verify models with (aifactory.security.signing).
        from aifactory.security.signing import PUBLIC_KEY_ENV, create_signing_key, public_key_pem

        create_signing_key(self.home)
        env[PUBLIC_KEY_ENV] = public_key_pem(self.home, from_env=False).decode()
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path(self.home))
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        # The factory's own Python first on PATH for every Ray process, so `python` in a plain
        # `ray job submit` entrypoint is this environment's (with ray and aifactory) even when the shell that
        # ran `factory up` had no virtualenv active.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        if serve_ingress == "haproxy":
            env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        cpus = num_cpus or max(4, os.cpu_count() or 2)
        gpus = num_gpus if num_gpus is not None else _detect_gpus()
        cmd = [
            _ray_executable(), "start", "--head",
            f"--node-ip-address={LOOPBACK}",
            f"--port={gcs_port}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={dashboard_port}",
            f"--metrics-export-port={metrics_export_port}",
            # The dashboard agent defaults to the fixed port 52365: a second cluster on the host then has no
            # agent and refuses job submissions ("No available agent"). Give each head its own port.
            f"--dashboard-agent-listen-port={free_port()}",
            # Likewise the Ray Client server's fixed 10001. It names the GCS address, not the temp dir, in
            # its command line, so `down` finds it by that (left behind, it outlived its cluster).
            f"--ray-client-server-port={free_port()}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if object_store_memory:
            cmd.append(f"--object-store-memory={object_store_memory}")
        log = self.home.cluster_dir / "ray-start.log"
        with open(log, "w") as out:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        if proc.returncode != 0:
            raise ClusterError(f"`ray start` failed (exit {proc.returncode}); see {log}")
        import ray

        state = ClusterState(
            gcs_address=f"{LOOPBACK}:{gcs_port}",
            dashboard_url=f"http://{LOOPBACK}:{dashboard_port}",
            metrics_export_port=metrics_export_port,
            temp_dir=self.temp_dir,
            num_cpus=cpus,
            num_gpus=gpus,
            serve_ingress=serve_ingress,
            token_path=str(token_path(self.home)),
            started_at=time.time(),
            ray_version=ray.__version__,
        )
        deadline = time.monotonic() + timeout_s
        while not self.is_alive(state):
            if time.monotonic() > deadline:
                self._kill_processes(state.temp_dir, gcs_address=state.gcs_address)
                raise ClusterError(f"the Ray head did not answer at {state.dashboard_url} within {timeout_s:.0f} s; see {log}")
            time.sleep(0.5)
        self._write_state(state)
        if meter:
            try:
                state = self.start_meter(state, sample_interval_s=meter_sample_interval_s, window_s=meter_window_s)
            except (ClusterError, subprocess.TimeoutExpired) as err:
                self._kill_processes(state.temp_dir, gcs_address=state.gcs_address)
                self.state_path.unlink(missing_ok=True)
                raise ClusterError(f"the cost meter did not start, so the cluster was stopped: {err}") from None
        if dispatcher:
            try:
                state = self.start_dispatcher(state)
            except (ClusterError, subprocess.TimeoutExpired) as err:
                self._kill_processes(state.temp_dir, gcs_address=state.gcs_address)
                self.state_path.unlink(missing_ok=True)
                raise ClusterError(f"the queue dispatcher did not start, so the cluster was stopped: {err}") from None
        return state, True

    def start_dispatcher(self, state: ClusterState) -> ClusterState:
        """Start the queue's dispatcher actor on a running head (``factory up`` does); idempotent."""
        from aifactory.queue.dispatcher import start_dispatcher_process

        start_dispatcher_process(env=self._client_env(), gcs_address=state.gcs_address,
                                 dashboard_url=state.dashboard_url, home=str(self.home.root))
        state = state.model_copy(update={"dispatcher": True})
        self._write_state(state)
        return state

    def stop_dispatcher(self, state: ClusterState) -> dict:
        """Stop the dispatcher actor (the queue itself stays in the home: nothing queued is lost)."""
        from aifactory.queue.dispatcher import stop_dispatcher_process

        out = stop_dispatcher_process(env=self._client_env(), gcs_address=state.gcs_address)
        if self.state_path.exists():
            self._write_state(state.model_copy(update={"dispatcher": False}))
        return out

    def dispatcher_health(self, state: ClusterState) -> dict:
        """The dispatcher's last pass, from its heartbeat file (no Ray connection)."""
        from aifactory.queue.dispatcher import health

        if not state.dispatcher:
            return {"status": "not started", "hint": "factory up starts it"}
        return health(self.home)

    def _client_env(self) -> dict[str, str]:
        """The environment of a Ray driver of this home's head (token auth on)."""
        env = ray_env(self.home)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path(self.home)))
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        return env

    def meter_health(self, state: ClusterState) -> dict:
        """The meter's last sample, commit lag and committed windows, from the ledger (no Ray connection)."""
        if state.meter_cluster_id is None:
            return {"status": "not started", "hint": "factory meter start"}
        from aifactory.cost.ledger import Ledger

        health = Ledger.of(self.home).meter_health(state.meter_cluster_id)
        age = health["last_sample_age_s"]
        fresh = age is not None and age <= 3 * (state.meter_sample_interval_s or 10.0) + 5
        return {"status": "ok" if fresh else "stale", **health,
                "sample_interval_s": state.meter_sample_interval_s, "window_s": state.meter_window_s}

    def start_meter(self, state: ClusterState, *, sample_interval_s: float | None = None,
                    window_s: float | None = None) -> ClusterState:
        """Start the meter on a running head (``factory meter start``); idempotent."""
        from aifactory.cost.meter import DEFAULT_SAMPLE_INTERVAL_S, DEFAULT_WINDOW_S, start_meter

        interval = sample_interval_s or state.meter_sample_interval_s or DEFAULT_SAMPLE_INTERVAL_S
        window = window_s or state.meter_window_s or DEFAULT_WINDOW_S
        status = start_meter(env=self._client_env(), gcs_address=state.gcs_address, dashboard_url=state.dashboard_url,
                             ledger_path=str(self.home.ledger_path), sample_interval_s=interval, window_s=window)
        state = state.model_copy(update={"meter_cluster_id": status["cluster_id"], "meter_sample_interval_s": interval,
                                         "meter_window_s": window})
        self._write_state(state)
        return state

    def stop_meter(self, state: ClusterState) -> dict:
        """Flush the meter's closed windows and stop it (``factory meter stop``, and ``down``)."""
        from aifactory.cost.meter import stop_meter

        out = stop_meter(env=self._client_env(), gcs_address=state.gcs_address)
        if self.state_path.exists():
            self._write_state(state.model_copy(update={"meter_cluster_id": None}))
        return out

    def _write_state(self, state: ClusterState) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.state_path)

    def down(self, timeout_s: float = 20.0) -> bool:
        """Flush and stop the meter, then this home's head and its workers. Returns whether anything was
        running."""
        state = self.state()
        if state is None:
            return bool(self._kill_processes(self.temp_dir, timeout_s))
        if state.dispatcher and self.is_alive(state):
            try:
                self.stop_dispatcher(state)
            except (ClusterError, subprocess.TimeoutExpired) as err:  # the queue is durable in the home
                import logging

                logging.getLogger("aifactory.cluster").warning("the queue dispatcher did not stop before down: %s",
                                                               err)
        if state.meter_cluster_id is not None and self.is_alive(state):
            try:
                self.stop_meter(state)
            except (ClusterError, subprocess.TimeoutExpired) as err:  # committed windows are durable already
                import logging

                logging.getLogger("aifactory.cluster").warning("the meter did not flush before down: %s", err)
        killed = self._kill_processes(state.temp_dir, timeout_s, gcs_address=state.gcs_address)
        self.state_path.unlink(missing_ok=True)
        return killed > 0

    @staticmethod
    def _kill_processes(temp_dir: str, timeout_s: float = 20.0, *, gcs_address: str | None = None) -> int:
        """Terminate every process whose command line names ``temp_dir`` (or ``--address=<gcs_address>``, the
        Ray Client server), with all their children."""
        import psutil

        marker = temp_dir.rstrip("/") + "/"
        address_arg = f"--address={gcs_address}" if gcs_address else None
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in arg or arg.endswith(temp_dir) or arg == address_arg
                       for arg in proc.info["cmdline"] or []):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        procs = set(roots)
        for root in roots:
            try:
                procs.update(root.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        procs.discard(psutil.Process())
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=timeout_s / 2)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout_s / 2)
        return len(procs)

    def resources(self, state: ClusterState, timeout_s: float = 10.0) -> dict[str, dict[str, float]]:
        """Total and used resources (CPU, GPU, memory_gib, custom), from the dashboard's cluster status."""
        deadline = time.monotonic() + timeout_s
        while True:
            usage = ray_compat.cluster_usage(state.dashboard_url, self._headers())
            if usage or time.monotonic() > deadline:  # the first report arrives a few seconds after start
                break
            time.sleep(0.5)
        total: dict[str, float] = {}
        used: dict[str, float] = {}
        for key, (in_use, cap) in usage.items():
            if key.startswith("node:") or key in ("objectStoreMemory", "object_store_memory"):
                continue
            name, scale = ("memory_gib", 1 / 2**30) if key == "memory" else (key, 1.0)
            total[name] = round(float(cap) * scale, 2)
            used[name] = round(float(in_use) * scale, 2)
        return {"total": total, "used": used}


def _detect_gpus() -> int:
    """Number of NVIDIA GPUs on this node (through :mod:`aifactory.telemetry`); 0 where NVML cannot say."""
    return telemetry.known(telemetry.gpu_count()) or 0
