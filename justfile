# Developer tasks; `./dev` installs what they need on a fresh machine.
venv := ".venv/bin"

default: check

# ruff lint + format check, mypy --strict, unit tests
check:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .
    {{venv}}/mypy
    {{venv}}/pytest -q tests/unit

# the whole suite: unit + integration against real MariaDB, clients and processes
test *args:
    {{venv}}/pytest {{args}}

# the Docker chaos scenarios (engine must run: `./dev chaos` starts one), then their table
chaos *args:
    -{{venv}}/pytest -m chaos tests/integration/chaos {{args}}
    {{venv}}/python -m meshproxy.chaos.report artifacts/chaos

# the demo: one edge, three middles, two MariaDB servers, client load, a middle stopped
demo *args:
    {{venv}}/meshproxy demo {{args}}

# sysbench through direct, HAProxy, meshproxy single hop and chain; writes bench/results/
bench *args:
    {{venv}}/python -m bench.run {{args}}

# session continuity: a session-mode edge vs a passthrough edge over 3 session-mode middles
# (edge CPU per query), then sysbench through it while a middle is killed and another paused
bench-continuity *args:
    {{venv}}/python -m bench.continuity {{args}}

# the chain for 30 minutes under sysbench and a connection storm, a middle killed every
# 4 minutes; reports RSS and fds per node process (`just soak --minutes 10` for less)
soak *args:
    {{venv}}/python -m bench.soak {{args}}

# gossip failure detection: meshproxy vs Serf (local, lan), N = 5 and 20; writes bench/results/
bench-gossip *args:
    {{venv}}/python -m bench.gossip {{args}}

fmt:
    {{venv}}/ruff check --fix .
    {{venv}}/ruff format .
