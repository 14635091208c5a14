"""Fixtures of the storage tests: a real Valkey/Redis server on a loopback port, pools, backends.

The ``valkey`` tests talk to a real ``valkey-server`` or ``redis-server`` (whichever is on PATH),
started on a free loopback port with persistence off and stopped after the test; they skip,
saying so, when neither binary exists. Nothing about the server is mocked.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from hicache.memory import DeviceKVPool, HostKVPool, MambaHostPool, MambaStatePool
from hicache.storage import StorageIdentity, create_backend, page_hashes

SERVER_BINARY = shutil.which("valkey-server") or shutil.which("redis-server")
SKIP_REASON = "needs valkey-server or redis-server on PATH (e.g. apt-get install redis-server)"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, one <= 55535 whose bus port (+10000) is free."""
    if not cluster:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for _ in range(200):
        port = random.randint(20000, 55535)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class ServerProcess:
    """A Valkey/Redis server process on ``127.0.0.1:port``, which tests may kill and restart."""

    def __init__(self, binary: str, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        self.extra_args = extra_args
        self.host = "127.0.0.1"
        self.port = _free_port(cluster="--cluster-enabled" in extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(self.workdir),
            "--logfile", "",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}: {out}")
            if self._ping():
                return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"{self.binary} did not answer PING on {self.address}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> None:
        """Kills the server (if running) and starts a fresh, empty one on the same port."""
        self.kill()
        self.start()

    def command(self, *args):
        """Runs one command on the server through a fresh client and returns the reply."""
        import valkey

        client = valkey.Valkey(host=self.host, port=self.port, socket_timeout=5)
        try:
            return client.execute_command(*args)
        finally:
            client.close()


@pytest.fixture
def valkey_server(tmp_path):
    """A running server, killed after the test; skips when no server binary exists."""
    if SERVER_BINARY is None:
        pytest.skip(SKIP_REASON)
    server = ServerProcess(SERVER_BINARY, tmp_path)
    try:
        server.start()
    except RuntimeError:
        # The free port was taken between the probe and the start: one more try.
        server = ServerProcess(SERVER_BINARY, tmp_path)
        server.start()
    yield server
    server.kill()


CLI_BINARY = shutil.which("valkey-cli") or shutil.which("redis-cli")


@pytest.fixture
def valkey_cluster(tmp_path):
    """A 3-node cluster (no replicas) on loopback ports; skips without server and CLI binaries."""
    if SERVER_BINARY is None or CLI_BINARY is None:
        pytest.skip("needs valkey-server/redis-server and valkey-cli/redis-cli on PATH")
    nodes = []
    try:
        for i in range(3):
            workdir = tmp_path / f"node{i}"
            workdir.mkdir()
            args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            node = ServerProcess(SERVER_BINARY, workdir, args)
            node.start()
            nodes.append(node)
        subprocess.run(
            [CLI_BINARY, "--cluster", "create", *(n.address for n in nodes)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


# --- pools ------------------------------------------------------------------------------------


def fill_random(tensor: torch.Tensor, seed: int) -> None:
    """Fills ``tensor`` with random bytes (every bit pattern, NaNs included)."""
    raw = tensor.view(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))


def make_kv_pool(
    layout="page_first",
    page_size=4,
    num_pages=8,
    dtype=torch.bfloat16,
    kind="mha",
    num_layers=2,
    num_heads=2,
    head_dim=8,
    seed: int | None = 0,
) -> HostKVPool:
    """A small host KV pool, filled with random bytes unless ``seed`` is None (then zeros)."""
    heads = 1 if kind == "mla" else num_heads
    device = DeviceKVPool(page_size, num_layers, heads, head_dim, dtype, device="cpu", kind=kind)
    pool = HostKVPool(device, page_size * num_pages, page_size, layout, pin_memory=False)
    if seed is not None:
        fill_random(pool.kv_buffer, seed)
    return pool


def make_mamba_pool(layout="page_first", num_slots=8, seed: int | None = 0) -> MambaHostPool:
    """A small Mamba host pool (bf16 conv, fp32 temporal), random unless ``seed`` is None."""
    device = MambaStatePool(2, 3, (6, 3), (2, 4, 5), torch.bfloat16, torch.float32, device="cpu")
    pool = MambaHostPool(device, num_slots, layout, pin_memory=False)
    if seed is not None:
        fill_random(pool.conv_buffer, seed)
        fill_random(pool.temporal_buffer, seed + 1)
    return pool


def page_slots(pool, pages) -> torch.Tensor:
    """Host slot indices of whole pages ``pages`` (a list of page numbers), in that order."""
    size = getattr(pool, "page_size", 1)
    return torch.cat([torch.arange(p * size, (p + 1) * size) for p in pages]).to(torch.int64)


def page_bytes(pool, page: int) -> list[torch.Tensor]:
    """The bytes of one page as the pool's ``read`` returns them (layout-independent)."""
    return [t.contiguous().view(torch.uint8) for t in pool.read(page_slots(pool, [page]))]


def same_page(pool_a, page_a: int, pool_b, page_b: int) -> bool:
    a, b = page_bytes(pool_a, page_a), page_bytes(pool_b, page_b)
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def make_keys(num: int, salt: int = 0) -> list[str]:
    """``num`` distinct page-hash hex keys."""
    return [d.hex() for d in page_hashes(list(range(salt * 1000, salt * 1000 + num)), 1)]


# --- backends ---------------------------------------------------------------------------------

BACKENDS = ["file", pytest.param("valkey", marks=pytest.mark.valkey)]


@pytest.fixture
def make_backend(request, tmp_path):
    """``make_backend(name, identity, **extra_config)``: a backend on this test's storage.

    All backends of one test share one storage: the same directory for ``file``, the same server
    for ``valkey`` (started on first use). They are closed after the test.
    """
    made = []

    def make(name: str, identity: StorageIdentity, **config):
        if name == "file":
            config.setdefault("path", str(tmp_path / "store"))
        else:
            server = request.getfixturevalue("valkey_server")
            config.setdefault("host", server.host)
            config.setdefault("port", server.port)
        backend = create_backend(name, identity, config)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def corrupt_value(backend, key: str, offset: int) -> None:
    """Flips every bit of the byte at ``offset`` of the value stored under page key ``key``."""
    skey = backend.storage_key(key)
    if backend.name == "file":
        path = backend.directory / f"{key}.bin"
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        old = backend.client.getrange(skey, offset, offset)
        backend.client.setrange(skey, offset, bytes([old[0] ^ 0xFF]))
