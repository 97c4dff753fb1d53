"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on ``SSD_GRPC_PORT``,
in the app's own event loop (grpc.aio), sharing its repository, batchers, decoder and metrics.

The service's messages are generated from the protocol's official ``.proto`` (service/oip/proto,
``make proto``). ``tritonclient.grpc`` speaks Triton's superset of it: the six methods here have
the same names and messages. A request's deadline is the earlier of the gRPC deadline and its
``timeout_ms`` (or Triton's ``timeout``) parameter; a client that cancels, or whose deadline
passes, stops the request's work as a closed HTTP connection does. The receive limit is the
REST body limit (gRPC's own default is 4 MB, one photo).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from ..errors import APIError
from ..inference import ready_model
from ..state import State, served
from .proto import open_inference_grpc_pb2 as pb
from .proto import open_inference_grpc_pb2_grpc as pb_grpc
from .protocol import (
    DATATYPES,
    OUTPUT_TYPES,
    Tensor,
    bad,
    check_outputs,
    element_count,
    from_raw,
    model_metadata,
    run,
    server_metadata,
)
from .rest import EXTENSIONS, body_limit

log = logging.getLogger(__name__)

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
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run one call: its errors as gRPC codes, counted under ``route`` = the method name."""
        metrics = self.state.metrics
        started = time.perf_counter()
        status = 200
        metrics.in_flight.inc()
        try:
            return await work()
        except APIError as exc:
            status = exc.status
            await context.abort(CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except asyncio.CancelledError:
            status = 499  # the client cancelled, or its deadline passed
            metrics.rejected.labels("disconnected").inc()
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = 500
            log.exception("unhandled error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(method, str(status)).inc()
            metrics.request_duration.labels(method).observe(time.perf_counter() - started)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, work)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ServerReadyResponse(ready=self.state.repository.ready)

        return await self._call("ServerReady", context, work)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return pb.ModelReadyResponse(
                ready=served(self.state, request.name, request.version or None).ready
            )

        return await self._call("ModelReady", context, work)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def work() -> Any:
            return pb.ServerMetadataResponse(**server_metadata(EXTENSIONS))

        return await self._call("ServerMetadata", context, work)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            meta = model_metadata(self.state, served(self.state, request.name, request.version or None))
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

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        arrival = time.monotonic()

        async def work() -> Any:
            model = served(self.state, request.model_name, request.model_version or None)
            ready_model(model)
            parameters = _parameters(request.parameters)
            remaining = context.time_remaining()
            if remaining is not None:  # the gRPC deadline, as Triton's timeout parameter (µs)
                given = parameters.get("timeout")
                micros = remaining * 1e6
                parameters["timeout"] = (
                    min(given, micros) if isinstance(given, int | float) and given else micros
                )
            names = check_outputs([o.name for o in request.outputs])
            outputs = await run(self.state, model, _tensors(request), parameters, arrival)
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            for name in names:
                array = outputs[name]
                response.outputs.add(name=name, datatype=OUTPUT_TYPES[name], shape=list(array.shape))
                response.raw_output_contents.append(
                    np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
                )
            return response

        return await self._call("ModelInfer", context, work)


def receive_limit(state: State) -> int:
    """The REST body limit for the largest model's pixels (and never below gRPC's 4 MB)."""
    pixels = max(
        (
            m.detector.info.input_size[0] * m.detector.info.input_size[1] * 3
            for m in state.repository.models()
            if m.detector
        ),
        default=512 * 512 * 3,
    )
    return max(4 * 1024 * 1024, body_limit(state, pixels))


async def start(state: State, host: str, port: int) -> grpc.aio.Server:
    """The gRPC server on ``host:port``, started."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", receive_limit(state)),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"gRPC cannot listen on {address}")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", address)
    return server
