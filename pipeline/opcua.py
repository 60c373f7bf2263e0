"""The OPC UA server towards the line's PLC (asyncua, the `plc` extra): docs/plc.md.

It runs in a thread of the supervisor's process, with its own asyncio loop,
never in a node: what it serves is what the supervisor makes of the nodes'
heartbeats (pipeline.machine_state), refreshed every UPDATE_S, so a PLC
that polls hard costs the data nothing. A recipe written by a client goes
through `Supervisor.change_recipe`, as one from `sortline recipe` does, and
is refused with a Bad status when it names a class the model does not know
(the reason in Recipe.LastError).

Security: `opcua.security = "sign_encrypt"` (the default, the production
profile) offers Basic256Sha256 Sign&Encrypt alone, admits clients whose
application certificate is in `opcua.trusted` and sessions identified by a
trusted certificate (no anonymous ones); "none" (the demo profile) offers no
security and anonymous sessions, and says so in one warning at start-up.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from pathlib import Path
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.event_generator import EventGenerator
from asyncua.server.internal_session import InternalSession
from cryptography import x509

from sortline.pipeline.config import ConfigError
from sortline.pipeline.machine_state import ALARMS
from sortline.pipeline.recipes import RecipeError

log = logging.getLogger("sortline.opcua")

UPDATE_S = 0.5
START_WAIT_S = 20.0
# Who is asking, for the audit log: set around each client's write and method call (the server's own writes
# have none).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")
V = ua.VariantType


class _Session(InternalSession):
    """A client's session that names its client while it writes or calls a method."""

    def _who(self) -> str:
        user = getattr(self.user, "name", None) or "anonymous"
        peer = f"{self.name[0]}:{self.name[1]}" if isinstance(self.name, tuple) else str(self.name)
        return f"opcua {user} from {peer}"

    async def write(self, params):
        token = CALLER.set(self._who())
        try:
            return await super().write(params)
        finally:
            CALLER.reset(token)

    async def call(self, params):
        token = CALLER.set(self._who())
        try:
            return await super().call(params)
        finally:
            CALLER.reset(token)


class _Users:
    """Every session is a User (may read, write and call); with certificates, named by its certificate's
    common name, and only if that certificate is trusted."""

    def __init__(self, trust: TrustStore | None):
        self.trust = trust

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if not certificate:
            return User(role=UserRole.User) if self.trust is None else None
        cert = x509.load_der_x509_certificate(certificate) if isinstance(certificate, bytes) else certificate
        if self.trust is not None and not self.trust.validate(cert):
            return None
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return User(role=UserRole.User, name=names[0].value if names else "certificate")


