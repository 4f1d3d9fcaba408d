"""A real single-node Kafka broker (KRaft combined mode) on 127.0.0.1, run from Maven Central jars.
(One file, longer than most: the broker's whole life — jars, config, storage, start, stop — in one place.)

    local = LocalKafka(settings)
    local.start(timeout=90)      # resolve jars once, format storage once, launch, wait for clients
    create_topics(settings)      # the project's four topics, idempotent
    local.stop()                 # SIGTERM, SIGKILL after a grace period; data stays for the next start

Everything the broker writes lives in ``settings.kafka_home``:

    server.properties  log4j2.properties  cluster.id   generated config and the storage's cluster id
    data/              KRaft metadata and topic logs (kept across restarts)
    server.log         the broker's own log (log4j2);  server.out  its stdout/stderr
    broker.pid         pid of the running broker

Jars go to ``settings.cache_dir/kafka/<version>/libs`` and are resolved by Maven once per machine;
next to them, a class-data-sharing archive (classes-*.jsa) written by the first broker that stops
cleanly makes later JVM starts cheaper.
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from hymirec.errors import HymirecError
from hymirec.settings import Settings, kafka_client_options
from stream.broker_tls import BrokerTls
from stream.kafka_errors import connection_problem

log = logging.getLogger(__name__)

LOG4J_VERSION = "2.26.1"
SLF4J_VERSION = "2.0.17"
DEPENDENCY_PLUGIN_VERSION = "3.11.0"
MIN_JAVA = 17
STOP_GRACE_S = 30.0
# G1 (Kafka's own default in kafka-run-class.sh) with short pauses; the heap is pre-touched by
# -Xms, so the broker does not grow it under load. Measured here: SerialGC starts no faster.
JVM_FLAGS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]


# --- jars -------------------------------------------------------------------------------------------
def _pom(kafka_version: str) -> str:
    deps = [
        ("org.apache.kafka", "kafka_2.13", kafka_version),
        # The command-line tools (ConsoleProducer, ConsumerGroupCommand) live apart from the broker.
        ("org.apache.kafka", "kafka-tools", kafka_version),
        # kafka_2.13's POM names slf4j but no binding: without these the broker logs nothing.
        ("org.apache.logging.log4j", "log4j-api", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
        ("org.slf4j", "slf4j-api", SLF4J_VERSION),
    ]
    dep_xml = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>hymirec</groupId>
  <artifactId>local-kafka</artifactId>
  <version>{kafka_version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dep_xml}
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{DEPENDENCY_PLUGIN_VERSION}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""


@dataclass(frozen=True)
class Java:
    path: str
    version: str  # the first line of `java -version`, e.g. 'openjdk version "17.0.15" 2025-04-15'


def _require_java() -> Java:
    path = shutil.which("java")
    if path is None:
        raise HymirecError(f"`java` not found on PATH: the local Kafka broker needs Java {MIN_JAVA}+")
    out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
    text = (out.stderr + out.stdout).strip()
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not match:
        raise HymirecError(f"cannot tell the Java version from `{path} -version`: {text[:200]!r}")
    major, minor = int(match.group(1)), int(match.group(2) or 0)
    major = minor if major == 1 else major  # "1.8.0" is Java 8
    if major < MIN_JAVA:
        raise HymirecError(f"{path} is Java {major}: the local Kafka broker needs Java {MIN_JAVA}+")
    return Java(path, text.splitlines()[0])


def _maven_error(text: str) -> str:
    """The line of Maven's output that says what failed: its first [ERROR] (the rest is advice)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    for line in lines:
        if line.startswith("[ERROR]") and line[len("[ERROR]"):].strip():
            return re.sub(r"\s*-> \[Help \d+\]$", "", line[len("[ERROR]"):].strip())
    return next((line for line in reversed(lines) if line), "no output")


# --- processes and ports ----------------------------------------------------------------------------
def _port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the JVM sets on its server sockets: a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip()
    except OSError:
        return ""


