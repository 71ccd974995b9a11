"""One Triton server over gRPC: a sync endpoint (tritonclient.grpc) and an asyncio one
(tritonclient.grpc.aio), with the same methods, and the mapping of gRPC failures to THFM errors.

Message limits: gRPC refuses messages above the channel's max_send/max_receive_message_length, and
the limits are fixed when the channel is created. A client is told the sizes it needs before a run
(`ensure_limits`, from the request and response sizes of its windows) and opens a channel sized to
fit; when a later run needs more, a new channel replaces the old one (the old one is closed when the
endpoint is, since requests may still be using it).
"""

from __future__ import annotations

import logging
import re
import threading

import numpy as np

from thfm_serve.contract import protocol
from thfm_serve.errors import ServerError, TaskError, ThfmError

from . import wire

logger = logging.getLogger(__name__)

# gRPC status codes after which another server (or a later try) can succeed. INTERNAL is what the
# python backend reports for an exception in a model (a crashed stub, out of memory), which another
# server may well not have; a request the server judged invalid (INVALID_ARGUMENT) would fail anywhere.
_RETRIABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL", "UNKNOWN", "ABORTED",
              "RESOURCE_EXHAUSTED"}
_URL_RE = re.compile(r"^(?:grpc://)?(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d{1,5})/?$")


def normalize_url(url: str) -> str:
    """'HOST:PORT' (optionally grpc://HOST:PORT) -> 'HOST:PORT'; ThfmError for anything else."""
    m = _URL_RE.match(str(url).strip())
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ThfmError(f"--url {url!r} is not HOST:PORT (the Triton gRPC endpoint, e.g. 127.0.0.1:8001)")
    return f"{m.group('host')}:{int(m.group('port'))}"


class RequestError(ServerError):
    """A request failed. retriable: another server or a later try may succeed."""

    def __init__(self, message: str, retriable: bool, status: str = ""):
        super().__init__(message)
        self.retriable = retriable
        self.status = status


