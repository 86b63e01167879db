"""The public contract: queue names, task names, control commands.

Producers send tasks by these names (plain ``send_task`` works; nothing here
must be imported). Arguments and result fields are documented in
``docs/contract.md``; this module is the single source for the names.
"""

from __future__ import annotations

VISION_QUEUE = "vision"
AUDIO_QUEUE = "audio"
QUEUES = (VISION_QUEUE, AUDIO_QUEUE)

# vision.analyze(image: bytes, options: dict | None = None) -> dict
VISION_ANALYZE = "vision.analyze"
# vision.verify(image_a: bytes, image_b: bytes) -> dict
VISION_VERIFY = "vision.verify"
# vision.get_status() -> dict   (the seed's Vision.GetStatus)
VISION_GET_STATUS = "vision.get_status"
# Galleries (docs/galleries.md):
# vision.enroll(gallery: str, subject_id: str, image: bytes, options: dict | None = None) -> dict
VISION_ENROLL = "vision.enroll"
# vision.identify(gallery: str, image: bytes, options: dict | None = None) -> dict
VISION_IDENTIFY = "vision.identify"
# vision.forget(gallery: str, subject_id: str) -> dict
VISION_FORGET = "vision.forget"

# audio.analyze(audio: bytes, options: dict | None = None) -> dict
AUDIO_ANALYZE = "audio.analyze"
# audio.verify(audio_a: bytes, audio_b: bytes) -> dict
AUDIO_VERIFY = "audio.verify"
# audio.get_status() -> dict   (the seed's Audio.GetStatus)
AUDIO_GET_STATUS = "audio.get_status"
# audio.enroll(gallery: str, subject_id: str, audio: bytes, options: dict | None = None) -> dict
AUDIO_ENROLL = "audio.enroll"
# audio.identify(gallery: str, audio: bytes, options: dict | None = None) -> dict
AUDIO_IDENTIFY = "audio.identify"
# audio.forget(gallery: str, subject_id: str) -> dict
AUDIO_FORGET = "audio.forget"

# Remote-control command answered by every worker for each of its pool
# processes: `celery -A workers.vision inspect model_status`.
MODEL_STATUS_COMMAND = "model_status"

# Pass-by-reference: a payload argument may be {"payload_ref": key}, where key
# (starting with the prefix) holds the bytes in the broker's Redis. Workers
# delete the key once the job is finished.
PAYLOAD_REF_FIELD = "payload_ref"
PAYLOAD_KEY_PREFIX = "ident:payload:"

# A message header the producer client (tasks/client.py) sets to its wall-clock
# send time, in seconds since the epoch: the worker measures a job's queue wait
# (ident_queue_wait_seconds) from it. Celery's protocol carries no send time;
# a producer that does not set it gets its wait measured from the worker's receipt.
SENT_AT_HEADER = "ident_sent_at"

# Execution provider names as ONNX Runtime spells them.
CUDA_EP_NAME = "CUDAExecutionProvider"
CPU_EP_NAME = "CPUExecutionProvider"

# Every task result carries these two fields.
EXECUTION_PROVIDER_FIELD = "execution_provider"
DEVICE_FIELD = "device"


def queue_for(task_name: str) -> str:
    """'vision.*' tasks go to the vision queue, 'audio.*' to audio."""
    prefix = task_name.split(".", 1)[0]
    if prefix not in QUEUES:
        raise ValueError(f"task {task_name!r} belongs to no queue: names start with 'vision.' or 'audio.'")
    return prefix
