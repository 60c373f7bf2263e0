"""The PLC's side: the OPC UA server of a running graph, recipes changed at run time, the audit log.

The graphs here are the demo profile's on a belt that waits for the graph (the unpaced rewrite of `sortline
score`), so that a busy two-core machine cannot stretch the belt under them. The PLC's recipe change runs the
whole demo graph, the shipped model included: what it must show is what the line would sort after the change.
The others, which check how a change travels (the command line, the service, alarms, certificates), take the
belt's truth for the model's masks, which starts sooner and leaves the model out of what
they measure.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

asyncua = pytest.importorskip("asyncua")
from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402

from conftest import ROOT, chain, demo_toml, free_port, sortline, start, stop, write_config  # noqa: E402
from sortline.cli.common import by_position  # noqa: E402
from sortline.pipeline.config import config_toml, read_config  # noqa: E402
from sortline.pipeline.graph import source_nodes, topo_order  # noqa: E402

SPEED_TICKS = 2.0 * 1000 * 16   # the demo belt: 2 m/s, 16 ticks/mm
WINDOW = int(10 * SPEED_TICKS)   # the 10 s of belt after a change that are scored
BELT_S = 24   # the change at 1 s, its 10 s window, and room for the lead of a fast unpaced belt (6 s seen)


def waiting_belt(tmp_path: Path, run_dir: Path, name: str, seconds: float = BELT_S, oracle: bool = True,
                 **sections) -> tuple[Path, Path]:
    """The demo graph (truth for masks, or the shipped model) on a belt of `seconds` that waits for it; its
    valve-bar score."""
    score = tmp_path / "score.json"
    text = demo_toml(free_port(), oracle=oracle, graph={"name": name, "runtime_dir": str(run_dir)},
                     supervisor={"heartbeat_s": 0.2, "status_every_s": 5},
                     nodes={"belt": {"params": {"seconds": seconds, "paced": False}},
                            "valve_sim": {"params": {"report": str(score)}}}, **sections)
    first = tmp_path / "first.toml"
    first.write_text(text)
    cfg = tmp_path / "demo.toml"
    cfg.write_text(config_toml(by_position(read_config(first))))
    return cfg, score


def env(tmp_path: Path) -> dict:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}


def audit_log(tmp_path: Path, graph: str) -> list[dict]:
    path = tmp_path / "state" / "sortline" / f"recipes-{graph}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def after_change(score: dict, at_tick: int, cls: str) -> tuple[int, int]:
    """Objects of `cls` that start within WINDOW ticks from at_tick: how many, how many the air carried off."""
    mine = [o for o in score["objects_scored"] if o[1] is not None and at_tick <= o[1] < at_tick + WINDOW
            and o[2] == cls]
    return len(mine), sum(o[3] for o in mine)


async def connect(url: str, timeout: float = 60.0, **security) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        client = Client(url, timeout=10)
        if security:
            client.application_uri = security["uri"]   # as its certificate says (sortline keys --uri)
            await client.set_security(SecurityPolicyBasic256Sha256, security["cert"], security["key"],
                                      server_certificate=security.get("server"))
            if security.get("identity", True):
                await client.load_client_certificate(security["cert"])
                await client.load_private_key(security["key"])
        try:
            await client.connect()
            return client
        except (OSError, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


def node(client: Client, ns: int, sid: str):
    return client.get_node(ua.NodeId(sid, ns))


async def wait_value(client, ns, sid, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await node(client, ns, sid).read_value()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{sid} = {value!r} after {timeout} s")
        await asyncio.sleep(0.2)


@pytest.mark.system
def test_a_plc_reads_the_running_demo_graph_and_changes_its_recipe_from_pet_to_pp(tmp_path, run_dir):
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/sortline"
    cfg, score_path = waiting_belt(tmp_path, run_dir, "plc", oracle=False,
                                   opcua={"enabled": True, "security": "none", "endpoint": url})
    sup = start("run", "--config", str(cfg), env=env(tmp_path))

    async def plc() -> dict:
        client = await connect(url)
        try:
            ns = await client.get_namespace_index("urn:sortline:plc")
            seen = {}
            # Running, every node alive, objects counted by class (the plan's sortline_objects_total).
            seen["state"] = await wait_value(client, ns, "Sortline.State", lambda v: v == "running")
            await wait_value(client, ns, "Sortline.Position", lambda v: v >= SPEED_TICKS)
            seen["alive"] = {n: await node(client, ns, f"Sortline.Nodes.{n}.Alive").read_value()
                             for n in ("belt", "register", "infer", "plan", "ejector", "valve_sim")}
            seen["classes"] = await node(client, ns, "Sortline.Recipe.Classes").read_value()
            counted = await node(client, ns, "Sortline.Counters.ObjectsSeen").get_children()
            seen["objects"] = {(await c.read_browse_name()).Name: await c.read_value() for c in counted}
            seen["late"] = await node(client, ns, "Sortline.Counters.LateCommands").read_value()
            seen["severity"] = await node(client, ns, "Sortline.Alarms.CameraLost.Severity").read_value()
            targets = node(client, ns, "Sortline.Recipe.Targets")
            seen["before"] = await targets.read_value()
            # A class the model does not know: a Bad status, the reason beside it, nothing changed.
            with pytest.raises(ua.UaStatusCodeError) as refused:
                await targets.write_value(ua.DataValue(ua.Variant(["glass"], ua.VariantType.String)))
            seen["refused"] = refused.value.code
            seen["why"] = await node(client, ns, "Sortline.Recipe.LastError").read_value()
            seen["position"] = await node(client, ns, "Sortline.Position").read_value()
            await targets.write_value(ua.DataValue(ua.Variant(["PP"], ua.VariantType.String)))
            seen["at_tick"] = await wait_value(client, ns, "Sortline.Recipe.EffectiveTick", lambda v: v > 0)
            seen["after"] = await targets.read_value()
            return seen
        finally:
            await client.disconnect()

    try:
        seen = asyncio.run(plc())
        out, err = sup.communicate(timeout=240)   # the belt ends, and with it the graph
        rc = sup.returncode
    finally:
        if sup.poll() is None:
            stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert "OPC UA at " + url + ": no security, anonymous clients" in err   # the demo says so, once
    assert err.count("no security, anonymous") == 1
    assert seen["state"] == "running" and all(seen["alive"].values()), seen
    assert "PP" in seen["classes"] and "PET" in seen["classes"]
    assert sum(seen["objects"].values()) > 0 and seen["late"] == 0 and seen["severity"] == 800, seen
    assert seen["before"] == ["PET"] and seen["after"] == ["PP"]
    assert seen["refused"] == ua.StatusCodes.BadInvalidArgument
    assert "glass not among the model's classes" in seen["why"]
    # The change holds from a position ahead of where the belt was when it was written.
    assert seen["at_tick"] > seen["position"]

    score = json.loads(score_path.read_text())
    pet_then = score["recipes"][0]
    pp = score["recipes"][1]
    assert pet_then["targets_classes"] == ["PET"] and pp["targets_classes"] == ["PP"], score["recipes"]
    assert pp["at_tick"] == seen["at_tick"]
    # Every object is judged by the recipe in force at its first position: PP ejected from there on.
    n_pp, hit_pp = after_change(score, seen["at_tick"], "PP")
    n_pet, hit_pet = after_change(score, seen["at_tick"], "PET")
    assert score["recipes"][1]["last_tick"] >= seen["at_tick"] + WINDOW, "the belt ended within the 10 s"
    print(f"change at {seen['at_tick'] / SPEED_TICKS:.2f} s of belt; PP after it: {hit_pp} of {n_pp}; "
          f"PET: {hit_pet} of {n_pet}")
    assert n_pp >= 10 and hit_pp / n_pp >= 0.85, (n_pp, hit_pp)
    assert n_pet >= 10 and hit_pet / n_pet <= 0.2, (n_pet, hit_pet)   # PET no longer blown, but for neighbours
    # ... and PET before it.
    before = [o for o in score["objects_scored"] if o[1] is not None and o[1] < seen["at_tick"] and o[2] == "PET"]
    assert before and all(o[4] for o in before) and sum(o[3] for o in before) / len(before) >= 0.85
    # The audit log holds the change (and not the refused one).
    (record,) = audit_log(tmp_path, "plc")
    assert record["source"].startswith("opcua anonymous from 127.0.0.1:"), record
    assert record["old"] == {"targets": ["PET"], "priority": "balanced"}
    assert record["new"] == {"targets": ["PP"], "priority": "balanced"}
    assert record["at_tick"] == seen["at_tick"] and record["position_now"] < record["at_tick"]


@pytest.mark.system
def test_sortline_recipe_set_changes_the_running_graphs_recipe_the_same_way(tmp_path, run_dir):
    cfg, score_path = waiting_belt(tmp_path, run_dir, "cli")
    res = sortline("recipe", "show", "--config", str(cfg), env=env(tmp_path), timeout=60)
    assert res.returncode == 3 and "graph cli is not running" in res.stderr, res.stderr
    sup = start("run", "--config", str(cfg), env=env(tmp_path))
    try:
        deadline = time.monotonic() + 90
        while True:   # until the nodes know their classes and the belt has run 1 s
            shown = sortline("recipe", "show", "--config", str(cfg), "--json", env=env(tmp_path), timeout=60)
            if shown.returncode == 0:
                state = json.loads(shown.stdout)
                if state["classes"] and state["position"] >= SPEED_TICKS:
                    break
            assert time.monotonic() < deadline, shown.stdout + shown.stderr
            time.sleep(0.3)
        bad = sortline("recipe", "set", "--config", str(cfg), "--targets", "PP,glass", env=env(tmp_path), timeout=60)
        changed = sortline("recipe", "set", "--config", str(cfg), "--targets", "PP", "--priority", "recovery",
                           env=env(tmp_path), timeout=60)
        shown = sortline("recipe", "show", "--config", str(cfg), env=env(tmp_path), timeout=60)
        out, err = sup.communicate(timeout=240)
        rc = sup.returncode
    finally:
        if sup.poll() is None:
            stop(sup, timeout=30)
    assert bad.returncode == 1 and "glass not among the model's classes" in bad.stderr, bad.stderr
    assert changed.returncode == 0, changed.stderr
    assert "recipe change 1: targets PP, priority recovery (was PET, balanced)" in changed.stdout
    assert shown.stdout.startswith("targets PP, priority recovery, since belt position"), shown.stdout
    assert rc == 0, err[-3000:]
    (record,) = audit_log(tmp_path, "cli")
    assert record["source"].startswith("cli ") and "@" in record["source"]
    at = record["at_tick"]
    assert record["new"] == {"targets": ["PP"], "priority": "recovery"} and at > record["position_now"]
    score = json.loads(score_path.read_text())
    assert score["recipes"][1]["at_tick"] == at and score["recipes"][1]["targets_classes"] == ["PP"]
    n_pp, hit_pp = after_change(score, at, "PP")
    assert n_pp >= 10 and hit_pp / n_pp >= 0.85, (n_pp, hit_pp)
    # Every node took the change (the runner logs it once per node).
    for name in ("infer", "plan", "ejector", "valve_sim"):
        assert f"sortline.{name} INFO recipe change 1: targets PP, priority recovery, from belt position {at} on" in err


class Unit:
    """A process started as systemd starts a Type=notify unit: NOTIFY_SOCKET set, up once it says READY=1;
    its output in a file, as the journal would have it."""

    def __init__(self, tmp_path: Path, name: str, *args: str, env: dict):
        self.name, self.args, self.env, self.tmp = name, args, env, tmp_path
        self.log = tmp_path / f"{name}.log"
        self.proc = None
        self.start()

    def start(self) -> None:
        path = self.tmp / f"{self.name}.notify"
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "sortline", *self.args], cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, env={**self.env, "NOTIFY_SOCKET": str(path)})

    def ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(0.5)
            try:
                if b"READY=1" in self.sock.recv(4096):
                    return
            except TimeoutError:
                assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode}: {self.text()[-3000:]}"
        raise AssertionError(f"{self.name}: no READY=1 in {timeout} s: {self.text()[-3000:]}")

    def crash(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.sock.close()

    def text(self) -> str:
        return self.log.read_text()


@pytest.mark.system
def test_under_systemd_sortline_control_serves_the_plc_and_survives_its_own_restart(tmp_path, run_dir):
    """The units' way: every node its own process, started as systemd orders them (the control process, then
    the consumers, each up when it says READY=1, then the sources), none supervised. The PLC changes the
    recipe through the control process; the control process is killed and started again mid-run and takes up
    the run's recipes; a node killed and started again is counted and reads them from the runtime directory."""
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/sortline"
    cfg, score_path = waiting_belt(tmp_path, run_dir, "units", seconds=40,
                                   opcua={"enabled": True, "security": "none", "endpoint": url})
    settings = read_config(cfg)
    sources = source_nodes(settings)
    e = env(tmp_path)
    control = Unit(tmp_path, "control", "control", "--config", str(cfg), env=e)
    control.ready()
    units = {}
    try:
        for group in ([n for n in topo_order(settings) if n not in sources], sources):
            for name in group:
                units[name] = Unit(tmp_path, name, "node", name, "--config", str(cfg), env=e)
            for name in group:
                units[name].ready()

        async def plc(change: bool) -> dict:
            client = await connect(url)
            try:
                ns = await client.get_namespace_index("urn:sortline:units")
                seen = {"state": await wait_value(client, ns, "Sortline.State", lambda v: v == "running")}
                seen["alive"] = {n: await node(client, ns, f"Sortline.Nodes.{n}.Alive").read_value() for n in units}
                # (the server's values are at most UPDATE_S old: the restart is waited for)
                seen["restarts"] = await wait_value(client, ns, "Sortline.Nodes.plan.Restarts",
                                                    lambda v: change or v > 0, timeout=10)
                if change:
                    await wait_value(client, ns, "Sortline.Position", lambda v: v >= SPEED_TICKS)
                    await node(client, ns, "Sortline.Recipe.Targets").write_value(
                        ua.DataValue(ua.Variant(["PP"], ua.VariantType.String)))
                    seen["at_tick"] = await wait_value(client, ns, "Sortline.Recipe.EffectiveTick", lambda v: v > 0)
                seen["targets"] = await node(client, ns, "Sortline.Recipe.Targets").read_value()
                return seen
            finally:
                await client.disconnect()

        first = asyncio.run(plc(change=True))
        # The control process dies (systemd would start it again at once): the nodes sort on.
        control.crash()
        time.sleep(1.0)
        control.start()
        control.ready()
        shown = sortline("recipe", "show", "--config", str(cfg), "--json", env=e, timeout=60)
        # A node dies and is started again, as systemd restarts a unit.
        units["plan"].crash()
        units["plan"].start()
        units["plan"].ready()
        again = asyncio.run(plc(change=False))
        changed = sortline("recipe", "set", "--config", str(cfg), "--targets", "PET", env=e, timeout=60)
        # The belt ends; every node finishes on its own; then the control process is stopped.
        for name, unit in units.items():
            assert unit.proc.wait(240) == 0, f"{name}: {unit.text()[-3000:]}"
        control.proc.send_signal(signal.SIGTERM)
        assert control.proc.wait(30) == 0, control.text()[-3000:]
    finally:
        for unit in [control, *units.values()]:
            if unit.proc.poll() is None:
                unit.proc.kill()
                unit.proc.wait()

    assert first["state"] == "running" and all(first["alive"].values()) and first["restarts"] == 0, first
    assert first["targets"] == ["PP"]
    took_up = json.loads(shown.stdout)
    assert took_up["change"] == 1 and took_up["recipe"]["targets"] == ["PP"], took_up
    assert took_up["at_tick"] == first["at_tick"]
    assert "taking up their recipe history (change 1: targets PP" in control.text()
    assert "no security, anonymous clients" in control.text()
    assert again["restarts"] == 1 and all(again["alive"].values()) and again["targets"] == ["PP"], again
    # The plan took change 1 twice: as it was made, and, started again, from the run's history.
    assert units["plan"].text().count(f"recipe change 1: targets PP, priority balanced, from belt position "
                                      f"{first['at_tick']} on") == 2, units["plan"].text()[-3000:]
    assert changed.returncode == 0 and "recipe change 2: targets PET" in changed.stdout, changed.stderr
    records = audit_log(tmp_path, "units")
    assert [r["change"] for r in records] == [1, 2] and records[1]["new"]["targets"] == ["PET"]
    for name in ("infer", "plan", "ejector", "valve_sim"):
        assert "recipe change 2: targets PET" in units[name].text(), name
    # The plan and the ejector judged every object by the same recipe, across both changes.
    assert "refused a window" not in units["ejector"].text(), units["ejector"].text()[-2000:]
    score = json.loads(score_path.read_text())
    assert [r["targets_classes"] for r in score["recipes"]] == [["PET"], ["PP"], ["PET"]], score["recipes"]
    assert score["recipes"][1]["at_tick"] == first["at_tick"]
    # PP ejected from the PLC's change until the second change, across both restarts (measured 98 %), PET
    # after it (99 %).
    pp_until = score["recipes"][2]["at_tick"]

    def recovered(cls: str, start: int, end: float) -> tuple[int, float]:
        mine = [o for o in score["objects_scored"] if o[1] is not None and start <= o[1] < end and o[2] == cls]
        return len(mine), sum(o[3] for o in mine) / max(len(mine), 1)

    n, share = recovered("PP", first["at_tick"], pp_until)
    assert n >= 10 and share >= 0.85, (n, share)
    n, share = recovered("PET", pp_until, float("inf"))
    assert n >= 10 and share >= 0.85, (n, share)
    # The finished nodes are told from dead ones by the marks they leave.
    final = control.text().split("sortline final:")[-1]
    assert all(f"  {name:<12} finished " in final for name in units), final


