"""What travels in a Flower message: a :class:`SiteJob` out, a :class:`SiteResult` (or an error) back.

Weights go as an ``ArrayRecord`` of numpy arrays keyed by unique tensor name (never the aliased
state_dict); everything else as a ``ConfigRecord`` of scalars, with nested values (round settings,
metrics) as JSON strings because ConfigRecords hold only flat scalars and lists. Both ends use this one
module, so the wire format is defined in exactly one place.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from nnunet_feddah.errors import FedDAHError
from nnunet_feddah.federation.jobs import SiteJob, SiteResult

TRAIN = "train"
FINGERPRINT_ROUND = "query.fingerprint_round"  # Flower's "query" category, our action (a custom handler)
WEIGHTS, CONFIG, METRICS, TIMING, ERROR, REPLY = "weights", "config", "metrics", "timing", "error", "reply"
PACKED, LAYOUT = "packed:", "layout"


class MalformedMessageError(FedDAHError, ValueError):
    """A message whose content does not follow this module's wire format."""


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Unique tensors → an ArrayRecord of *one* flat array per dtype, plus the layout needed to cut it up.

    Flower stores and transfers every array as its own object with its own HTTP round trips; ~70 separate
    tensors made each transfer take 5–10 s on loopback, one packed array takes well under a second.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    layout = []
    for name, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        groups.setdefault(dtype, []).append(tensor.detach().cpu().reshape(-1))
        layout.append([name, dtype, list(tensor.shape)])
    arrays = {f"{PACKED}{dtype}": Array(ndarray=torch.cat(flat).numpy()) for dtype, flat in groups.items()}
    arrays[LAYOUT] = Array(ndarray=np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8).copy())
    return ArrayRecord(array_dict=arrays)


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_record`, names in their original order.

    The record comes from another machine, so the layout is checked completely: unique names, known
    dtypes, non-negative shapes, and packed arrays whose lengths are exactly what the layout says.
    Anything else raises :class:`MalformedMessageError` (the coordinator counts a missed round).
    """
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes().decode())
        flat = {key.removeprefix(PACKED): torch.from_numpy(np.array(a.numpy(), copy=True)).reshape(-1)
                for key, a in record.items() if key.startswith(PACKED)}
    except Exception as exc:  # missing layout, undecodable bytes, arrays numpy cannot read
        raise MalformedMessageError(f"weights record unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(layout, list):
        raise MalformedMessageError("weights layout is not a list")
    offsets = dict.fromkeys(flat, 0)
    out: dict[str, torch.Tensor] = {}
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[1] in flat
                and isinstance(entry[2], list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                       for d in entry[2])):
            raise MalformedMessageError(f"weights layout entry {str(entry)[:200]} is not [name, packed dtype, shape]")
        name, dtype, shape = entry
        if name in out:
            raise MalformedMessageError(f"weights layout names {name!r} twice")
        size = math.prod(shape)
        if offsets[dtype] + size > flat[dtype].numel():
            raise MalformedMessageError(f"weights layout needs more {dtype} values than were sent (at {name!r})")
        out[name] = flat[dtype][offsets[dtype]:offsets[dtype] + size].reshape(shape)
        offsets[dtype] += size
    unused = {d: flat[d].numel() - o for d, o in offsets.items() if o != flat[d].numel()}
    if unused:
        raise MalformedMessageError(f"packed weights hold values the layout does not place: {unused}")
    return out


def job_content(job: SiteJob, defaults: Mapping[str, str]) -> RecordDict:
    """A job as message content; ``defaults`` (plan path, work dir, device) apply where a site sets none."""
    config = {"site": job.site, "round": job.round, "task": job.task, "organs": [int(o) for o in job.organs],
              "step": -1 if job.step is None else int(job.step), "settings": json.dumps(job.settings or {}),
              **{k: str(v) for k, v in defaults.items()}}
    return RecordDict({WEIGHTS: tensors_to_record(job.weights), CONFIG: ConfigRecord(config)})


def job_from_content(content: RecordDict) -> tuple[SiteJob, dict[str, str]]:
    """The job and the coordinator's defaults (keys ``plan``, ``work-dir``, ``device``)."""
    config = content[CONFIG]
    step = int(config["step"])
    job = SiteJob(site=str(config["site"]), round=int(config["round"]), task=str(config["task"]),
                  organs=[int(o) for o in config["organs"]], step=None if step < 0 else step,
                  settings=json.loads(str(config["settings"])), weights=record_to_tensors(content[WEIGHTS]))
    defaults = {k: str(config[k]) for k in ("plan", "work-dir", "device") if k in config}
    return job, defaults


def result_content(result: SiteResult, timing: Mapping[str, float]) -> RecordDict:
    info = {"site": result.site, "round": result.round, "task": result.task, "seconds": float(result.seconds),
            "metrics": json.dumps(result.metrics, default=str)}
    return RecordDict({WEIGHTS: tensors_to_record(result.weights), CONFIG: ConfigRecord(info),
                       TIMING: ConfigRecord({k: float(v) for k, v in timing.items()})})


def error_content(message: str, timing: Mapping[str, float]) -> RecordDict:
    """A site-side failure as an ordinary reply: the coordinator logs the reason and counts a missed round."""
    return RecordDict({ERROR: ConfigRecord({"message": message[-4000:]}),
                       TIMING: ConfigRecord({k: float(v) for k, v in timing.items()})})


def result_from_content(content: RecordDict) -> SiteResult | str:
    """A reply's content → SiteResult, or the site's error message."""
    if ERROR in content:
        return f"site error: {content[ERROR]['message']}"
    info = content[CONFIG]
    return SiteResult(site=str(info["site"]), round=int(info["round"]), task=str(info["task"]),
                      weights=record_to_tensors(content[WEIGHTS]), metrics=json.loads(str(info["metrics"])),
                      seconds=float(info["seconds"]))


def ask_content(stage: str, request: Mapping, defaults: Mapping[str, str]) -> RecordDict:
    """A fingerprint-round request (the stage and its JSON request) with the coordinator's defaults."""
    return RecordDict({CONFIG: ConfigRecord({"stage": stage, "request": json.dumps(request),
                                             **{k: str(v) for k, v in defaults.items()}})})


def ask_from_content(content: RecordDict) -> tuple[str, dict, dict[str, str]]:
    """Stage, request and the coordinator's defaults (``plan``, ``work-dir``, ``device``)."""
    config = content[CONFIG]
    request = json.loads(str(config["request"]))
    if not isinstance(request, dict):
        raise MalformedMessageError(f"fingerprint-round request is not a JSON object: {str(request)[:200]}")
    return str(config["stage"]), request, {k: str(config[k]) for k in ("plan", "work-dir", "device") if k in config}


def answer_content(reply: Mapping, timing: Mapping[str, float]) -> RecordDict:
    """A site's fingerprint-round answer as one JSON string (statistics or an architecture fingerprint)."""
    return RecordDict({REPLY: ConfigRecord({"json": json.dumps(reply)}),
                       TIMING: ConfigRecord({k: float(v) for k, v in timing.items()})})


def answer_from_content(content: RecordDict) -> dict | str:
    """The site's answer, or its error message."""
    if ERROR in content:
        return f"site error: {content[ERROR]['message']}"
    reply = json.loads(str(content[REPLY]["json"]))
    if not isinstance(reply, dict):
        raise MalformedMessageError(f"fingerprint-round answer is not a JSON object: {str(reply)[:200]}")
    return reply


def timing_from_content(content: RecordDict) -> dict[str, float]:
    return {k: float(v) for k, v in content[TIMING].items()} if TIMING in content else {}


def process_start_time() -> float:
    """Wall-clock start of this process (Linux ``/proc``), to time how long Flower took to start the ClientApp."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()
