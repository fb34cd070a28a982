"""Known-image banks: match every image against known violations (and known-benign images) by PDQ
hash and by CLIP embedding.

- :mod:`~moderator.banks.pdq`: PDQ hashes (the ``pdqhash`` package), hex form, quality.
- :mod:`~moderator.banks.index`: every bank as one immutable index; batched search (pure).
- :mod:`~moderator.banks.store`: the compacted ``banks`` topic: read, written, followed by workers.
- :mod:`~moderator.banks.cli`: ``moderator bank add | import | list | remove | scan``.

A policy decides by banks through its ``banks:`` rules (``moderator/policy/spec.py``, ``BankRule``).
"""
