"""The stream worker: consumer → image stage → micro-batcher → engine → policy → producer → checkpoint.

Modules, in the order an event meets them:

- ``loop.py``: :class:`Worker`, the consumer's thread: polls without pause (so the group never sees
  a stalled member), parses envelopes, hands events to the image stage, applies backpressure and
  commits, and shuts down.
- ``stages.py``: the image stage (a thread pool: fetch, decode) and the batch stage (one thread:
  micro-batcher, image tower, one policy snapshot per batch, decisions).
- ``outputs.py``: each event's records (decision, review item, dead letter) and the publisher that
  sends them and re-sends what the broker refused.
- ``checkpoint.py``: receipt → done → commit, backpressure, revocation and shutdown, with their
  order as numbered steps. The heart of "nothing lost".
- ``rebalance.py``: the rebalance listener that runs the checkpoint's revocation steps.
- ``event.py``: one event's journey, and :class:`ImageEngine`, what the worker needs of the engine.
- ``feed.py``: an in-process stand-in for the broker (benchmarks without one, unit tests).

Threads: the consumer's (``Worker.run``), the image pool, the engine (``BatchStage``), and
kafka-python's IO thread, which runs delivery callbacks (an event is done when the broker
acknowledged every record it produced) and the rebalance listener.

Exit codes of ``moderator run``: 0, stopped (SIGTERM/SIGINT) with every received event done and
committed; 1, a record could not be published after ``MODERATOR_PUBLISH_RETRIES`` re-sends (its event
is left uncommitted, to be read again), or the worker crashed; 2, a start-up configuration error (the
message says what to fix); 3, stopped at ``MODERATOR_SHUTDOWN_TIMEOUT_S`` with events not done (left
uncommitted).
"""

from moderator.worker.event import Event, ImageEngine
from moderator.worker.loop import EXIT_OK, EXIT_PUBLISH_FAILED, EXIT_UNFINISHED, Worker

__all__ = ["EXIT_OK", "EXIT_PUBLISH_FAILED", "EXIT_UNFINISHED", "Event", "ImageEngine", "Worker"]