def _die_with_parent_fn():
    """A preexec_fn asking Linux to SIGKILL the broker when the thread that started it exits.

    prctl is looked up here, in the parent: after a fork of a threaded process the child must not
    take the dynamic loader's locks."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class BrokerStatus:
    running: bool
    bootstrap: str
    log_file: Path
    pid: int | None = None
    start_seconds: float | None = None  # set by start() when it launched the broker
    already_running: bool = False  # set by start() when it found the broker up
    port_taken: bool = False  # not our broker, yet something accepts on the port

    def describe(self) -> str:
        if not self.running:
            where = f"bootstrap {self.bootstrap}; log {self.log_file}"
            if self.port_taken:
                return f"kafka not running from this kafka_home, but another process accepts on {self.bootstrap} ({where})"
            return f"kafka not running ({where})"
        how = ""
        if self.start_seconds is not None:
            how = f", started in {self.start_seconds:.1f} s"
        elif self.already_running:
            how = ", already running"
        return f"kafka running (pid {self.pid}) on {self.bootstrap}, log {self.log_file}{how}"


class LocalKafka:
    """The local broker of one ``settings.kafka_home``; every method can be called from a new process."""

    def __init__(self, settings: Settings, *, die_with_parent: bool = False) -> None:
        self.settings = settings
        self.home = Path(settings.kafka_home).absolute()
        self.jar_root = Path(settings.cache_dir).absolute() / "kafka" / settings.kafka_version
        self.libs = self.jar_root / "libs"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "server.log"
        self.out_file = self.home / "server.out"
        self.config_file = self.home / "server.properties"
        self.data_dir = self.home / "data"
        self.tls = BrokerTls(self.home)
        # Written when the storage is formatted with SCRAM users: their names, one a line.
        self.scram_users_file = self.home / "scram.users"
        # Tests set this so a killed pytest does not leave a JVM behind (Linux only: the broker dies
        # with the *thread* that started it); `hymirec kafka start` must not.
        self.die_with_parent = die_with_parent

    # --- jars ------------------------------------------------------------------------------------
    def ensure_jars(self) -> Path:
        """Resolve the broker's jars into the cache (once per machine and version); returns libs/."""
        done = self.jar_root / "libs.done"
        pom = _pom(self.settings.kafka_version)
        if self._resolved(done, pom):
            return self.libs
        _require_java()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise HymirecError("`mvn` (Apache Maven) not found on PATH: it fetches the Kafka jars from Maven Central once")
        self.jar_root.mkdir(parents=True, exist_ok=True)
        # Two processes (two pytest runs, CLI + tests) may race here: the second waits for the first.
        with open(self.jar_root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._resolved(done, pom):
                return self.libs
            (self.jar_root / "pom.xml").write_text(pom)
            staging = self.jar_root / "libs.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            maven_log = self.jar_root / "maven.log"
            started = time.monotonic()
            with open(maven_log, "w") as out:
                proc = subprocess.run(
                    [mvn, "-q", "-B", "-U", "-f", str(self.jar_root / "pom.xml"),
                     "dependency:copy-dependencies", "-DincludeScope=runtime",
                     f"-DoutputDirectory={staging}"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.jar_root,
                )
            if proc.returncode != 0 or not all(any(staging.glob(f"{jar}-*.jar")) for jar in ("kafka_2.13", "kafka-tools")):
                line = _maven_error(maven_log.read_text(errors="replace"))
                raise HymirecError(f"Maven could not fetch the Kafka {self.settings.kafka_version} jars: {line} (full log: {maven_log})")
            shutil.rmtree(self.libs, ignore_errors=True)
            staging.rename(self.libs)
            done.write_text(f"{time.monotonic() - started:.1f} s\n")
            log.info("kafka jars resolved into %s in %.1f s", self.libs, time.monotonic() - started)
        return self.libs

    def _resolved(self, done: Path, pom: str) -> bool:
        """Jars resolved, and from this POM: a cache filled before a dependency was added resolves again."""
        recorded = self.jar_root / "pom.xml"
        return done.exists() and recorded.exists() and recorded.read_text() == pom

    # --- state -----------------------------------------------------------------------------------
    def _recorded_pid(self) -> int | None:
        """The pid in broker.pid if that process is alive and is this home's broker (not a reused pid)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                # Our own child that already exited: reap it so the pid is really gone.
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                return None
            if str(self.config_file) not in proc.cmdline():
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid

    def status(self) -> BrokerStatus:
        pid = self._recorded_pid()
        accepting = _port_accepts(self.settings.kafka_port)
        return BrokerStatus(
            running=pid is not None and accepting,
            bootstrap=self.settings.kafka_bootstrap,
            log_file=self.log_file,
            pid=pid,
            port_taken=pid is None and accepting,
        )

    # --- start -----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        s = self.settings
        port, cport = s.kafka_port, s.kafka_controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(s.partitions),
            "default.replication.factor": "1",
            "auto.create.topics.enable": "true",  # faust creates its changelog/repartition topics
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # 50 partitions each (the defaults) cost seconds of start-up and files for nothing on one node.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            # The local log is the dataset: replayed events carry their original (years-old)
            # timestamps, which time-based retention would delete.
            "log.retention.ms": "-1",
        }
        if s.kafka_sasl:
            self.tls.ensure()
            props |= self.tls.properties(s, port, cport)
        # 0600: under SASL_SSL it holds the broker's own SCRAM password.
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / "log4j2.properties").write_text(f"""\
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {self.log_file}
appender.file.filePattern = {self.log_file}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
""")

    def _cds_archive(self, java: Java) -> Path:
        """Class-data-sharing archive of the broker's classes, per jar set and JDK build.

        The first broker run writes it at exit (-XX:ArchiveClassesAtExit); later JVMs map it instead
        of parsing and verifying ~10k classes again. A stale or damaged archive is ignored by the JVM."""
        build = hashlib.sha1(java.version.encode()).hexdigest()[:10]
        return self.jar_root / f"classes-{build}.jsa"

    def _java_cmd(self, java: Java, main: str, *args: str, heap: str | None = None,
                  cds: Sequence[str] = ()) -> list[str]:
        mem = [f"-Xmx{heap}", f"-Xms{heap}"] if heap else []
        return [java.path, *mem, *JVM_FLAGS, *cds,
                f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.home}",
                "-cp", f"{self.libs}/*", main, *args]

    def _format_storage(self, java: Java) -> None:
        """Format the KRaft log dir once; later starts reuse its data (and its cluster id).

        Under SASL_SSL the SCRAM users (the settings' and the broker's own) are part of the format:
        KRaft keeps them in its metadata, so a storage formatted without them cannot serve SASL_SSL."""
        s = self.settings
        if (self.data_dir / "meta.properties").exists():
            users = self.scram_users_file.read_text().split() if self.scram_users_file.exists() else []
            if s.kafka_sasl and s.kafka_sasl_username not in users:
                raise HymirecError(f"the local broker's storage in {self.data_dir} was formatted without the SCRAM user "
                                   f"{s.kafka_sasl_username!r}: point HYMIREC_KAFKA_HOME at a new directory for SASL_SSL")
            return
        id_file = self.home / "cluster.id"
        if not id_file.exists():
            cluster_id = "-"
            while cluster_id.startswith("-"):  # Kafka's own ids never start with '-' (CLI ambiguity)
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            id_file.write_text(cluster_id + "\n")
        cluster_id = id_file.read_text().strip()
        archive = self._cds_archive(java)
        cds = [f"-XX:SharedArchiveFile={archive}"] if archive.exists() else []
        tool = ["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(self.config_file)]
        # The passwords go through a java @argument file (0600, removed at once), not the process list.
        argfile = self.home / "format.args"
        fd = os.open(argfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(f"'{arg}'" for arg in tool + (self.tls.scram_arguments(s) if s.kafka_sasl else [])))
        try:
            proc = subprocess.run(self._java_cmd(java, f"@{argfile}", cds=cds), capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=120)
        finally:
            argfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
            raise HymirecError(f"formatting Kafka storage in {self.data_dir} failed: {lines[-1] if lines else 'no output'}")
        if s.kafka_sasl:
            self.scram_users_file.write_text(f"{s.kafka_sasl_username}\n")

    def start(self, timeout: float = 90.0) -> BrokerStatus:
        """Start the broker unless it runs already; wait until it answers a metadata request.

        ``timeout`` counts from the JVM's launch: resolving the jars (first run) and formatting the
        storage (first start of a kafka_home) come on top."""
        s = self.settings
        host = s.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost"):
            raise HymirecError(f"kafka_bootstrap is {s.kafka_bootstrap}: the local broker serves 127.0.0.1 only; "
                               f"point HYMIREC_KAFKA_BOOTSTRAP at 127.0.0.1:PORT to run it")
        started = time.monotonic()
        current = self.status()
        if current.running:
            return BrokerStatus(True, s.kafka_bootstrap, self.log_file, current.pid, already_running=True)
        if current.pid is not None:  # launched by another process and still starting
            log.info("waiting for kafka broker pid %d, started elsewhere, to accept clients", current.pid)
            self._wait_ready(psutil.Process(current.pid), started + timeout)
            return BrokerStatus(True, s.kafka_bootstrap, self.log_file, current.pid, already_running=True)
        for what, port in (("bootstrap", s.kafka_port), ("controller", s.kafka_controller_port)):
            if not _port_free(port):
                raise HymirecError(f"port {port} on 127.0.0.1 ({what}) is already in use by another process: "
                                   f"stop it or choose other ports (HYMIREC_KAFKA_BOOTSTRAP, HYMIREC_KAFKA_CONTROLLER_PORT)")
        java = _require_java()
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._format_storage(java)
        if s.kafka_sasl:
            self.tls.check_clients_trust(s)

        archive = self._cds_archive(java)
        cds = ([f"-XX:SharedArchiveFile={archive}"] if archive.exists()
               else [f"-XX:ArchiveClassesAtExit={self.home / archive.name}"])
        cmd = self._java_cmd(java, "kafka.Kafka", str(self.config_file), heap=s.kafka_heap, cds=cds)
        with open(self.out_file, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                start_new_session=True, preexec_fn=_die_with_parent_fn() if self.die_with_parent else None,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        self._wait_ready(psutil.Process(proc.pid), time.monotonic() + timeout)
        return BrokerStatus(True, s.kafka_bootstrap, self.log_file, proc.pid,
                            start_seconds=time.monotonic() - started)

    def _wait_ready(self, proc: psutil.Process, deadline: float) -> None:
        """Wait until the broker answers clients; stop it and explain if it dies or stays silent."""
        while True:
            try:
                alive = proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                try:
                    code = proc.wait(5)  # reaps our own child; None for another process's
                except psutil.Error:
                    code = None
                self.pid_file.unlink(missing_ok=True)
                tail = _tail(self.out_file) or _tail(self.log_file)
                raise HymirecError(f"the Kafka broker exited{f' with code {code}' if code is not None else ''} "
                                   f"while starting; last lines of {self.out_file}:\n{tail}")
            if _port_accepts(self.settings.kafka_port) and _answers_metadata(self.settings):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise HymirecError(f"the Kafka broker did not accept clients in time: {connection_problem(self.settings)}; "
                                   f"last lines of {self.log_file}:\n{_tail(self.log_file)}")
            time.sleep(0.25)

    # --- stop ------------------------------------------------------------------------------------
    def stop(self) -> bool:
        """Stop the recorded broker (SIGTERM, then SIGKILL after a grace period). True if one ran."""
        pid = self._recorded_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        proc = psutil.Process(pid)
        dump = next((Path(arg.split("=", 1)[1]) for arg in proc.cmdline()
                     if arg.startswith("-XX:ArchiveClassesAtExit=")), None)
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except psutil.TimeoutExpired:
            log.warning("kafka broker pid %d ignored SIGTERM for %.0f s; killing it", pid, STOP_GRACE_S)
            proc.kill()
            proc.wait(10)
            if dump is not None:  # killed while dumping, perhaps: drop the half-written archive
                dump.unlink(missing_ok=True)
                dump = None
        self.pid_file.unlink(missing_ok=True)
        if dump is not None and dump.exists():
            self._keep_cds_dump(dump)
        return True

    def _keep_cds_dump(self, dump: Path) -> None:
        """Move the class archive the broker wrote at exit into the jar cache, atomically."""
        target = self.jar_root / dump.name
        if not target.exists():
            staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(dump, staging)
            os.replace(staging, target)
        dump.unlink()


# --- clients ----------------------------------------------------------------------------------------
def _admin(settings: Settings, timeout_ms: int = 10_000):
    from kafka.admin import KafkaAdminClient

    # api_version left unset: the client asks the broker which protocol versions it speaks.
    return KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="hymirec-admin",
                            request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms,
                            **kafka_client_options(settings))


def _answers_metadata(settings: Settings) -> bool:
    from kafka.errors import KafkaConfigurationError, KafkaError

    try:
        admin = _admin(settings, timeout_ms=5_000)
    except KafkaConfigurationError:
        raise  # a bug here, not a broker that is still starting
    except (KafkaError, OSError):
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def create_topics(settings: Settings, partitions: int | None = None) -> list[str]:
    """Create ``settings.topics`` if missing (idempotent) and wait until metadata shows them.

    An existing topic with another partition count is an error: Faust tables must be
    co-partitioned with their source topics, so a silent mismatch would surface much later.
    """
    from kafka.errors import KafkaConfigurationError, KafkaError, TopicAlreadyExistsError, for_code

    wanted = settings.topic_partitions(partitions)
    names = list(wanted)
    # Refused connections fail at once here instead of after the client's bootstrap timeout.
    if not any(_port_accepts(int(port), host) for host, _, port in
               (server.strip().rpartition(":") for server in settings.kafka_bootstrap.split(","))):
        raise HymirecError(connection_problem(settings))
    try:
        admin = _admin(settings)
    except KafkaConfigurationError:
        raise
    except (KafkaError, OSError):
        raise HymirecError(connection_problem(settings)) from None
    try:
        # replication_factor -1: the broker's default (1 on the local broker, the cluster's elsewhere).
        result = admin.create_topics({n: {"num_partitions": wanted[n], "replication_factor": -1} for n in names},
                                     raise_errors=False)
        for topic in result["topics"]:
            error = for_code(topic["error_code"])
            if topic["error_code"] and error is not TopicAlreadyExistsError:
                raise HymirecError(f"creating topic {topic['name']!r} on {settings.kafka_bootstrap} failed: "
                                   f"{error.__name__} {topic.get('error_message') or ''}".rstrip())
        admin.wait_for_topics(names, timeout_ms=30_000)
        for topic in admin.describe_topics(names):
            have, want = len(topic["partitions"]), wanted[topic["name"]]
            if have != want:
                fix = "delete it (the catalogue is replayed from its log)" if topic["name"] == settings.topic_items \
                    else f"delete it or set HYMIREC_PARTITIONS={have}"
                raise HymirecError(f"topic {topic['name']!r} exists with {have} partitions, not {want}: {fix}")
    except KafkaError as exc:
        raise HymirecError(f"creating topics on {settings.kafka_bootstrap} failed: {type(exc).__name__}: {exc}") from None
    finally:
        admin.close()
    return names
