"""The pool <-> worker wire protocol: length-prefixed JSON messages (no pickle).

Each message is a 4-byte big-endian length, then that many bytes of UTF-8 JSON.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Optional

_HEADER = struct.Struct(">I")


def _read_exact(fd: int, size: int) -> Optional[bytes]:
  """Reads exactly `size` bytes, or returns None at end of file."""
  chunks, remaining = [], size
  while remaining:
    chunk = os.read(fd, remaining)
    if not chunk:
      return None
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)


def read_message(fd: int) -> Optional[Dict[str, Any]]:
  """Reads one length-prefixed JSON message (blocking); None at end of file."""
  header = _read_exact(fd, _HEADER.size)
  if header is None:
    return None
  payload = _read_exact(fd, _HEADER.unpack(header)[0])
  return None if payload is None else json.loads(payload)


def encode_message(message: Dict[str, Any]) -> bytes:
  """Frames one JSON message: 4-byte big-endian length, then UTF-8 JSON."""
  payload = json.dumps(message).encode("utf-8")
  return _HEADER.pack(len(payload)) + payload


def write_message(fd: int, message: Dict[str, Any]) -> None:
  """Writes one framed message (blocking)."""
  data = memoryview(encode_message(message))
  while data:
    data = data[os.write(fd, data):]
