"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on ``SSD_GRPC_PORT``,
in the app's own event loop (grpc.aio), sharing its repository, batchers, decoder and metrics.

The service's messages are generated from the protocol's official ``.proto`` (service/oip/proto,
``make proto``). ``tritonclient.grpc`` speaks Triton's superset of it: the six methods here have
the same names and messages. Like the REST routes, this is a transport adapter: ``ModelInfer``
parses its message into the request's ``Call`` (service/pipeline.py) and renders the answer;
admission, deadlines, budgets, metrics and errors are the core's. A request's deadline is the
earlier of the gRPC deadline and its ``timeout_ms`` (or Triton's ``timeout``) parameter; a client
that cancels, or whose deadline passes, stops the request's work as a closed HTTP connection does.

Memory: grpc.aio reads a unary call's whole message before its handler runs. ``ModelInfer`` is
therefore served as a client-streaming method (the same bytes on the wire, so every unary client
works unmodified): its handler runs first, takes ``SSD_MAX_REQUEST_BYTES`` from the process-wide
budget of request bytes (service/budget.py; waiting for room up to the request's longest
deadline), then reads the message and gives back what it did not use. Messages are at most
``SSD_MAX_REQUEST_BYTES`` (``grpc.max_receive_message_length``; RESOURCE_EXHAUSTED past it) and
at most ``MAX_CONCURRENT_RPCS`` calls run at once, so the bytes gRPC holds are the budget plus
each waiting call's HTTP/2 flow-control window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from ..accounting import NO_MODEL, Outcome
from ..errors import APIError, client_gone
from ..pipeline import Call, lookup
from ..state import State
from .proto import model_config_pb2
from .proto import open_inference_grpc_pb2 as pb
from .proto import open_inference_grpc_pb2_grpc as pb_grpc
from .proto import triton_repository_pb2 as triton
from .protocol import (
    DATATYPES,
    OUTPUT_TYPES,
    Tensor,
    bad,
    check_outputs,
    element_count,
    from_raw,
    model_config,
    model_metadata,
    repository_index,
    run,
    server_metadata,
)
from .rest import EXTENSIONS

# Calls served at once (gRPC refuses more with RESOURCE_EXHAUSTED): above any burst the batcher
# admits (SSD_MAX_QUEUE_SIZE images), so that admission, not this, refuses.
MAX_CONCURRENT_RPCS = 1024
# Framing beyond a request's own bytes: the message's fields, names, shapes and parameters.
MESSAGE_OVERHEAD = 64 * 1024

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# The typed contents field of each datatype (when a client does not send raw contents).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameters(fields: Any) -> dict[str, Any]:
    out = {}
    for key, value in fields.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


def _served(state: State, name: str, version: str) -> Any:
    return lookup(state.repository, name, version or None)


def _tensors(request: pb.ModelInferRequest) -> list[Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    tensors = []
    for index, spec in enumerate(request.inputs):
        shape = [int(d) for d in spec.shape]
        if raw:
            tensors.append(from_raw(spec.name, spec.datatype, shape, raw[index]))
            continue
        element_count(shape)
        values = getattr(spec.contents, CONTENTS.get(spec.datatype, ""), None)
        if values is None:
            raise bad(f"input {spec.name!r}: unknown datatype {spec.datatype!r}")
        data = list(values) if spec.datatype == "BYTES" else np.asarray(values, DATATYPES[spec.datatype])
        tensors.append(Tensor(spec.name, spec.datatype, shape, data))
    return tensors


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: State) -> None:
        self.state = state

    async def _call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        work: Callable[[], Awaitable[Any]],
        call: Call | None = None,
    ) -> Any:
        """Run one call: its errors as gRPC codes, accounted under ``route`` = the method name."""
        state = self.state
        started = time.perf_counter()
        status = 200
        error: APIError | None = None
        abort: tuple[grpc.StatusCode, str] | None = None
        state.metrics.in_flight.inc()
        try:
            return await work()
        except APIError as exc:
            error = call.fail(exc) if call is not None else exc
            status = exc.status
            abort = (CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except asyncio.CancelledError:
            status = 499  # the client cancelled, or its deadline passed
            error = call.fail(client_gone()) if call is not None else None
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = 500
            log.exception("unhandled error in %s", method)
            abort = (grpc.StatusCode.INTERNAL, "internal error; see the service log")
        finally:
            state.metrics.in_flight.dec()
            model = NO_MODEL
            if call is not None:
                model = call.label
                error = call.error
            if error is not None:
                # Only the error's code and message are kept: its traceback holds the frames of
                # the request (its message's bytes) for as long as the error lives.
                error.__traceback__ = error.__cause__ = error.__context__ = None
            outcome = Outcome("GRPC", method, method, status, time.perf_counter() - started, model, error)
            state.accounting.record(outcome, log_line=method == "ModelInfer")
            if call is not None:
                call.close()
        # Outside the handler of the error: grpc's AbortError would chain it (and its frames).
        assert abort is not None
        await context.abort(*abort)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerReadyResponse(ready=self.state.not_ready() is None)

        return await self._call("ServerReady", context, work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ModelReadyResponse(ready=_served(self.state, request.name, request.version).ready)

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def work() -> Any:
            return pb.ServerMetadataResponse(**server_metadata(EXTENSIONS))

        return await self._call("ServerMetadata", context, work)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            config = model_config(self.state, _served(self.state, request.name, request.version))
            return triton.ModelConfigResponse(
                config=json_format.ParseDict(config, model_config_pb2.ModelConfig())
            )

        return await self._call("ModelConfig", context, work)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            models = repository_index(self.state, request.ready)
            return triton.RepositoryIndexResponse(
                models=[triton.RepositoryIndexResponse.ModelIndex(**m) for m in models]
            )

        return await self._call("RepositoryIndex", context, work)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            meta = model_metadata(self.state, _served(self.state, request.name, request.version))
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
                # The message's string map: REST's parameters, values as JSON (class names first).
                properties={
                    k: v if isinstance(v, str) else json.dumps(v) for k, v in meta["parameters"].items()
                },
            )

        return await self._call("ModelMetadata", context, work)

    async def ModelInfer(self, messages: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """A unary call, served as client-streaming so that its message is read here, within
        the budget (the module docstring)."""
        call = Call(self.state, "ModelInfer")
        remaining = context.time_remaining()
        transport_due = call.arrival + remaining if remaining is not None else None

        async def work() -> Any:
            request = await self._read(call, messages, transport_due)
            call.resolve(request.model_name, request.model_version or None)
            parameters = _parameters(request.parameters)
            names = check_outputs([o.name for o in request.outputs])
            async with call.door(min(call.longest_due(), transport_due or math.inf)):
                inferred = await run(call, _tensors(request), parameters, transport_due=transport_due)
            model = call.model
            assert model is not None
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            for key, value in inferred.parameters().items():
                response.parameters[key].string_param = value
            for name in names:
                array = inferred.outputs[name]
                response.outputs.add(name=name, datatype=OUTPUT_TYPES[name], shape=list(array.shape))
                response.raw_output_contents.append(
                    np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
                )
            return response

        return await self._call("ModelInfer", context, work, call)

    async def _read(
        self, call: Call, messages: AsyncIterator[Any], transport_due: float | None
    ) -> pb.ModelInferRequest:
        """The call's one message, read within the budget of request bytes by its longest
        deadline (a message not in by then could not be answered in time anyway)."""
        due = min(call.longest_due(), transport_due or math.inf)
        call.bytes = self.state.budget.reservation()
        await call.bytes.take(message_limit(self.state.settings), due)
        try:
            async with asyncio.timeout_at(due):
                size, request = await anext(aiter(messages))
                # The stream's end (a unary client half-closes with its message): the message
                # is not kept by grpc's receiver for as long as the call lives.
                async for _ in messages:
                    raise bad("ModelInfer takes one message")
        except StopAsyncIteration:
            # A unary client always sends its one message: none means gRPC itself refused it
            # for its size (the client has RESOURCE_EXHAUSTED already; this counts it).
            limit = message_limit(self.state.settings)
            raise APIError(413, f"the message passes the limit of {limit} bytes (SSD_MAX_REQUEST_BYTES "
                           "and the message's framing)", "payload_too_large") from None  # fmt: skip
        except TimeoutError:
            raise APIError(504, "the request's message did not arrive before its deadline",
                           "deadline_exceeded") from None  # fmt: skip
        call.bytes.shrink(size)
        return request


def message_limit(settings: Any) -> int:
    """The largest ModelInfer message: a request's bytes and the message's framing."""
    return settings.max_request_bytes + MESSAGE_OVERHEAD


def _handlers(servicer: Servicer) -> dict[str, grpc.RpcMethodHandler]:
    """The generated handlers (service/oip/proto), with ModelInfer served as client-streaming
    and its message's size kept beside it."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class Collect:
        def add_generic_rpc_handlers(self, generic: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, methods: dict) -> None:
            handlers.update(methods)

    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Collect())
    # Two of Triton's methods beyond the protocol's six, which its tools and clients call.
    for name, request, response in (
        ("ModelConfig", triton.ModelConfigRequest, triton.ModelConfigResponse),
        ("RepositoryIndex", triton.RepositoryIndexRequest, triton.RepositoryIndexResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    handlers["ModelInfer"] = grpc.stream_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=lambda raw: (len(raw), pb.ModelInferRequest.FromString(raw)),
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    return handlers


async def start(state: State, host: str, port: int) -> grpc.aio.Server:
    """The gRPC server on ``host:port``, started."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", message_limit(state.settings)),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    handlers = _handlers(Servicer(state))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