@pytest.mark.system
def test_sortline_control_with_no_node_running_starts_from_the_configured_recipe(tmp_path, run_dir):
    """A recipe history left in the runtime directory by an earlier run, and no node running: the control
    process starts the new run from the configured recipe (a change numbered 1 again would be lost on nodes
    that read the old history), and says the nodes are down."""
    cfg = write_config(tmp_path / "c.toml", chain(), run_dir)
    (run_dir / "recipes.json").write_text(json.dumps([{"n": 0, "at_tick": -(1 << 62), "targets": ["PET"],
                                                       "priority": "balanced"},
                                                      {"n": 1, "at_tick": 5000, "targets": ["PP"],
                                                       "priority": "balanced"}]))
    control = Unit(tmp_path, "control", "control", "--config", str(cfg), env=env(tmp_path))
    try:
        control.ready()
        shown = sortline("recipe", "show", "--config", str(cfg), "--json", env=env(tmp_path), timeout=60)
        history = json.loads((run_dir / "recipes.json").read_text())
    finally:
        control.proc.send_signal(signal.SIGTERM)
        rc = control.proc.wait(30)
    assert rc == 0, control.text()[-3000:]
    state = json.loads(shown.stdout)
    assert state["change"] == 0 and state["recipe"]["targets"] == ["PET"] and state["classes"] is None, state
    assert [e["n"] for e in history] == [0]
    assert "taking up" not in control.text()


