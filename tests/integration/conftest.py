"""Fixtures of the integration suite: MariaDB servers, node processes and the common chain.

Everything runs on loopback: MariaDB servers started from one template data directory,
``meshproxy run`` processes with their stderr captured to files, and real clients.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from meshproxy.testbed import mariadb
from meshproxy.testbed.replication import ReplicationSet
from tests.integration.harness import (
    Chain,
    MariaDBFarm,
    NodeFactory,
    edge_config,
    free_port,
    middle_config,
)

MariaDBFactory = Callable[..., mariadb.MariaDB]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item, so fixtures can tell that a test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def mariadb_farm() -> Iterator[MariaDBFarm]:
    """A template data directory made once, and the servers started from it this session."""
    if mariadb.mariadbd_path() is None:
        pytest.skip("mariadbd is not installed (apt-get install mariadb-server)")
    # Not under pytest's basetemp: that is mode 0700 and mariadbd runs as the mysql user.
    workdir = mariadb.prepare_workdir(Path(tempfile.mkdtemp(prefix="meshproxy-it-")))
    farm = MariaDBFarm(workdir, mariadb.make_template(workdir))
    try:
        yield farm
    finally:
        farm.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def mariadb_factory(mariadb_farm: MariaDBFarm) -> Iterator[MariaDBFactory]:
    """Start MariaDB servers for one test (own datadir, free port); stopped at its end."""
    started: list[mariadb.MariaDB] = []

    def start(tls: bool = False) -> mariadb.MariaDB:
        server = mariadb_farm.start(tls=tls)
        started.append(server)
        return server

    yield start
    for server in started:
        mariadb_farm.stop(server)


@pytest.fixture(scope="session")
def shared_mariadb(mariadb_farm: MariaDBFarm) -> mariadb.MariaDB:
    """One TLS-capable MariaDB server for the tests that neither kill nor break it."""
    return mariadb_farm.start(tls=True)


def _print_logs(factory: NodeFactory) -> None:
    for node in factory.nodes:
        print(f"----- log of node {node.name} ({node.log_path})\n{node.text()[-8000:]}")


def _failed(request: pytest.FixtureRequest) -> bool:
    call = getattr(request.node, "report_call", None)
    return call is not None and bool(call.failed)


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start ``meshproxy run`` processes; at the end SIGTERM them and check they exited
    cleanly, left no process behind, and logged no traceback or crashed task."""
    factory = NodeFactory(tmp_path)
    yield factory
    problems = factory.stop_all()
    if _failed(request):
        _print_logs(factory)
    if problems:
        pytest.fail("\n".join(problems))


def start_chain(factory: NodeFactory, backend: mariadb.MariaDB, accel: str = "none") -> Chain:
    """An edge and a middle in front of ``backend``; with ``accel = "sockmap"`` both splice
    linked sessions in the kernel (and must have loaded the fast path)."""
    mesh_port, edge_port = free_port(), free_port()
    nodes = []
    for doc in (
        middle_config("middle1", mesh_port, servers=[backend.port]),
        edge_config("edge1", edge_port, [mesh_port]),
    ):
        doc["dataplane"] = {"accel": accel}
        nodes.append(factory.start(doc))
        if accel != "none":
            nodes[-1].wait_for_event("accel_ready", timeout_s=30)
    middle, edge = nodes
    return Chain(edge, middle, edge_port, backend)


@pytest.fixture
def chain(nodes: NodeFactory, shared_mariadb: mariadb.MariaDB) -> Chain:
    """client -> edge -> middle -> the shared MariaDB server, for this test alone."""
    return start_chain(nodes, shared_mariadb)


@pytest.fixture(scope="module")
def _module_chain(
    tmp_path_factory: pytest.TempPathFactory, shared_mariadb: mariadb.MariaDB
) -> Iterator[tuple[NodeFactory, Chain]]:
    factory = NodeFactory(tmp_path_factory.mktemp("chain"))
    try:
        yield factory, start_chain(factory, shared_mariadb)
    finally:
        problems = factory.stop_all()
        if problems:
            _print_logs(factory)
            pytest.fail("\n".join(problems))


@pytest.fixture
def shared_chain(
    request: pytest.FixtureRequest, _module_chain: tuple[NodeFactory, Chain]
) -> Iterator[Chain]:
    """client -> edge -> middle -> the shared MariaDB server, shared by the tests of a module
    that leave the chain as they found it (it is checked for problems when they are done)."""
    factory, chain = _module_chain
    yield chain
    if _failed(request):
        _print_logs(factory)


def _replication_set(farm: MariaDBFarm) -> Iterator[ReplicationSet]:
    """Start a primary and two replicas in their own directory of the farm's workdir; stop
    them all and remove that directory however the user of the set ends."""
    workdir = Path(tempfile.mkdtemp(prefix="replication-", dir=farm.workdir))
    replication_set = ReplicationSet(workdir, farm.template, free_port=free_port)
    try:
        replication_set.start()
        yield replication_set
    finally:
        replication_set.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def _module_replication(mariadb_farm: MariaDBFarm) -> Iterator[ReplicationSet]:
    yield from _replication_set(mariadb_farm)


@pytest.fixture
def replication(_module_replication: ReplicationSet) -> Iterator[ReplicationSet]:
    """A started GTID primary with two read-only replicas, shared by the tests of a module
    that leave it as they found it: after each, the same primary, every SQL thread running
    again (restarted if the test stopped one) and every replica caught up."""
    replication_set = _module_replication
    primary, replicas = replication_set.primary, replication_set.replicas
    yield replication_set
    if (replication_set.primary, replication_set.replicas) != (primary, replicas):
        pytest.fail(
            "a test changed the topology of the shared replication set: use fresh_replication"
        )
    for replica in replicas:
        status = replication_set.slave_status(replica)
        if status is not None and status["Slave_SQL_Running"] == "No":
            replication_set.start_sql_thread(replica)
        replication_set.wait_running(replica)
    replication_set.wait_caught_up()


@pytest.fixture
def fresh_replication(mariadb_farm: MariaDBFarm) -> Iterator[ReplicationSet]:
    """A started GTID primary with two read-only replicas for one test alone, which may
    promote, stop or break them; every server is stopped at its end."""
    yield from _replication_set(mariadb_farm)
