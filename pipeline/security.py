"""CURVE on tcp edges: encryption, and only known hosts may connect.

Each host has a certificate (`sortline keys`): a public key it hands out and
a secret key it keeps. On a tcp edge the producer is the CURVE server: it
admits a consumer only if the consumer's public key is among the
certificates in `security.authorized`, and the consumer admits the producer
only if it holds the secret of the edge's `server_key`. The producer's check
runs in ZeroMQ's ZAP handler (a thread of zmq.auth), which also counts each
refusal in `sortline_auth_refused_total` and logs it. ipc edges stay on the
host and are protected by the runtime directory's permissions instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from sortline.pipeline import metrics
from sortline.pipeline.config import ConfigError, Settings

DOMAIN = "sortline"
log = logging.getLogger("sortline.curve")


def make_keys(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """NAME.key (public: give it to peers) and NAME.key_secret (keep it here)."""
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; a host keeps its keys (remove it to make new ones)")
    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o640)  # the service's group may read it, nobody else
    return public, secret


def _load(path: str, what: str, secret: bool = False) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{what} = {path!r}: not a readable certificate ({exc})"]) from None
    if secret and secret_key is None:
        raise ConfigError([f"{what} = {path!r}: a public certificate; this host's NAME.key_secret is needed"])
    return public, secret_key


class _CountingAuthenticator(ThreadAuthenticator):
    """zmq.auth's CURVE check, counting and logging every refusal."""

    def __init__(self, ctx: zmq.Context, node: str):
        super().__init__(ctx)
        self._refused = metrics.AUTH_REFUSED.labels(node)
        self._peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id, status_code, status_text, user_id="anonymous") -> None:
        if status_code != b"200":
            self._refused.inc()
            log.warning("refused a connection from %s: %s (its key is not in security.authorized)",
                        self._peer or "?", status_text.decode(errors="replace"))
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class Curve:
    """This node's keys; secures the tcp sockets of its edges."""

    def __init__(self, ctx: zmq.Context, settings: Settings, node: str):
        sec = settings.security
        self.enabled = sec.curve
        self._ctx, self._node = ctx, node
        self._auth: _CountingAuthenticator | None = None
        if not self.enabled:
            return
        self.public, self.secret = _load(sec.key, "security.key", secret=True)
        if not Path(sec.authorized).is_dir() or not any(Path(sec.authorized).glob("*.key")):
            raise ConfigError([f"security.authorized = {sec.authorized!r}: not a directory of public "
                               "certificates (*.key)"])
        self._authorized = sec.authorized

    def secure(self, sock: zmq.Socket, edge, sending: bool) -> None:
        if not self.enabled or not edge.address.startswith("tcp://"):
            return
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret
        if sending:
            if self._auth is None:  # before the first bind: no connection is ever checked by nobody
                self._auth = _CountingAuthenticator(self._ctx, self._node)
                self._auth.start()
                self._auth.configure_curve(domain=DOMAIN, location=self._authorized)
            sock.curve_server = True
            sock.zap_domain = DOMAIN.encode()
        else:
            sock.curve_serverkey = _load(edge.server_key, f"edges {edge.name}: server_key")[0]

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
