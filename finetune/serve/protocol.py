"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API): request and response bodies.

An inference request is JSON, optionally followed by binary tensor data (Triton's binary-data
extension, which ``tritonclient.http`` uses): the header ``Inference-Header-Content-Length`` gives
the JSON's length, and each input with ``parameters.binary_data_size`` takes that many bytes of what
follows, in order. ``BYTES`` elements in binary are each a 4-byte little-endian length and the bytes;
``FP32`` is little-endian float32. In JSON, ``data`` holds the elements (flat or nested); a ``BYTES``
image in JSON is base64 text. A response returns an output in binary when the request asks for it
(``outputs[i].parameters.binary_data``, or ``parameters.binary_data_output`` for all), else in JSON.

Nothing here trusts the body: every length, shape and datatype is checked against the data actually
present, and a mismatch is a `RequestError` (400) naming the input and the problem. (The protocol is
small and fixed; KServe's own Python server brings a whole framework, so it is parsed here.)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.serve.errors import bad_request

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE, PIXELS = "image", "pixels"  # the inputs: encoded image files (BYTES [N]), or preprocessed (FP32 [N,C,H,W])
PROBABILITIES, LABEL = "probabilities", "label"  # the outputs: FP32 [N, classes], BYTES [N]
OUTPUT_DATATYPES = {PROBABILITIES: "FP32", LABEL: "BYTES"}
INPUT_DATATYPES = {IMAGE: "BYTES", PIXELS: "FP32"}
MAX_DIMS = 8


@dataclass
class InferRequest:
    """A parsed request: its one input (name, shape, data: a list of bytes for BYTES, an array for FP32) and
    the outputs asked for (name -> binary?)."""

    id: str | None
    input: str
    shape: list[int]
    data: list[bytes] | np.ndarray
    outputs: dict[str, bool]


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """A request body (and its ``Inference-Header-Content-Length``, if any) as an `InferRequest`."""
    header, binary = split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"the request must have exactly one input, '{IMAGE}' (BYTES [N], encoded image files) or "
                          f"'{PIXELS}' (FP32 [N,C,H,W], preprocessed)")
    name, datatype, shape, data = parse_input(inputs[0], binary)
    request_id = header.get("id")
    return InferRequest(id=request_id if isinstance(request_id, str) else None, input=name, shape=shape, data=data,
                        outputs=requested_outputs(header))


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        length = len(body)
    elif not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise bad_request(f"{HEADER_LENGTH} '{header_length[:40]}' is not a length within the {len(body)}-byte body")
    else:
        length = int(header_length)
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError) as err:  # also UnicodeDecodeError, JSONDecodeError
        raise bad_request(f"the request is not JSON ({type(err).__name__}: {str(err)[:100]})") from None
    if not isinstance(header, dict):
        raise bad_request("the request must be a JSON object with 'inputs'")
    return header, body[length:]


