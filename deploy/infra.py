"""The local stack: a real single-node Kafka broker (KRaft) and a real PostgreSQL, started by our own code.

Kafka comes from Maven Central (``deploy/kafka-pom.xml``) into a cache outside the repo; a second start reuses
the cache. PostgreSQL comes from Debian's packages (installed with apt-get when missing) and runs as the
``postgres`` user on a data dir it owns. Used by ``leadledger infra up|down|status``, ``.ci/run`` and the tests.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parent
PG_BIN = Path(os.environ.get("LEADLEDGER_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass(frozen=True)
class InfraConfig:
    """Where the local stack lives and listens; every field has an environment variable."""

    cache_dir: Path
    state_dir: Path
    kafka_version: str
    kafka_port: int
    controller_port: int
    pg_port: int
    pg_data: Path
    pg_databases: tuple[str, ...]

    @classmethod
    def from_env(cls) -> "InfraConfig":
        env = os.environ.get
        return cls(
            cache_dir=Path(env("LEADLEDGER_CACHE", str(Path.home() / ".cache" / "leadledger"))),
            state_dir=Path(env("LEADLEDGER_STATE", str(Path.home() / ".local" / "state" / "leadledger"))),
            kafka_version=env("LEADLEDGER_KAFKA_VERSION", "3.9.1"),
            kafka_port=int(env("LEADLEDGER_KAFKA_PORT", "9092")),
            controller_port=int(env("LEADLEDGER_KAFKA_CONTROLLER_PORT", "9093")),
            pg_port=int(env("LEADLEDGER_PG_PORT", "55432")),
            # Outside /root: the postgres user must be able to reach it.
            pg_data=Path(env("LEADLEDGER_PG_DATA", "/var/tmp/leadledger/pg")),
            pg_databases=("leadledger", "leadledger_test"),
        )

    @property
    def kafka_libs(self) -> Path:
        return self.cache_dir / f"kafka-{self.kafka_version}" / "libs"

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def pg_dsn(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.pg_port}/leadledger"


def log(msg: str) -> None:
    print(f"[infra] {msg}", file=sys.stderr, flush=True)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(cond, deadline_s: float, what: str, interval: float = 0.2) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {deadline_s}s waiting for {what}")


# ---------------------------------------------------------------- Kafka

def fetch_kafka(cfg: InfraConfig) -> Path:
    """Copy the broker's jars into the cache with Maven, unless a previous run already did."""
    marker = cfg.kafka_libs / ".complete"
    if marker.exists():
        return cfg.kafka_libs
    if not shutil.which("mvn"):
        raise RuntimeError("Maven (mvn) is needed to fetch Kafka: apt-get install -y maven")
    log(f"fetching Apache Kafka {cfg.kafka_version} from Maven Central into {cfg.kafka_libs}")
    cfg.kafka_libs.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(DEPLOY_DIR / "kafka-pom.xml"), "dependency:copy-dependencies",
         f"-Dkafka.version={cfg.kafka_version}", f"-DoutputDirectory={cfg.kafka_libs}", "-DincludeScope=runtime"],
        check=True,
    )
    marker.touch()
    return cfg.kafka_libs


def _server_properties(cfg: InfraConfig) -> str:
    data = cfg.kafka_dir / "data"
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@127.0.0.1:{cfg.controller_port}",
        f"listeners=PLAINTEXT://127.0.0.1:{cfg.kafka_port},CONTROLLER://127.0.0.1:{cfg.controller_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{cfg.kafka_port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=12",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=12",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=12",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        "log.retention.hours=-1",
        "log.segment.bytes=268435456",
        "",
    ])