@pytest.mark.system
def test_an_alarm_is_an_event_to_a_subscribed_client_and_is_acknowledged(tmp_path, run_dir):
    """A sink far slower than its camera on a bounded edge: the graph drops hundreds of messages a second,
    the Drops alarm comes on. A client subscribed to the Server object's events gets it as an
    AlarmConditionType event (active, unacknowledged, its severity) whose condition is the alarm's own
    object, acknowledges it the standard way (Acknowledge with the event's id and a comment), and gets that
    as an event too; an unknown event id and a second acknowledgement are refused."""
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/sortline"
    cfg = write_config(tmp_path / "c.toml", chain("lines = 4, pixels = 64, bands = 3", sink="delay_ms = 20",
                                                  policy="bounded"), run_dir,
                       extra=f'\n[opcua]\nenabled = true\nendpoint = "{url}"\nsecurity = "none"\n')
    sup = start("run", "--config", str(cfg))

    async def hmi() -> tuple[list, dict]:
        client = await connect(url)
        events, seen = [], {}

        class Handler:
            def event_notification(self, event):
                events.append(event.get_event_props_as_fields_dict())

        def of(name: str, **fields) -> list[dict]:
            return [e for e in events if e["SourceName"].Value == name
                    and all(e[k].Value == v for k, v in fields.items())]

        async def event(name: str, **fields) -> dict:
            deadline = time.monotonic() + 30
            while not of(name, **fields):
                assert time.monotonic() < deadline, (name, fields, events[-3:])
                await asyncio.sleep(0.1)
            return of(name, **fields)[0]

        try:
            ns = await client.get_namespace_index("urn:sortline:test")
            sub = await client.create_subscription(100, Handler())
            await sub.subscribe_events(client.nodes.server, ua.ObjectIds.AlarmConditionType)
            on = await event("Drops", **{"ActiveState/Id": True})
            seen["on"] = {k: on[k].Value for k in ("Severity", "ConditionName", "AckedState/Id", "Retain")}
            seen["message"] = on["Message"].Value.Text
            condition = client.get_node(on["NodeId"].Value)   # the ConditionId: the alarm's own object
            seen["condition"] = condition.nodeid
            seen["acked_var"] = await node(client, ns, "Sortline.Alarms.Drops.AckedState.Id").read_value()
            seen["event_id_var"] = await node(client, ns, "Sortline.Alarms.Drops.EventId").read_value()
            # The standard way, as an HMI acknowledges: the type's method on the condition, with an event id
            # and a comment. An event id the server never sent is refused and changes nothing.
            acknowledge = ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge)
            comment = ua.Variant(ua.LocalizedText("operator: cleared the jam"), ua.VariantType.LocalizedText)
            with pytest.raises(ua.UaStatusCodeError) as unknown:
                await condition.call_method(acknowledge, ua.Variant(b"not-an-event", ua.VariantType.ByteString),
                                            comment)
            seen["unknown"] = unknown.value.code
            await condition.call_method(acknowledge, ua.Variant(on["EventId"].Value, ua.VariantType.ByteString),
                                        comment)
            acked = await event("Drops", **{"AckedState/Id": True})
            seen["acked"] = {k: acked[k].Value for k in ("ActiveState/Id", "Retain")}
            seen["comment"] = acked["Comment"].Value.Text
            seen["acked_var_after"] = await node(client, ns, "Sortline.Alarms.Drops.AckedState.Id").read_value()
            # The instance's own Acknowledge method is the same one: a second acknowledgement is refused.
            with pytest.raises(ua.UaStatusCodeError) as again:
                await condition.call_method(ua.NodeId("Sortline.Alarms.Drops.Acknowledge", ns),
                                            ua.Variant(acked["EventId"].Value, ua.VariantType.ByteString), comment)
            seen["again"] = again.value.code
            # Still active, so retained: a client that (re)subscribes and asks for a refresh gets it again.
            events.clear()
            await client.get_node(ua.ObjectIds.ConditionType).call_method(
                ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                ua.Variant(sub.subscription_id, ua.VariantType.UInt32))
            refreshed = await event("Drops", **{"AckedState/Id": True})
            seen["refreshed"] = {k: refreshed[k].Value for k in ("ActiveState/Id", "Retain", "EventId")}
            await sub.delete()
        finally:
            await client.disconnect()
        return events, seen

    try:
        events, seen = asyncio.run(hmi())
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert seen["on"] == {"Severity": 500, "ConditionName": "Drops", "AckedState/Id": False, "Retain": True}, seen
    assert "messages dropped a second" in seen["message"] and seen["acked_var"] is False
    assert seen["condition"].Identifier == "Sortline.Alarms.Drops"
    assert seen["event_id_var"] and isinstance(seen["event_id_var"], bytes)
    assert seen["unknown"] == ua.StatusCodes.BadEventIdUnknown
    assert seen["acked"] == {"ActiveState/Id": True, "Retain": True} and seen["acked_var_after"] is True, seen
    assert seen["comment"] == "operator: cleared the jam"
    assert seen["again"] == ua.StatusCodes.BadConditionBranchAlreadyAcked
    assert seen["refreshed"]["ActiveState/Id"] is True and seen["refreshed"]["Retain"] is True, seen
    assert "alarm Drops acknowledged (opcua anonymous from 127.0.0.1:" in err
    assert "): operator: cleared the jam" in err