def parse_input(tensor: dict[str, Any], binary: bytes) -> tuple[str, str, list[int], list[bytes] | np.ndarray]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in INPUT_DATATYPES:
        raise bad_request(f"unknown input {quoted(name)}: the inputs are '{IMAGE}' (BYTES) and '{PIXELS}' (FP32)")
    if datatype != INPUT_DATATYPES[name]:
        raise bad_request(f"input '{name}' has datatype {quoted(datatype)}: it must be {INPUT_DATATYPES[name]}")
    if not (isinstance(shape, list) and 0 < len(shape) <= MAX_DIMS
            and all(type(d) is int and d >= 0 for d in shape)):
        raise bad_request(f"input '{name}' has shape {quoted(shape)}: a list of sizes (at most {MAX_DIMS}) is needed")
    count = math.prod(shape)
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise bad_request(f"input '{name}': binary_data_size {quoted(size)} is not the {len(binary)} bytes of "
                              "binary data after the JSON header")
        data = binary_bytes(binary, count, name) if datatype == "BYTES" else binary_fp32(binary, shape, name)
    elif binary:
        raise bad_request(f"{len(binary)} bytes follow the JSON header, but input '{name}' has no binary_data_size")
    elif "data" not in tensor:
        raise bad_request(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    else:
        values = tensor["data"]
        data = json_bytes(values, count, name) if datatype == "BYTES" else json_fp32(values, shape, name)
    return name, datatype, shape, data


def binary_bytes(binary: bytes, count: int, name: str) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise bad_request(f"input '{name}': the binary data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", binary, offset)
        if offset + 4 + length > len(binary):
            raise bad_request(f"input '{name}': element {len(elements)} claims {length} bytes, but only "
                              f"{len(binary) - offset - 4} follow (truncated)")
        elements.append(binary[offset + 4:offset + 4 + length])
        offset += 4 + length
    if len(elements) != count:
        raise bad_request(f"input '{name}' has {len(elements)} elements, but its shape says {count}")
    return elements


def binary_fp32(binary: bytes, shape: list[int], name: str) -> np.ndarray:
    if len(binary) != 4 * math.prod(shape):
        raise bad_request(f"input '{name}': {len(binary)} bytes of binary data, but FP32 {shape} needs "
                          f"{4 * math.prod(shape)}")
    return np.frombuffer(binary, dtype="<f4").reshape(shape).astype(np.float32)


def json_bytes(data: Any, count: int, name: str) -> list[bytes]:
    """BYTES elements given in JSON: base64 text, a flat or nested list."""
    elements = flatten(data, name)
    if len(elements) != count:
        raise bad_request(f"input '{name}' has {len(elements)} elements, but its shape says {count}")
    try:
        return [base64.b64decode(e, validate=True) for e in elements]
    except (binascii.Error, TypeError, ValueError):
        raise bad_request(f"input '{name}': in JSON, each image must be base64 text (or send it as binary data, "
                          "as tritonclient does)") from None


def json_fp32(data: Any, shape: list[int], name: str) -> np.ndarray:
    values = flatten(data, name)
    if len(values) != math.prod(shape) or not all(type(v) in (int, float) for v in values):
        raise bad_request(f"input '{name}': 'data' must hold {math.prod(shape)} numbers for FP32 {shape}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def flatten(data: Any, name: str) -> list[Any]:
    """The elements of a flat or nested JSON list (at most `MAX_DIMS` deep), in order."""
    level = [data]
    for _ in range(MAX_DIMS):
        if not any(isinstance(item, list) for item in level):
            break
        if not all(isinstance(item, list) for item in level):
            raise bad_request(f"input '{name}': 'data' mixes lists and values")
        level = [value for item in level for value in item]
    else:
        raise bad_request(f"input '{name}': 'data' is nested deeper than {MAX_DIMS}")
    return level if isinstance(data, list) else [data]


def requested_outputs(header: dict[str, Any]) -> dict[str, bool]:
    """``{output: binary?}``: the outputs listed (all of them when none is), each binary as asked."""
    parameters = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    default = parameters.get("binary_data_output") is True
    listed = header.get("outputs")
    if listed is None:
        return {name: default for name in OUTPUT_DATATYPES}
    if not isinstance(listed, list) or not all(isinstance(o, dict) for o in listed):
        raise bad_request("'outputs' must be a list of {\"name\": ...} objects")
    chosen = {}
    for output in listed:
        if output.get("name") not in OUTPUT_DATATYPES:
            raise bad_request(f"unknown output {quoted(output.get('name'))}: the outputs are "
                              f"{', '.join(repr(n) for n in OUTPUT_DATATYPES)}")
        params = output.get("parameters") if isinstance(output.get("parameters"), dict) else {}
        chosen[output["name"]] = params.get("binary_data", default) is True
    return chosen


def encode_response(*, model_name: str, version: str, request_id: str | None,
                    outputs: dict[str, np.ndarray | list[str]],
                    binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: the JSON header, then the binary outputs in order."""
    entries, blobs = [], []
    for name, wants_binary in binary.items():
        value = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": OUTPUT_DATATYPES[name], "shape": output_shape(value)}
        if wants_binary:
            blob = bytes_tensor(value) if OUTPUT_DATATYPES[name] == "BYTES" else np.asarray(value, "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = list(value) if isinstance(value, list) else np.asarray(value).ravel().tolist()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": entries}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def output_shape(value: np.ndarray | list[str]) -> list[int]:
    return [len(value)] if isinstance(value, list) else list(np.asarray(value).shape)


def bytes_tensor(values: list[str]) -> bytes:
    parts = []
    for text in values:
        data = text.encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def model_metadata(*, name: str, version: str, platform: str, input_shape: tuple[int, int, int],
                   classes: int) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the inputs and outputs (``-1``: the batch dimension, any size)."""
    return {"name": name, "versions": [version], "platform": platform,
            "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS, "datatype": "FP32", "shape": [-1, *input_shape]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, classes]},
                        {"name": LABEL, "datatype": "BYTES", "shape": [-1]}]}


def quoted(value: Any) -> str:
    """``'value'`` for a message, shortened (a request may hold megabytes)."""
    text = value if isinstance(value, str) else json.dumps(value) if is_plain(value) else type(value).__name__
    return repr(text if len(text) <= 60 else f"{text[:60]}...")


def is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list))