def kafka_cluster_id() -> str:
    """A new KRaft cluster id: a random UUID, base64url without padding, as Kafka's `Uuid.randomUuid()` makes it —
    never starting with "-", which the storage tool's argument parser reads as an option (1 id in 64 did, and
    `format` failed: "argument --cluster-id/-t: expected one argument")."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _java_cmd(cfg: InfraConfig, main: str, *args: str) -> list[str]:
    return [
        "java", "-Xms256m", "-Xmx1g", "-XX:+UseG1GC",
        f"-Dlog4j.configuration=file:{DEPLOY_DIR / 'kafka-log4j.properties'}",
        f"-Dkafka.logs.dir={cfg.kafka_dir / 'logs'}",
        "-cp", f"{cfg.kafka_libs}/*", main, *args,
    ]


def kafka_pid(cfg: InfraConfig) -> int | None:
    pidfile = cfg.kafka_dir / "kafka.pid"
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def kafka_up(cfg: InfraConfig, timeout_s: float = 240) -> None:
    if kafka_pid(cfg) and port_open(cfg.kafka_port):
        log(f"kafka already running on {cfg.bootstrap}")
        return
    if port_open(cfg.kafka_port):
        raise RuntimeError(f"port {cfg.kafka_port} is taken by another program; set LEADLEDGER_KAFKA_PORT")
    fetch_kafka(cfg)
    cfg.kafka_dir.mkdir(parents=True, exist_ok=True)
    (cfg.kafka_dir / "logs").mkdir(exist_ok=True)
    props = cfg.kafka_dir / "server.properties"
    props.write_text(_server_properties(cfg))
    if not (cfg.kafka_dir / "data" / "meta.properties").exists():
        fmt = ["format", "-t", kafka_cluster_id(), "-c", str(props)]
        subprocess.run(_java_cmd(cfg, "kafka.tools.StorageTool", *fmt), check=True, stdout=subprocess.DEVNULL)
    out = open(cfg.kafka_dir / "logs" / "stdout.log", "ab")
    proc = subprocess.Popen(_java_cmd(cfg, "kafka.Kafka", str(props)), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (cfg.kafka_dir / "kafka.pid").write_text(str(proc.pid))
    log(f"kafka starting (pid {proc.pid}) on {cfg.bootstrap}")
    try:
        wait_until(lambda: proc.poll() is not None or _broker_answers(cfg), timeout_s, "the Kafka broker")
    except TimeoutError:
        _print_broker_log(cfg)
        raise
    if proc.poll() is not None:
        _print_broker_log(cfg)
        raise RuntimeError(f"kafka exited with {proc.returncode}; see {cfg.kafka_dir / 'logs'}")
    log("kafka is up")


def _print_broker_log(cfg: InfraConfig, lines: int = 40) -> None:
    """What the on-call engineer needs first when the broker does not come up: the tail of its own log."""
    partitions = sum(1 for _ in (cfg.kafka_dir / "data").glob("*-[0-9]*"))
    log(f"the broker's data dir {cfg.kafka_dir / 'data'} holds {partitions} partition directories "
        "(a large number slows start-up; `leadledger infra reset` starts empty)")
    for name in ("server.log", "stdout.log"):
        path = cfg.kafka_dir / "logs" / name
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            log(f"last {len(tail)} lines of {path}:\n" + "\n".join(tail))


def _broker_answers(cfg: InfraConfig) -> bool:
    if not port_open(cfg.kafka_port):
        return False
    from services.kafka_io import broker_ready  # deferred: aiokafka is only needed once the port answers

    return broker_ready(cfg.bootstrap)


def kafka_down(cfg: InfraConfig, timeout_s: float = 60) -> None:
    pid = kafka_pid(cfg)
    if not pid:
        log("kafka is not running")
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: kafka_pid(cfg) is None or _zombie(pid), timeout_s, "kafka to stop")
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
    (cfg.kafka_dir / "kafka.pid").unlink(missing_ok=True)
    log("kafka stopped")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (FileNotFoundError, IndexError):
        return True


# ---------------------------------------------------------------- PostgreSQL

def ensure_postgres_installed() -> None:
    if (PG_BIN / "initdb").exists():
        return
    log("installing PostgreSQL from Debian's packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=True, env=env, stdout=subprocess.DEVNULL)


def _as_postgres(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=check, **kw)


def pg_running(cfg: InfraConfig) -> bool:
    if not (cfg.pg_data / "PG_VERSION").exists():
        return False
    r = _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cfg.pg_data), "status"], check=False,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode == 0


def pg_up(cfg: InfraConfig) -> None:
    ensure_postgres_installed()
    if pg_running(cfg) and port_open(cfg.pg_port):
        log(f"postgresql already running on 127.0.0.1:{cfg.pg_port}")
        return
    cfg.pg_data.parent.mkdir(parents=True, exist_ok=True)
    shutil.chown(cfg.pg_data.parent, "postgres", "postgres")
    if not (cfg.pg_data / "PG_VERSION").exists():
        cfg.pg_data.mkdir(parents=True, exist_ok=True)
        shutil.chown(cfg.pg_data, "postgres", "postgres")
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(cfg.pg_data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--locale=C"], stdout=subprocess.DEVNULL)
    conf = (f"listen_addresses='127.0.0.1' port={cfg.pg_port} unix_socket_directories='{cfg.pg_data}'"
            " fsync=on max_connections=200 shared_buffers=256MB")
    _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cfg.pg_data), "-l", str(cfg.pg_data / "server.log"),
                  "-o", " ".join(f"-c {c}" for c in conf.split()), "-w", "-t", "60", "start"],
                 stdout=subprocess.DEVNULL)
    for db in cfg.pg_databases:
        r = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(cfg.pg_port), "-U", "postgres",
                            "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{db}'"],
                           capture_output=True, text=True, check=True)
        if r.stdout.strip() != "1":
            subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(cfg.pg_port), "-U", "postgres",
                            db], check=True)
    log(f"postgresql is up on 127.0.0.1:{cfg.pg_port} (databases: {', '.join(cfg.pg_databases)})")


def pg_down(cfg: InfraConfig) -> None:
    if not pg_running(cfg):
        log("postgresql is not running")
        return
    _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(cfg.pg_data), "-m", "fast", "-w", "stop"],
                 stdout=subprocess.DEVNULL)
    log("postgresql stopped")


# ---------------------------------------------------------------- entry points

def up(cfg: InfraConfig | None = None, kafka: bool = True, postgres: bool = True) -> InfraConfig:
    cfg = cfg or InfraConfig.from_env()
    if kafka:
        kafka_up(cfg)
    if postgres:
        pg_up(cfg)
    return cfg


def down(cfg: InfraConfig | None = None, kafka: bool = True, postgres: bool = True) -> None:
    cfg = cfg or InfraConfig.from_env()
    if kafka:
        kafka_down(cfg)
    if postgres:
        pg_down(cfg)


def reset(cfg: InfraConfig | None = None) -> None:
    """Stop both servers and delete their data: the next `up` starts with an empty broker and database."""
    cfg = cfg or InfraConfig.from_env()
    down(cfg)
    shutil.rmtree(cfg.kafka_dir, ignore_errors=True)
    shutil.rmtree(cfg.pg_data, ignore_errors=True)
    log(f"deleted {cfg.kafka_dir} and {cfg.pg_data}")


def status(cfg: InfraConfig | None = None) -> dict[str, object]:
    cfg = cfg or InfraConfig.from_env()
    return {
        "kafka": {"bootstrap": cfg.bootstrap, "pid": kafka_pid(cfg), "listening": port_open(cfg.kafka_port),
                  "cached": (cfg.kafka_libs / ".complete").exists()},
        "postgres": {"dsn": cfg.pg_dsn, "running": pg_running(cfg), "listening": port_open(cfg.pg_port)},
    }
