"""The configuration: one TOML file, overridable by SORTLINE_* variables.

It has two halves. The **machine** (`Machine`: belt, cameras, valve bar,
ejector, model, calibration, recipe, ...) is what the nodes are given: the
facts about the sorting machine they work on. The **graph** (nodes, edges)
and the runtime's own sections (supervisor, metrics, security, clock) are
what the runtime needs to start them and wire them together; `Settings` is
both, as read from the file.

Every section forbids unknown keys (pydantic-settings would otherwise drop a
misspelt key in a nested table without a word), a missing file is an error,
and a bad value stops start-up with one line per problem naming the key, the
value and what is allowed. Figures that follow from others (line rates, the
latency budget) are computed here, never typed into the file.

Environment overrides use `__` between levels, e.g.
SORTLINE_BELT__SPEED_M_S=3 or SORTLINE_GRAPH__RUNTIME_DIR=/run/sortline.

File paths in the file (calibration, model, keys) are relative to the file
itself; a path of the form `shipped:NAME` names a file that comes with
sortline (the model's reader resolves it).

A file may extend another (`extends = "production.toml"`, relative to it):
its tables are merged into the other's, key by key, its `[[edges]]` are
added, and `drop_nodes` names nodes of the other file to leave out together
with their edges. That is how a machine's simulated twin says only what
differs from the machine (configs/production-twin.toml).
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

EX_CONFIG = 78  # sysexits.h: configuration error; the supervisor never restarts on it


class ConfigError(Exception):
    """A configuration that cannot be used; str() is one line per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class Section(BaseModel):
    # Numbers are finite: an inf or nan passes every range check and breaks what is computed from it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The machine. The bounds are physical ones, lower bounds included: the derived figures divide by them, and a
# denormal belt speed would make the latency budget infinite.

class Belt(Section):
    width_mm: float = Field(ge=1, le=5000)
    speed_m_s: float = Field(ge=0.01, le=10, description="nominal belt speed")
    ticks_per_mm: float = Field(ge=0.01, le=10_000, description="encoder ticks per mm of belt travel")


class LineCamera(Section):
    pixels: int = Field(gt=0, le=16384, description="pixels across the belt")
    mm_per_pixel: float = Field(ge=0.001, le=1000)
    ticks_per_line: int = Field(gt=0, description="encoder ticks between two line triggers")
    lines_per_frame: int = Field(gt=0, le=65536, description="lines the camera delivers per frame")
    bands: int = Field(gt=0, le=1024)
    wavelength_nm: tuple[float, float] | None = None
    scan_line_mm: float = Field(0.0, ge=-10_000, le=10_000,
                                description="along-belt position of the scan line, downstream of the RGB scan line")


class Cameras(Section):
    rgb: LineCamera
    hsi: LineCamera

    @model_validator(mode="after")
    def _integer_ratio(self):
        if self.hsi.ticks_per_line % self.rgb.ticks_per_line:
            raise ValueError(
                f"hsi.ticks_per_line ({self.hsi.ticks_per_line}) must be a whole multiple of "
                f"rgb.ticks_per_line ({self.rgb.ticks_per_line}): the RGB:HSI ratio is an integer"
            )
        return self


class ValveBar(Section):
    count: int = Field(gt=0, le=1024)
    pitch_mm: float = Field(ge=0.1, le=1000)
    offset_mm: float = Field(0.0, ge=-10_000, le=10_000, description="cross-belt position of valve 0's centre")
    distance_mm: float = Field(gt=0, le=10_000, description="along-belt distance from the RGB scan line to the valve bar")
    open_ms: float = Field(ge=0, le=100, description="valve response time, opening")
    close_ms: float = Field(ge=0, le=100, description="valve response time, closing")
    min_pulse_ms: float = Field(2.0, gt=0, le=10_000)
    max_pulse_ms: float = Field(200.0, gt=0, le=10_000)

    @model_validator(mode="after")
    def _pulses(self):
        if self.min_pulse_ms > self.max_pulse_ms:
            raise ValueError(f"valve_bar.min_pulse_ms ({self.min_pulse_ms:g}) is above max_pulse_ms "
                             f"({self.max_pulse_ms:g})")
        return self