def _application_uri(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""


def _argument(name: str, vtype: ua.VariantType, array: bool = False, text: str = "") -> ua.Argument:
    arg = ua.Argument()
    arg.Name, arg.DataType, arg.ValueRank = name, ua.NodeId(vtype.value), 1 if array else -1
    arg.ArrayDimensions = [0] if array else []
    arg.Description = ua.LocalizedText(text)
    return arg


class PlcServer:
    """The server: start() in its own thread (ConfigError if it cannot start), stop() at the end of the run."""

    def __init__(self, supervisor):
        self.sup = supervisor
        self.cfg = supervisor.settings.opcua
        self.graph = supervisor.settings.graph.name
        self.uri = f"urn:sortline:{self.graph}"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: list[str] = []
        self.vars: dict[str, tuple] = {}      # string id -> (node, variant type, value last written)
        self.acked: dict[str, bool] = {name: True for name in ALARMS}
        self.active: dict[str, bool] = {name: False for name in ALARMS}
        self.event_ids: dict[str, list[bytes]] = {name: [] for name in ALARMS}   # this activation's

    # The thread.

    def start(self) -> None:
        logging.getLogger("asyncua").setLevel(logging.WARNING)   # its INFO is a line per request
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_WAIT_S):
            self._error = self._error or [f"opcua: the server did not start within {START_WAIT_S:g} s"]
        if self._error:
            self.stop()
            raise ConfigError(self._error)

    def stop(self) -> None:
        if self._loop is not None and self._done is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._done.set)
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except OSError as exc:   # the port taken, the address not this host's
            self._error = self._error or [f"opcua.endpoint = {self.cfg.endpoint!r}: cannot listen there "
                                          f"({exc.strerror or exc})"]
            self._ready.set()
        except Exception as exc:   # the server's own failure must not take the supervisor down
            log.error("the OPC UA server stopped: %r", exc, exc_info=True)
            self._error = self._error or [f"opcua: the server failed: {exc!r}"]
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._done = asyncio.get_running_loop(), asyncio.Event()
        server = await self._server()
        if server is None:
            self._ready.set()
            return
        self.server = server
        quiet = logging.getLogger("asyncua.server.server")
        quiet.setLevel(logging.CRITICAL)   # a port taken is one line of ours (_run), not asyncua's traceback
        async with server:
            quiet.setLevel(logging.WARNING)
            await self._address_space(server)
            self._ready.set()
            log.info("OPC UA server at %s (namespace %s, security %s)", self.cfg.endpoint, self.uri, self.cfg.security)
            while not self._done.is_set():
                try:
                    await self._update()
                except Exception as exc:   # one bad update: log it, serve on
                    log.error("OPC UA update failed: %r", exc, exc_info=True)
                try:
                    await asyncio.wait_for(self._done.wait(), UPDATE_S)
                except asyncio.TimeoutError:
                    pass

    async def _server(self) -> Server | None:
        cfg = self.cfg
        trust = None
        if cfg.security == "sign_encrypt":
            missing = [f"opcua.{key} = {getattr(cfg, key)!r}: not found" for key in ("certificate", "private_key")
                       if not Path(getattr(cfg, key)).is_file()]
            if not Path(cfg.trusted).is_dir():
                missing.append(f"opcua.trusted = {cfg.trusted!r}: not a directory")
            if missing:
                self._error = missing + ["make the server's certificate with `sortline keys NAME --opcua` "
                                         "(docs/plc.md)"]
                return None
            trust = TrustStore([Path(cfg.trusted)], [])
            await trust.load()
        server = Server(user_manager=_Users(trust))
        iserver = server.iserver
        iserver.create_session = lambda name, user=User(role=UserRole.Anonymous), external=False: _Session(
            iserver, iserver.aspace, iserver.subscription_service, name, user=user, external=external)
        iserver.bind_condition_methods = 1   # serve ConditionRefresh (its Refresh events at severity 1)
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name(f"sortline {self.graph}")
        await server.set_application_uri(self.uri)
        if cfg.security == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
            host = urlparse(cfg.endpoint).hostname
            log.warning("OPC UA at %s: no security, anonymous clients may read and change the recipe "
                        "(opcua.security = 'none'%s)", cfg.endpoint,
                        "" if host in ("127.0.0.1", "localhost", "::1") else ", on a network interface")
        else:
            try:
                await server.load_certificate(cfg.certificate)
                await server.load_private_key(cfg.private_key)
            except Exception as exc:
                self._error = [f"opcua.certificate, opcua.private_key: cannot be read: {exc}"]
                return None
            # The application URI a client checks against the server's certificate: the certificate's own.
            uri = _application_uri(server.iserver.certificate)
            if uri:
                await server.set_application_uri(uri)
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            server.set_identity_tokens([ua.X509IdentityToken])
            options = (CertificateValidatorOptions.EXT_VALIDATION | CertificateValidatorOptions.TRUSTED
                       | CertificateValidatorOptions.PEER_CLIENT)
            server.set_certificate_validator(CertificateValidator(options, trust))
        return server

    # The address space (docs/plc.md lists it).

    async def _address_space(self, server: Server) -> None:
        self.ns = ns = await server.register_namespace(self.uri)
        objects = server.nodes.objects
        root = await objects.add_object(ua.NodeId("Sortline", ns), ua.QualifiedName("Sortline", ns))
        await self._var(root, "Sortline.State", "State", "starting", V.String)
        await self._var(root, "Sortline.Position", "Position", 0, V.Int64)
        self.nodes_folder = await root.add_folder(ua.NodeId("Sortline.Nodes", ns), ua.QualifiedName("Nodes", ns))
        for name in self.sup.children:
            obj = await self.nodes_folder.add_object(ua.NodeId(f"Sortline.Nodes.{name}", ns),
                                                     ua.QualifiedName(name, ns))
            await self._var(obj, f"Sortline.Nodes.{name}.Alive", "Alive", False, V.Boolean)
            await self._var(obj, f"Sortline.Nodes.{name}.State", "State", "starting", V.String)
            await self._var(obj, f"Sortline.Nodes.{name}.Restarts", "Restarts", 0, V.UInt32)
            await self._var(obj, f"Sortline.Nodes.{name}.LastError", "LastError", "", V.String)
        counters = await root.add_folder(ua.NodeId("Sortline.Counters", ns), ua.QualifiedName("Counters", ns))
        self.by_class = {}
        for group in ("ObjectsSeen", "Ejections"):
            self.by_class[group] = await counters.add_folder(ua.NodeId(f"Sortline.Counters.{group}", ns),
                                                             ua.QualifiedName(group, ns))
        for key in ("LateCommands", "Drops", "ValveCommands"):
            await self._var(counters, f"Sortline.Counters.{key}", key, 0, V.UInt64)
        alarms = await root.add_folder(ua.NodeId("Sortline.Alarms", ns), ua.QualifiedName("Alarms", ns))
        self.alarm_events: dict[str, EventGenerator] = {}
        self.conditions: dict[ua.NodeId, str] = {}
        for i, (name, (severity, text)) in enumerate(ALARMS.items()):
            # Each alarm is an AlarmConditionType instance, what an HMI or a SCADA expects; its state changes are
            # events from the Server object, and its variables hold its last event's fields.
            alarm = await alarms.add_object(ua.NodeId(f"Sortline.Alarms.{name}", ns), ua.QualifiedName(name, ns),
                                            objecttype=ua.ObjectIds.AlarmConditionType, instantiate_optional=False)
            await alarm.write_attribute(ua.AttributeIds.Description,
                                        ua.DataValue(ua.Variant(ua.LocalizedText(text), V.LocalizedText)))
            self.conditions[alarm.nodeid] = name
            server.link_method(server.get_node(ua.NodeId(f"Sortline.Alarms.{name}.Acknowledge", ns)),
                               self._acknowledge)
            gen = EventGenerator(server.iserver.isession)
            await gen.init(ua.ObjectIds.AlarmConditionType, ua.ObjectIds.Server, add_generates_event=i == 0)
            ev = gen.event
            ev.SourceNode, ev.SourceName, ev.NodeId = alarm.nodeid, name, alarm.nodeid   # NodeId: the ConditionId
            ev.ConditionName, ev.Severity, ev.LastSeverity = name, severity, severity
            ev.ConditionClassId = ua.NodeId(ua.ObjectIds.SystemConditionClassType)
            ev.ConditionClassName = ua.LocalizedText("System")
            ev.EnabledState = ua.LocalizedText("Enabled")
            setattr(ev, "EnabledState/Id", True)
            self.alarm_events[name] = gen
            for field, vtype, value in (("EventType", V.NodeId, ua.NodeId(ua.ObjectIds.AlarmConditionType)),
                                        ("SourceNode", V.NodeId, alarm.nodeid), ("SourceName", V.String, name),
                                        ("ConditionName", V.String, name), ("Severity", V.UInt16, severity),
                                        ("LastSeverity", V.UInt16, severity),
                                        ("ConditionClassId", V.NodeId, ev.ConditionClassId),
                                        ("ConditionClassName", V.LocalizedText, ev.ConditionClassName),
                                        ("EnabledState", V.LocalizedText, ev.EnabledState),
                                        ("EnabledState.Id", V.Boolean, True)):
                await self._put(f"Sortline.Alarms.{name}.{field}", vtype, value)
            await self._state_of(name)
        # The standard way to acknowledge: the type's method, called with the condition as the object.
        server.link_method(server.get_node(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge), self._acknowledge)
        recipe = await root.add_object(ua.NodeId("Sortline.Recipe", ns), ua.QualifiedName("Recipe", ns))
        current = self.sup.book.current
        for key, value, vtype in (("Targets", current.recipe.targets, V.String),
                                  ("Priority", current.recipe.priority, V.String)):
            node = await self._var(recipe, f"Sortline.Recipe.{key}", key, value, vtype)
            if key == "Targets":
                await node.write_value_rank(1)
            await node.set_writable()
            server.set_attribute_value_setter(node.nodeid, self._recipe_setter(key))
        await self._var(recipe, "Sortline.Recipe.Change", "Change", current.n, V.UInt32)
        await self._var(recipe, "Sortline.Recipe.EffectiveTick", "EffectiveTick", 0, V.Int64)
        await self._var(recipe, "Sortline.Recipe.Classes", "Classes", [], V.String)
        await self._var(recipe, "Sortline.Recipe.LastError", "LastError", "", V.String)
        await recipe.add_method(
            ua.NodeId("Sortline.Recipe.SetRecipe", ns), ua.QualifiedName("SetRecipe", ns), self._set_recipe,
            [_argument("Targets", V.String, array=True, text="class names; empty: as they are"),
             _argument("Priority", V.String, text="recovery, balanced or purity; empty: as it is")],
            [_argument("EffectiveTick", V.Int64, text="the belt position (encoder ticks) it holds from")])

    async def _var(self, parent, sid: str, name: str, value, vtype: ua.VariantType):
        node = await parent.add_variable(ua.NodeId(sid, self.ns), ua.QualifiedName(name, self.ns),
                                         ua.Variant(value, vtype))
        self.vars[sid] = (node, vtype, value)
        return node

    async def _put(self, sid: str, vtype: ua.VariantType, value) -> None:
        """_set, also for a variable the server made (an instance's child): written as ours from then on."""
        if sid not in self.vars:
            self.vars[sid] = (self.server.get_node(ua.NodeId(sid, self.ns)), vtype, None)
        await self._set(sid, value)

    async def _set(self, sid: str, value) -> None:
        node, vtype, old = self.vars[sid]
        if value == old:
            return
        self.vars[sid] = (node, vtype, value)
        token = CALLER.set("")   # the server's own write, also when made while answering a client
        try:
            await self.server.write_attribute_value(node.nodeid, ua.DataValue(ua.Variant(value, vtype)))
        finally:
            CALLER.reset(token)

    async def _counter(self, group: str, cls: str, value: float) -> None:
        sid = f"Sortline.Counters.{group}.{cls}"
        if sid not in self.vars:
            await self._var(self.by_class[group], sid, cls, 0, V.UInt64)
        await self._set(sid, int(value))

    async def _update(self) -> None:
        view, sup = self.sup.view, self.sup
        if not view:
            return
        await self._set("Sortline.State", view["state"])
        await self._set("Sortline.Position", int(view["position"]))
        for name, n in view["nodes"].items():
            await self._set(f"Sortline.Nodes.{name}.Alive", n["alive"])
            await self._set(f"Sortline.Nodes.{name}.State", n["state"])
            await self._set(f"Sortline.Nodes.{name}.Restarts", n["restarts"])
            await self._set(f"Sortline.Nodes.{name}.LastError", n["last_error"])
        classes = sup.classes() or []
        for cls in set(classes) | set(view["objects"]):
            await self._counter("ObjectsSeen", cls, view["objects"].get(cls, 0))
        for cls in set(sup.book.targets_ever()) | set(view["ejections"]):
            await self._counter("Ejections", cls, view["ejections"].get(cls, 0))
        await self._set("Sortline.Counters.LateCommands", int(view["late"]))
        await self._set("Sortline.Counters.Drops", int(view["drops"]))
        await self._set("Sortline.Counters.ValveCommands", int(view["commands"]))
        for name, cond in view["alarms"].items():
            if cond.active == self.active[name]:
                continue
            if cond.active:
                self.acked[name] = False   # each activation waits for its own acknowledgement
                self.event_ids[name] = []
                log.warning("alarm %s: %s", name, cond.message)
            self.active[name] = cond.active
            await self._alarm_event(name, cond.message if cond.active else f"{name}: no longer active",
                                    comment="" if cond.active else None)
        current = sup.book.current
        await self._set("Sortline.Recipe.Targets", list(current.recipe.targets))
        await self._set("Sortline.Recipe.Priority", current.recipe.priority)
        await self._set("Sortline.Recipe.Change", current.n)
        await self._set("Sortline.Recipe.EffectiveTick", 0 if current.n == 0 else current.at_tick)
        await self._set("Sortline.Recipe.Classes", classes)

    # What clients do.

    def _change(self, targets, priority) -> dict | None:
        """A client's recipe change, through the supervisor; RecipeError (also left in Recipe.LastError)."""
        try:
            record = self.sup.change_recipe(targets, priority, CALLER.get() or "opcua")
        except RecipeError as exc:
            node, vtype, _ = self.vars["Sortline.Recipe.LastError"]
            self.vars["Sortline.Recipe.LastError"] = (node, vtype, str(exc))
            node_data = self.server.iserver.aspace._nodes[node.nodeid]   # set here, synchronously, with the refusal
            node_data.attributes[ua.AttributeIds.Value].value = ua.DataValue(ua.Variant(str(exc), vtype))
            log.warning("OPC UA recipe change refused (%s): %s", CALLER.get() or "opcua", exc)
            raise
        return record

    def _recipe_setter(self, key: str):
        def setter(node_data, attr, value: ua.DataValue) -> None:
            if CALLER.get():   # a client's write, not this server's own refresh
                written = value.Value.Value if value.Value is not None else None
                try:
                    if key == "Targets":
                        if not isinstance(written, list) or not all(isinstance(t, str) for t in written):
                            raise RecipeError("Recipe.Targets takes an array of class names")
                        self._change(written, None)
                    else:
                        self._change(None, str(written))
                except RecipeError:
                    raise ua.UaStatusCodeError(ua.StatusCodes.BadInvalidArgument) from None
                asyncio.get_running_loop().create_task(self._update())   # EffectiveTick and the rest, at once
            node_data.attributes[attr].value = value
            node_data.attributes[attr].value_callback = None
        return setter

    async def _set_recipe(self, parent, targets: ua.Variant, priority: ua.Variant):
        t = [str(x) for x in (targets.Value or [])] or None
        p = str(priority.Value or "") or None
        try:
            record = self._change(t, p)
        except RecipeError:
            return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
        await self._update()
        current = self.sup.book.current   # without a record: the recipe was that already
        at_tick = record["at_tick"] if record else (0 if current.n == 0 else current.at_tick)
        return [ua.Variant(at_tick, V.Int64)]

    async def _acknowledge(self, condition: ua.NodeId, *args: ua.Variant):
        """AcknowledgeableConditionType.Acknowledge(EventId, Comment): the event id is one of this
        activation's events (a client need not have seen the newest)."""
        name = self.conditions.get(condition)
        if name is None:
            return ua.StatusCode(ua.StatusCodes.BadNodeIdInvalid)
        if len(args) != 2:
            return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing if len(args) < 2
                                 else ua.StatusCodes.BadTooManyArguments)
        event_id, comment = args
        if event_id.Value not in self.event_ids[name]:
            return ua.StatusCode(ua.StatusCodes.BadEventIdUnknown)
        if self.acked[name]:
            return ua.StatusCode(ua.StatusCodes.BadConditionBranchAlreadyAcked)
        who = CALLER.get() or "opcua"
        text = comment.Value.Text if isinstance(comment.Value, ua.LocalizedText) else ""
        self.acked[name] = True
        log.info("alarm %s acknowledged (%s)%s", name, who, f": {text}" if text else "")
        await self._alarm_event(name, f"{name}: acknowledged by {who}", comment=text or "", who=who)
        return []

    async def _alarm_event(self, name: str, message: str, comment: str | None = None, who: str | None = None) -> None:
        active, acked = self.active[name], self.acked[name]
        gen = self.alarm_events[name]
        ev = gen.event
        ev.ActiveState = ua.LocalizedText("Active" if active else "Inactive")
        setattr(ev, "ActiveState/Id", active)
        ev.AckedState = ua.LocalizedText("Acknowledged" if acked else "Unacknowledged")
        setattr(ev, "AckedState/Id", acked)
        ev.Retain = active or not acked
        ev.Message = ua.LocalizedText(message)
        if comment is not None:
            ev.Comment = ua.LocalizedText(comment)
        if who is not None:
            ev.ClientUserId = who
        await gen.trigger()
        self.event_ids[name].append(ev.EventId.Value)
        await self._state_of(name)

    async def _state_of(self, name: str) -> None:
        """The condition's variables: its last event's fields (before any event, inactive and acknowledged)."""
        ev, sid = self.alarm_events[name].event, f"Sortline.Alarms.{name}"
        active, acked = self.active[name], self.acked[name]
        fields = (("ActiveState", V.LocalizedText, ua.LocalizedText("Active" if active else "Inactive")),
                  ("ActiveState.Id", V.Boolean, active),
                  ("AckedState", V.LocalizedText, ua.LocalizedText("Acknowledged" if acked else "Unacknowledged")),
                  ("AckedState.Id", V.Boolean, acked), ("Retain", V.Boolean, active or not acked),
                  ("Message", V.LocalizedText, ev.Message or ua.LocalizedText("")),
                  ("Comment", V.LocalizedText, ev.Comment or ua.LocalizedText("")),
                  ("ClientUserId", V.String, ev.ClientUserId or ""))
        if self.event_ids[name]:
            fields += (("EventId", V.ByteString, ev.EventId.Value), ("Time", V.DateTime, ev.Time))
        for field, vtype, value in fields:
            await self._put(f"{sid}.{field}", vtype, value)