def make_certificate(out: Path, name: str, client: bool) -> tuple[Path, Path]:
    args = ["keys", name, "--opcua", "--out", str(out)] + (["--client"] if client else [])
    res = sortline(*args, timeout=60)
    assert res.returncode == 0, res.stderr
    return out / f"{name}.der", out / f"{name}.pem"


@pytest.mark.system
def test_with_certificates_required_only_a_client_with_a_trusted_certificate_gets_in(tmp_path, run_dir):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    server_cert, server_key = make_certificate(tmp_path / "server", "sortline", client=False)
    plc_cert, plc_key = make_certificate(tmp_path / "plc", "plc", client=True)
    other_cert, other_key = make_certificate(tmp_path / "other", "intruder", client=True)
    (trusted / "plc.der").write_bytes(plc_cert.read_bytes())
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/sortline"
    cfg = write_config(tmp_path / "c.toml", chain("lines = 4, pixels = 64, bands = 3"), run_dir,
                       extra=f'\n[opcua]\nenabled = true\nendpoint = "{url}"\nsecurity = "sign_encrypt"\n'
                             f'certificate = "{server_cert}"\nprivate_key = "{server_key}"\ntrusted = "{trusted}"\n')
    sup = start("run", "--config", str(cfg))

    async def clients() -> dict:
        results = {}
        trusted_client = await connect(url, cert=str(plc_cert), key=str(plc_key), server=str(server_cert),
                                       uri="urn:sortline:plc")
        try:
            ns = await trusted_client.get_namespace_index("urn:sortline:test")
            results["state"] = await wait_value(trusted_client, ns, "Sortline.State", lambda v: v == "running")
        finally:
            await trusted_client.disconnect()
        for name, kwargs in (("plain", {}),   # no certificate, no security
                             ("untrusted", {"cert": str(other_cert), "key": str(other_key), "server": str(server_cert),
                                            "uri": "urn:sortline:intruder"}),
                             ("anonymous", {"cert": str(plc_cert), "key": str(plc_key), "server": str(server_cert),
                                            "uri": "urn:sortline:plc", "identity": False})):   # a trusted channel, an anonymous session
            try:
                client = await connect(url, timeout=0, **kwargs)
            except Exception as exc:   # refused: whatever the stack calls it
                results[name] = type(exc).__name__
            else:
                await client.disconnect()
                results[name] = "connected"
        return results

    try:
        results = asyncio.run(clients())
    finally:
        rc, _, err = stop(sup, timeout=30)
    assert rc == 0, err[-3000:]
    assert results["state"] == "running", results
    assert results["untrusted"] == "BadCertificateUntrusted", results
    assert results["anonymous"] == "BadIdentityTokenRejected", results
    assert results["plain"] != "connected", results    # no endpoint without security to talk to
    assert "no security" not in err


@pytest.mark.system
def test_sign_encrypt_without_its_certificate_stops_start_up_with_one_line(tmp_path, run_dir):
    cfg = write_config(tmp_path / "c.toml", chain(), run_dir,
                       extra=f'\n[opcua]\nenabled = true\nendpoint = "opc.tcp://127.0.0.1:{free_port()}/s"\n'
                             f'certificate = "{tmp_path}/none.der"\nprivate_key = "{tmp_path}/none.pem"\n'
                             f'trusted = "{tmp_path}"\n')
    res = subprocess.run([sys.executable, "-m", "sortline", "run", "--config", str(cfg), "--seconds", "5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 78, res.stderr[-2000:]
    assert f"opcua.certificate = '{tmp_path}/none.der': not found" in res.stderr