def host_port(address: str) -> tuple[str, int]:
    """HOST:PORT, the port within 1..65535, or ValueError saying what is wrong."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port)


class Ejector(Section):
    driver: Literal["sim", "udp"] = "sim"
    address: str = "127.0.0.1:5700"
    key: str = Field("", description="the valve controller's key (sortline keys NAME --valve): every datagram "
                     "is authenticated with it; the controller (or the valve-bar simulator) has the same")

    @field_validator("address")
    @classmethod
    def _address(cls, value):
        host_port(value)
        return value

    driver_latency_ms: float = Field(1.0, ge=0, le=1000)
    margin_before_mm: float = Field(5.0, ge=0, le=1000)
    margin_after_mm: float = Field(5.0, ge=0, le=1000)


class Model(Section):
    path: str = Field("", description="the model: a checkpoint (.safetensors), an ONNX export or a TensorRT "
                      "engine; shipped:NAME for one that comes with sortline")
    backend: Literal["onnxruntime", "onnxruntime-cuda", "tensorrt", "torch"] = "onnxruntime"
    strip_lines: int = Field(128, gt=0, description="RGB lines per strip")
    overlap_lines: int = Field(16, ge=0, description="RGB lines of context on each side of a strip")
    bands: int = Field(32, gt=0, le=1024, description="HSI bands fed to the model: the camera's bands binned into this many equal groups")
    band_ranges: list[tuple[int, int]] = Field(
        [], description="instead of equal groups: the camera bands [start, end) averaged into each model band")
    threads: int = Field(1, ge=1, le=64)
    mask_stride: Literal[1, 2, 4] = Field(
        1, description="the class mask on a grid this many RGB pixels coarser along and across (4: the "
        "model's finest grid, 3.75 mm on the demo profile; a valve lane is 12.5 mm): cheaper to make and "
        "to turn into objects")
    device: int = Field(0, ge=0, le=64, description="the GPU the tensorrt and onnxruntime-cuda backends run on "
                        "(CUDA's device index; 0: the first); replica i of the infer node runs on device + i")


class CalibrationFiles(Section):
    spectral: str = Field("", description="HSI dark/white reference (sortline calibrate spectral)")
    spatial: str = Field("", description="RGB-HSI co-registration (sortline calibrate spatial)")


class GenICamSettings(Section):
    cti: list[str] = Field([], description="GenTL producers (.cti files) every acquire node loads; "
                           "empty: those in GENICAM_GENTL64_PATH")


class Budget(Section):
    margin_ms: float = Field(5.0, ge=0, le=10_000, description="safety margin kept out of the latency budget")


class Recipe(Section):
    targets: list[str] = Field(["PET"], min_length=1, description="the classes this machine ejects, by the "
                               "names the model gives them; a name the model does not know stops start-up")
    priority: Literal["purity", "balanced", "recovery"] = Field(
        "balanced", description="what the air gives way to: purity leaves out more of a target's air to spare "
        "the objects beside it, recovery none (docs/ejection.md, 'Air per valve lane')")


class Machine(Section):
    """The sorting machine: what every node is given (never the graph or the runtime's sections)."""

    profile: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    belt: Belt
    cameras: Cameras
    valve_bar: ValveBar
    ejector: Ejector = Ejector()
    model: Model = Model()
    calibration: CalibrationFiles = CalibrationFiles()
    budget: Budget = Budget()
    genicam: GenICamSettings = GenICamSettings()
    recipe: Recipe = Recipe()

    @model_validator(mode="after")
    def _strips_fit_both_grids(self):
        # A strip and its overlap must cover whole HSI lines, and the RGB line whole HSI pixels,
        # so that both grids of a strip cover the same belt region.
        r = self.cameras.hsi.ticks_per_line // self.cameras.rgb.ticks_per_line
        m, k = self.model, self.model.mask_stride
        for key in ("strip_lines", "overlap_lines"):
            value = getattr(m, key)
            if value % r:
                raise ValueError(f"model.{key} = {value} must be a multiple of the RGB:HSI ratio {r}")
            if value % k:
                raise ValueError(f"model.{key} = {value} must be a multiple of model.mask_stride = {k}")
        if self.cameras.rgb.pixels % k:
            raise ValueError(f"cameras.rgb.pixels = {self.cameras.rgb.pixels} must be a multiple of model.mask_stride = {k}")
        if self.cameras.rgb.pixels % r:
            raise ValueError(f"cameras.rgb.pixels = {self.cameras.rgb.pixels} must be a multiple of the RGB:HSI ratio {r}")
        bands = self.cameras.hsi.bands
        if m.band_ranges:
            if len(m.band_ranges) != m.bands:
                raise ValueError(f"model.band_ranges has {len(m.band_ranges)} ranges; model.bands = "
                                 f"{m.bands}: one range per model band")
            ends = [b for _, b in m.band_ranges]
            if any(not 0 <= a < b <= bands for a, b in m.band_ranges) or any(
                    a < end for (a, _), end in zip(m.band_ranges[1:], ends)):
                raise ValueError(f"model.band_ranges must be increasing, non-overlapping [start, end) within "
                                 f"0..{bands}: {m.band_ranges}")
        elif bands % m.bands:
            raise ValueError(f"model.bands = {m.bands} must divide cameras.hsi.bands = {bands} "
                             "(equal groups of bands), or give model.band_ranges")
        return self

    # Derived figures: one place computes them, everything else reads them.

    def line_rate_hz(self, camera: str, speed_m_s: float | None = None) -> float:
        cam = getattr(self.cameras, camera)
        speed = self.belt.speed_m_s if speed_m_s is None else speed_m_s
        return speed * 1000.0 * self.belt.ticks_per_mm / cam.ticks_per_line

    @property
    def hsi_ratio(self) -> int:
        return self.cameras.hsi.ticks_per_line // self.cameras.rgb.ticks_per_line

    def budget_ms(self, speed_m_s: float | None = None) -> float:
        """Time from the last scan line seeing an object to its valve command."""
        speed = self.belt.speed_m_s if speed_m_s is None else speed_m_s
        return self.travel_mm() / speed - self.valve_bar.open_ms - self.budget.margin_ms

    def travel_mm(self) -> float:
        """Distance from the scan line farther downstream to the valve bar."""
        last_scan = max(self.cameras.rgb.scan_line_mm, self.cameras.hsi.scan_line_mm)
        return self.valve_bar.distance_mm - last_scan

    def budget_derivation(self, speed_m_s: float | None = None) -> str:
        speed = self.belt.speed_m_s if speed_m_s is None else speed_m_s
        return (
            f"{self.travel_mm():.0f} mm scan line to valve bar / {speed:g} m/s = {self.travel_mm() / speed:.1f} ms"
            f" - {self.valve_bar.open_ms:g} ms valve opening - {self.budget.margin_ms:g} ms margin"
            f" = {self.budget_ms(speed):.1f} ms"
        )


# The graph and the runtime.

class GraphSettings(Section):
    name: str = Field("sortline", pattern=r"^[A-Za-z0-9_.-]+$")
    runtime_dir: str = Field("", description="private directory for ipc sockets and shared memory; empty: automatic")


class NodeConfig(Section):
    kind: str
    params: dict[str, Any] = {}
    cpus: list[int] = Field([], description="CPU cores the node's process may run on; empty: any. Give the "
                            "heaviest stage a core of its own so that the others cannot delay it. With "
                            "replicas = N, each replica gets an equal share in order: N entries, one core each")
    replicas: int = Field(1, ge=1, le=64, description="processes running this node side by side (data "
                          "parallel): the producer upstream sends each message to one of them, round robin, and "
                          "the consumer downstream receives their messages merged back in sequence order")
    reorder_window: int = Field(8, ge=1, le=1024, description="with replicas: messages the consumer downstream "
                                "holds, at most, while it waits for an earlier one (then the earlier one is a gap)")
    reorder_timeout_ms: float = Field(50.0, gt=0, le=60_000, description="with replicas: the longest a message "
                                      "waits for an earlier one before that one is a gap")


def each(value: str | list[str]) -> list[str]:
    """An edge's address, bind or server_key as a list (a list has one entry per replica)."""
    return list(value) if isinstance(value, list) else [value]


class EdgeConfig(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    src: str = Field(alias="from", pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_]+$")
    dst: str = Field(alias="to", pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_]+$")
    policy: Literal["lossless", "bounded", "latest"] = "lossless"
    pattern: Literal["pushpull", "pubsub"] = "pushpull"
    transport: Literal["auto", "shm", "inline"] = "auto"
    # At a replicated end (a node with replicas = N) address, bind and server_key are lists of N, one per
    # replica: the replicas may be on different hosts.
    address: str | list[str] = Field("", description="what the consumer connects to; empty: ipc in the runtime "
                                     "directory")
    bind: str | list[str] = Field("", description="what the producer binds; empty: the address")
    hwm: int = Field(4, ge=1, le=100000)
    slots: int = Field(0, ge=0, le=64, description="shared-memory slots; 0: hwm + 4, or hwm x replicas + 4 into a "
                       "replicated node (at most 64)")
    server_key: str | list[str] = Field("", description="with security.curve: the public certificate (sortline "
                                        "keys) of the producer's host, which the consumer checks")

    @model_validator(mode="after")
    def _consistent(self):
        if self.pattern == "pubsub" and self.policy == "lossless":
            raise ValueError("a pubsub edge cannot be lossless (a publisher never waits); use pushpull")
        for addr in each(self.address) + each(self.bind):
            if addr and not addr.startswith(("ipc://", "tcp://")):
                raise ValueError(f"address {addr!r} must start with ipc:// or tcp://")
        if self.transport == "shm" and any(a.startswith("tcp://") for a in each(self.address)):
            raise ValueError("shared memory only works between processes on one host; a tcp edge is inline")
        return self


class MetricsSettings(Section):
    bind: str = "127.0.0.1"
    port_base: int = Field(0, ge=0, le=65000, description="0: no Prometheus endpoint; else node i serves port_base + i")


class Security(Section):
    curve: bool = Field(False, description="authenticate and encrypt tcp edges with CURVE")
    key: str = Field("", description="this host's secret certificate (NAME.key_secret from sortline keys)")
    authorized: str = Field("", description="directory of the public certificates (*.key) of the hosts "
                            "allowed to connect to this host's producers")

    @model_validator(mode="after")
    def _keys_given(self):
        if self.curve and not (self.key and self.authorized):
            raise ValueError("security.curve needs security.key and security.authorized (see `sortline keys`)")
        return self


class Clock(Section):
    ptp_synchronised: bool = Field(False, description="the hosts' system clocks are disciplined by PTP "
                                   "(linuxptp): only then is latency across a tcp edge reported")


class OpcUa(Section):
    """The OPC UA server towards the line's PLC, run by the supervisor (docs/plc.md)."""

    enabled: bool = Field(False, description="serve the machine's state, counters, alarms and recipe over OPC UA")
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/sortline", pattern=r"^opc\.tcp://[^/:]+:\d{1,5}(/.*)?$",
                          description="where the server listens (opc.tcp://HOST:PORT/PATH; 0.0.0.0: every interface)")
    security: Literal["sign_encrypt", "none"] = Field(
        "sign_encrypt", description="sign_encrypt: Basic256Sha256 Sign&Encrypt only, clients with a trusted "
        "certificate only, no anonymous session; none: no security, anonymous sessions (a demo on one host)")
    certificate: str = Field("", description="the server's certificate (DER), from `sortline keys NAME --opcua`")
    private_key: str = Field("", description="the server's private key (PEM)")
    trusted: str = Field("", description="directory of the client certificates (DER or PEM) allowed to connect")
    drops_alarm_per_s: float = Field(1.0, ge=0, description="the Drops alarm is active while the graph drops more "
                                     "messages a second than this")
    valve_silent_s: float = Field(2.0, gt=0, le=600, description="the ValveControllerSilent alarm: no valve "
                                  "command went out for this long while objects were decided for ejection")

    @model_validator(mode="after")
    def _certificates_given(self):
        if self.enabled and self.security == "sign_encrypt" and not (self.certificate and self.private_key
                                                                      and self.trusted):
            raise ValueError("opcua.security = 'sign_encrypt' needs opcua.certificate, opcua.private_key and "
                             "opcua.trusted (make them with `sortline keys NAME --opcua`)")
        return self


class SupervisorSettings(Section):
    restart_backoff_s: float = Field(0.2, gt=0, le=60)
    restart_backoff_max_s: float = Field(10.0, gt=0, le=600)
    spare: bool = Field(True, description="keep one node process started and waiting (its Python and modules "
                        "loaded, the configuration checked), so that a node that dies is back after its setup "
                        "instead of a whole process start; costs one idle process")
    heartbeat_s: float = Field(0.5, gt=0, le=60)
    heartbeat_timeout_s: float = Field(5.0, gt=0, le=600)
    start_timeout_s: float = Field(120.0, gt=0, le=3600, description="how long the sources wait for the other "
                                   "nodes' setup (a model or engine loading, a camera opening) before they start "
                                   "anyway; a setup that ends earlier starts them at once")
    status_every_s: float = Field(2.0, gt=0)


class Settings(BaseSettings, Machine):
    """The whole file: the machine, the graph and the runtime's sections."""

    model_config = SettingsConfigDict(env_prefix="SORTLINE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    graph: GraphSettings = GraphSettings()
    metrics: MetricsSettings = MetricsSettings()
    security: Security = Security()
    clock: Clock = Clock()
    supervisor: SupervisorSettings = SupervisorSettings()
    opcua: OpcUa = OpcUa()
    nodes: dict[str, NodeConfig]
    edges: list[EdgeConfig] = []

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        file_data = getattr(settings_cls, "file_data", None)
        if file_data is not None:   # below the environment: SORTLINE_* overrides the file
            sources += (InitSettingsSource(settings_cls, init_kwargs=file_data),)
        return sources

    def machine(self) -> Machine:
        """The machine half, as the nodes get it (already validated: not checked again)."""
        return Machine.model_construct(**{key: getattr(self, key) for key in Machine.model_fields})

    def runtime_dir(self) -> Path:
        if self.graph.runtime_dir:
            return Path(self.graph.runtime_dir)
        if os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
            return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / self.graph.name
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        return base / f"sortline-{os.getuid()}" / self.graph.name


def cache_dir() -> Path:
    """Where derived files (ONNX exports, generated training strips) are kept: $SORTLINE_CACHE, the
    unit's CacheDirectory= under systemd, else the XDG cache directory. Never beside the package."""
    for var in ("SORTLINE_CACHE", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sortline"


def _one_line(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            lines.append(f"{key}: missing, this key is required")
        elif not key:   # a check across sections names its keys itself
            lines.append(msg)
        else:
            lines.append(f"{key} = {_one_line(err.get('input'))}: {msg}")
    return lines


def _has_scheme(path: str) -> bool:
    return ":" in path and not os.path.isabs(path) and "/" not in path.split(":", 1)[0]


def _beside(path: Path, v: str) -> str:
    """A file the configuration at `path` names: relative paths start beside that file."""
    return str((path.parent / v).resolve()) if v and not os.path.isabs(v) and not _has_scheme(v) else v


# Where a file names other files: (table, key) pairs, and each edge's server_key.
_PATH_KEYS = (("calibration", "spectral"), ("calibration", "spatial"), ("model", "path"), ("ejector", "key"),
              ("security", "key"), ("security", "authorized"),
              ("opcua", "certificate"), ("opcua", "private_key"), ("opcua", "trusted"))


def _beside_keys(path: Path, keys):
    """An edge's server_key beside the file: one, or a list of one per replica (anything else is left to
    validation)."""
    if isinstance(keys, list):
        return [_beside(path, k) if isinstance(k, str) else k for k in keys]
    return _beside(path, keys) if isinstance(keys, str) else keys


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"config file {path}: not found"])
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {path}: not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"config file {path}: {exc.strerror}"]) from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def compose(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The file's tables with what it extends merged in (module docstring). Paths that the extended
    file names are made absolute first, so that each stays relative to the file that states it."""
    data = _read_toml(path)
    if "extends" not in data:
        if "drop_nodes" in data:
            raise ConfigError([f"{path}: drop_nodes: only a file that extends another can drop its nodes"])
        return data
    extends, drop = data.pop("extends"), data.pop("drop_nodes", [])
    if not isinstance(extends, str) or not isinstance(drop, list) or not all(isinstance(n, str) for n in drop):
        raise ConfigError([f"{path}: extends is a file name and drop_nodes a list of node names"])
    base_path = Path(_beside(path, extends))
    if base_path in (*seen, path.resolve()):
        raise ConfigError([f"{path}: extends {extends}, which extends it back"])
    base = compose(base_path, (*seen, path.resolve()))
    for table, key in _PATH_KEYS:
        if isinstance(base.get(table, {}).get(key), str):
            base[table] = {**base[table], key: _beside(base_path, base[table][key])}
    nodes = base.get("nodes", {})
    unknown = [n for n in drop if n not in nodes]
    if unknown:
        raise ConfigError([f"{path}: drop_nodes: {', '.join(unknown)}: no such node in {base_path}"])
    base["nodes"] = {name: cfg for name, cfg in nodes.items() if name not in drop}
    kept = [dict(e, server_key=_beside_keys(base_path, e["server_key"])) if "server_key" in e else e
            for e in base.get("edges", [])
            if not any(str(e.get(end, "")).split(".")[0] in drop for end in ("from", "to"))]
    edges = data.pop("edges", [])
    merged = _merge(base, data)
    merged["edges"] = kept + (edges if isinstance(edges, list) else [edges])
    return merged


def read_config(path: str | os.PathLike) -> Settings:
    """Read and validate a configuration file, or raise ConfigError. (pipeline.graph.load_config
    checks its graph too: what the commands and nodes use.)"""
    path = Path(path)

    class FileSettings(Settings):
        file_data: ClassVar[dict] = compose(path)

    try:
        settings = FileSettings()
    except ValidationError as exc:
        raise ConfigError([f"{path}: {line}" for line in format_validation(exc)]) from None

    # After validation, so that SORTLINE_* overrides of these paths start beside the file too.
    update: dict[str, Any] = {}
    for table, key in _PATH_KEYS:
        section = update.get(table, getattr(settings, table))
        update[table] = section.model_copy(update={key: _beside(path, getattr(section, key))})
    update["edges"] = [e.model_copy(update={"server_key": _beside_keys(path, e.server_key)}) for e in settings.edges]
    return settings.model_copy(update=update)


def config_toml(settings: Settings) -> str:
    """The configuration as TOML that read_config reads back to the same Settings
    (with SORTLINE_* overrides applied): what a recording attaches, and what a
    rewritten graph (replay, --record) runs from."""
    return tomli_w.dumps(settings.model_dump(mode="json", by_alias=True, exclude_none=True))