def classify(url: str, exc: BaseException, what: str = "request") -> RequestError:
    """Turn a tritonclient/gRPC exception into a RequestError with one readable line."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, InferenceServerException):
        status = (exc.status() or "").replace("StatusCode.", "")
        msg = (exc.message() or str(exc)).strip().splitlines()[0] if (exc.message() or str(exc)).strip() else status
        if status == "UNAVAILABLE" and "queue" in msg.lower():
            # The server is up but its scheduler queue is full (max_queue_size): later, or another
            # server, will take the request.
            return RequestError(f"{url}: server busy, its request queue is full ({_short(msg)})", True, status)
        if status == "UNAVAILABLE":
            return RequestError(f"cannot reach Triton at {url} ({_short(msg)})", True, status)
        if status == "DEADLINE_EXCEEDED":
            return RequestError(f"{url}: {what} timed out ({_short(msg)})", True, status)
        if status == "RESOURCE_EXHAUSTED" and "larger than max" in msg:
            # Our own channel limit: sized from the request, so this is a bug or a liar of a server;
            # another server would answer the same.
            return RequestError(f"{url}: {what} exceeds a gRPC message limit ({_short(msg)})", False, status)
        if "has no available versions" in msg or "is not ready" in msg:
            # The model exists but no version is loaded right now: the server is loading it or
            # unloading it on a graceful shutdown. Another server (or a later try) can answer.
            return RequestError(f"{url}: model not available right now, loading or unloading ({_short(msg)})", True,
                                status)
        if status == "NOT_FOUND" or "unknown model" in msg.lower():
            return RequestError(f"{url}: {_short(msg)} (is this the THFM model repository?)", False, status)
        retriable = status in _RETRIABLE or not status
        return RequestError(f"{url}: {what} failed: {_short(msg)}", retriable, status)
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return RequestError(f"cannot reach Triton at {url} ({exc})", True, "UNAVAILABLE")
    return RequestError(f"{url}: {what} failed: {type(exc).__name__}: {exc}", False)


def _short(msg: str) -> str:
    # tritonserver and the python backend prefix messages with "Failed to process the request(s) for
    # model 'thfm_0_0', message: ..." or "in ensemble ...": keep the part a user can act on.
    msg = str(msg).strip()
    for marker in ("message: ", "Error: "):
        if marker in msg:
            msg = msg.split(marker, 1)[1]
    return msg.strip().rstrip(".")


def server_message_error(message: str) -> ThfmError:
    """A non-retriable server message -> the matching ThfmError (an unknown task stays a TaskError)."""
    if "task" in message.lower() and ("unknown" in message.lower() or "not provided" in message.lower()):
        return TaskError(message)
    return ServerError(message)


def _channel_args(send: int, recv: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", int(send)),
        ("grpc.max_receive_message_length", int(recv)),
        # The servers are named explicitly; never send their traffic through an http(s)_proxy from
        # the environment (gRPC honours those variables).
        ("grpc.enable_http_proxy", 0),
        # A restarted server is noticed within a second instead of after gRPC's backoff (up to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # Keepalive notices a server that vanished without closing the connection (a killed VM).
        ("grpc.keepalive_time_ms", 30000),
        ("grpc.keepalive_timeout_ms", 10000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def build_inputs(payload: wire.Payload):
    import tritonclient.grpc as grpcclient

    inputs = []
    if payload.video is not None:
        data = np.array([payload.video], dtype=np.object_)
        inp = grpcclient.InferInput(protocol.INPUT_VIDEO, [1], "BYTES")
        inp.set_data_from_numpy(data)
    else:
        frames = np.ascontiguousarray(payload.frames, dtype=np.uint8)
        inp = grpcclient.InferInput(protocol.INPUT_FRAMES, list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames)
    inputs.append(inp)
    tasks = wire.tasks_tensor(payload.tasks)
    t = grpcclient.InferInput(protocol.INPUT_TASKS, [len(payload.tasks)], "BYTES")
    t.set_data_from_numpy(tasks)
    inputs.append(t)
    if payload.output_size != protocol.OUTPUT_SIZE_INPUT:
        o = grpcclient.InferInput(protocol.INPUT_OUTPUT_SIZE, [1], "BYTES")
        o.set_data_from_numpy(np.array([payload.output_size.encode()], dtype=np.object_))
        inputs.append(o)
    return inputs


def build_outputs(tasks):
    import tritonclient.grpc as grpcclient

    # A name the protocol does not know gets no requested output; the server names the problem.
    names = [protocol.OUTPUT_FOR_TASK[t] for t in tasks if t in protocol.OUTPUT_FOR_TASK]
    if any(t.startswith("keypoints") for t in tasks):
        names.append(protocol.OUTPUT_JOINT_NAMES)
    return [grpcclient.InferRequestedOutput(n) for n in names]


def read_outputs(url: str, result, tasks) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """InferResult -> ({task: array}, joint names or None)."""
    out = {}
    for t in tasks:
        arr = result.as_numpy(protocol.OUTPUT_FOR_TASK[t])
        if arr is None:
            raise RequestError(f"{url}: the response has no {t!r} output", False)
        out[t] = arr
    names = None
    if any(t.startswith("keypoints") for t in tasks):
        raw = result.as_numpy(protocol.OUTPUT_JOINT_NAMES)
        if raw is None:
            raise RequestError(f"{url}: the response has no {protocol.OUTPUT_JOINT_NAMES!r} output", False)
        names = wire.decode_names(raw)
    return out, names


class _EndpointBase:
    def __init__(self, url: str, model: str = protocol.ENTRY_MODEL):
        self.url = normalize_url(url)
        self.model = model
        self._limits = (0, 0)
        self._client = None
        self._retired: list = []  # channels replaced by bigger ones; closed with the endpoint
        self._lock = threading.Lock()

    def ensure_limits(self, send: int, recv: int) -> None:
        """Make the channel accept requests of `send` bytes and responses of `recv` bytes."""
        send, recv = wire.message_limit(send), wire.message_limit(recv)
        with self._lock:
            cur_send, cur_recv = self._limits
            if self._client is not None and send <= cur_send and recv <= cur_recv:
                return
            send, recv = max(send, cur_send), max(recv, cur_recv)
            if self._client is not None:
                self._retired.append(self._client)
            logger.debug("%s: channel limits send %d recv %d bytes", self.url, send, recv)
            self._client = self._make(_channel_args(send, recv))
            self._limits = (send, recv)

    def _get(self):
        if self._client is None:
            self.ensure_limits(0, 0)
        return self._client


class SyncEndpoint(_EndpointBase):
    """One server through tritonclient.grpc (blocking; safe to call from several threads)."""

    def _make(self, args):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url, channel_args=args)

    def info(self, timeout_s: float | None = 10.0) -> wire.ServerInfo:
        client = self._get()
        try:
            if not client.is_model_ready(self.model, client_timeout=timeout_s):
                raise RequestError(f"{self.url}: model {self.model!r} is not ready (still loading, or failed)", True)
            config = client.get_model_config(self.model, as_json=True, client_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - every failure becomes one readable RequestError
            raise classify(self.url, e, "reading the model config") from None
        return wire.parse_model_config(self.url, self.model, config)

    def infer(self, payload: wire.Payload, timeout_s: float | None = None):
        client = self._get()
        try:
            result = client.infer(self.model, build_inputs(payload), outputs=build_outputs(payload.tasks),
                                  client_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            raise classify(self.url, e) from None
        return read_outputs(self.url, result, payload.tasks)

    def close(self) -> None:
        with self._lock:
            for c in self._retired + ([self._client] if self._client is not None else []):
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing must not mask the run's own outcome
                    pass
            self._client, self._retired, self._limits = None, [], (0, 0)


class AsyncEndpoint(_EndpointBase):
    """One server through tritonclient.grpc.aio (channels belong to the event loop that made them)."""

    def _make(self, args):
        import tritonclient.grpc.aio as aioclient

        return aioclient.InferenceServerClient(self.url, channel_args=args)

    async def info(self, timeout_s: float | None = 10.0) -> wire.ServerInfo:
        client = self._get()
        try:
            if not await client.is_model_ready(self.model, client_timeout=timeout_s):
                raise RequestError(f"{self.url}: model {self.model!r} is not ready (still loading, or failed)", True)
            config = await client.get_model_config(self.model, as_json=True, client_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            raise classify(self.url, e, "reading the model config") from None
        return wire.parse_model_config(self.url, self.model, config)

    async def infer(self, payload: wire.Payload, timeout_s: float | None = None):
        client = self._get()
        try:
            result = await client.infer(self.model, build_inputs(payload), outputs=build_outputs(payload.tasks),
                                        client_timeout=timeout_s)
        except Exception as e:  # noqa: BLE001
            raise classify(self.url, e) from None
        return read_outputs(self.url, result, payload.tasks)

    async def close(self) -> None:
        clients = self._retired + ([self._client] if self._client is not None else [])
        self._client, self._retired, self._limits = None, [], (0, 0)
        for c in clients:
            try:
                await c.close()
            except Exception:  # noqa: BLE001
                pass
